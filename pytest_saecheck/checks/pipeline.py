"""``assert_metric_pipeline``: a battery of properties that every correct SAE metric pipeline has.

Each property runs the pipeline (:mod:`.pipeline_adapters` states the protocol) on a subject built in code from
the demo model (:mod:`.pipeline_subjects`) whose right answer is known, and compares. The properties, by name
(:data:`PROPERTIES`):

``identity``                    an SAE reconstructing every activation exactly: CE with SAE = CE without, KL = 0,
                                R² = 1, MSE = 0.
``mean_predictor``              an SAE predicting the mean activation of the evaluated tokens: R² = 0.
``batch_size_invariance``       every metric whose definition does not involve the batch is the same at two batch
                                sizes (exempt: ``explained_variance_legacy``, taken about each batch's mean, and
                                ``relative_reconstruction_bias``, a ratio of per-batch means).
``saturated_logits``            a model whose softmax underflows to exact zeros still gives a finite KL (equal to our
                                engine's).
``normalised_excluded_tokens``  an identity SAE on ``blocks.1.hook_attn_out`` at activation scale 4, with BOS
                                and EOS positions excluded:
                                CE with SAE = CE without (excluded positions are neither spliced, scaled nor
                                unscaled).
``explained_variance``          activations with a large mean and an SAE keeping 4 principal directions: R²
                                equals the pooled definition 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²; the message names the
                                formula the pipeline's number matched.
``explained_variance_half_precision``  the ``explained_variance`` subject with model and SAE in bfloat16 and
                                float16 (those of them the pipeline accepts: its ``dtypes`` attribute, when it
                                has one): R² equals the pooled definition in float64 on the same half-precision
                                activations (tolerance :data:`HALF_TOL`).
``identity_half_precision``     the ``identity`` subject with model and SAE in bfloat16 and float16 (those the
                                pipeline accepts): CE with SAE = CE without, KL = 0, R² = 1, MSE = 0.
``mean_predictor_half_precision``  an SAE predicting the mean of the ``explained_variance`` subject's activations
                                (large mean), in each half-precision dtype: R² equals the pooled definition in
                                float64 on the same half-precision activations (about 0).
``transcoder_splice``           a transcoder holding a ReLU MLP's own weights, spliced at its output hook: CE with
                                SAE = CE without, KL = 0.
``agreement``                   every metric the pipeline shares with our engine (float64 sums) agrees on the same
                                tokens and token policy (every position evaluated).

Equal means ``|a − b| ≤ tol · max(1, |b|)`` (``tol`` default :data:`DEFAULT_TOL`); NaN is never equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_saecheck import messages
from pytest_saecheck.checks import pipeline_adapters as adapters
from pytest_saecheck.checks import pipeline_subjects as subjects
from pytest_saecheck.checks.workflow import CheckOutcome, conclude, finite_number
from pytest_saecheck.errors import ConfigError, SAECheckError

ASSERTION = "assert_metric_pipeline"
DEFAULT_TOL = 1e-4
"""Relative tolerance of every equality (float32 pipelines against exact values or float64 sums)."""

BATCH_DEPENDENT: frozenset[str] = frozenset({"explained_variance_legacy", "relative_reconstruction_bias"})
"""Metrics whose definition involves the batch (exempt from ``batch_size_invariance``)."""

FORMULA_NAMES: dict[str, str] = {
    "pooled": "the pooled definition 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²",
    "about_zero": "R² about zero, 1 − Σ‖x − x̂‖² / Σ‖x‖²",
    "mean_square_per_dimension": "E‖x‖² − (mean_d E[x_d²])² as the variance (SAEBench 0.6.0; SAE Lens ≤ 6.45.0)",
    "legacy": "the per-token legacy R² about each batch's mean",
}


SAE_LENS_MEASURED: tuple[str, str] = ("6.0.0", "6.54.12")
"""The SAE Lens releases the table below was measured on (README, "Which SAE Lens releases break what")."""

SAE_LENS_RELEASES: dict[str, tuple[str, str | None]] = {
    "mean_predictor": ("6.0.0", "6.45.1"),
    "batch_size_invariance": ("6.0.0", "6.45.2"),
    "saturated_logits": ("6.0.0", "6.6.5"),
    "normalised_excluded_tokens": ("6.0.0", "6.53.1"),
    "explained_variance": ("6.0.0", "6.45.1"),
    "explained_variance_half_precision": ("6.0.0", "6.51.4"),
    "identity_half_precision": ("6.0.0", "6.6.5"),
    "mean_predictor_half_precision": ("6.0.0", "6.51.4"),
    "transcoder_splice": ("6.5.0", None),
    "agreement": ("6.0.0", "6.45.2"),
}
"""Property → (first SAE Lens release measured to break it, first release measured to pass it again, or None).
Releases before 6.5.0 have no ``Transcoder``: there ``transcoder_splice`` is not checked."""


def sae_lens_expected_broken(version: str) -> frozenset[str] | None:
    """The properties SAE Lens ``version``'s ``run_evals`` breaks by :data:`SAE_LENS_RELEASES`, or None outside
    the measured releases :data:`SAE_LENS_MEASURED`."""
    from packaging.version import Version

    v = Version(version)
    if not Version(SAE_LENS_MEASURED[0]) <= v <= Version(SAE_LENS_MEASURED[1]):
        return None
    return frozenset(
        name
        for name, (bad, fixed) in SAE_LENS_RELEASES.items()
        if Version(bad) <= v and (fixed is None or v < Version(fixed))
    )


CAUSES: dict[str, str] = {
    "identity": "the splice does not put the SAE's output where and when it read the input (wrong hook, "
    "position or batch alignment), or the reconstruction metrics are not taken against that input",
    "mean_predictor": "R² is not taken about the mean of the evaluated activations, e.g. the variance term "
    "E‖x‖² − (mean_d E[x_d²])²",
    "batch_size_invariance": "a metric normalised by the batch: MSE divided by the tokens per evaluation batch",
    "saturated_logits": "KL computed as Σ p (log p − log q) with log(softmax(·)), so 0 · (−∞) = NaN where a "
    "probability underflows; use log_softmax",
    "normalised_excluded_tokens": "excluded positions are handed the scaled activations instead of the model's "
    "own",
    "explained_variance": "the variance term is not Σ‖x − x̄‖²; SAEBench 0.6.0 and old SAE Lens use "
    "E‖x‖² − (mean_d E[x_d²])²",
    "explained_variance_half_precision": "the explained-variance sums are accumulated in the model's half "
    "precision (bfloat16 or float16) instead of float32 or float64, so the large-mean terms swamp the variance",
    "identity_half_precision": "in half precision the splice or the metrics are not exact: the original and the "
    "spliced model run in different precisions, or a sum overflows or rounds away in bfloat16/float16",
    "mean_predictor_half_precision": "the explained-variance sums are accumulated in the model's half precision "
    "(bfloat16 or float16), so the mean predictor's R² is not 0 on activations with a large mean",
    "transcoder_splice": "the transcoder's output is written into its input hook instead of its output hook",
    "agreement": "the pipeline's definition or aggregation of this metric differs from the reference definition",
}
"""The likely cause of each broken property (:func:`cause` adds the SAE Lens releases measured to have it)."""


def cause(name: str) -> str:
    """The likely cause of broken property ``name``, with the SAE Lens releases measured to break it."""
    text = CAUSES[name]
    if name in SAE_LENS_RELEASES:
        bad, fixed = SAE_LENS_RELEASES[name]
        if fixed:
            text += f"; measured in SAE Lens from {bad} until {fixed}, which fixed it"
        else:
            text += f"; measured in SAE Lens from {bad} on, not fixed as of {SAE_LENS_MEASURED[1]}"
    return text


@dataclass
class Finding:
    """One compared number: ``metric``, the pipeline's value (text), the right value (text), whether it held."""

    metric: str
    got: str
    right: str
    ok: bool


@dataclass
class PropertyResult:
    name: str
    findings: list[Finding] = field(default_factory=list)
    not_checked: str | None = None
    note: str | None = None

    @property
    def broken(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]


def equal(value: float, right: float, tol: float) -> bool:
    """``|value − right| ≤ tol · max(1, |right|)``; never true for NaN or an infinity."""
    return math.isfinite(value) and abs(value - right) <= tol * max(1.0, abs(right))


class _Run:
    """One battery run: the pipeline, the subjects (built lazily, each once) and the pipeline's outputs."""

    def __init__(self, name: str, fn: adapters.PipelineFn, tol: float, device: Any) -> None:
        self.name, self.fn, self.tol, self.device = name, fn, tol, device
        self._subjects: subjects.Subjects | None = None
        self._cache: dict[Any, Any] = {}

    @property
    def subjects(self) -> subjects.Subjects:
        if self._subjects is None:
            self._subjects = subjects.build_subjects(self.device)
        return self._subjects

    def tokens(self) -> Any:
        model = self.subjects.model
        return self.subjects.tokens.to(next(model.parameters()).device)

    def once(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def call(self, key: str, model: Any, sae: Any, batch_size: int, **options: Any) -> dict[str, float]:
        """The pipeline's flat metrics on ``(model, sae)`` and the battery's tokens (cached by ``key``)."""
        for option in options:
            if not adapters.accepts(self.fn, option):
                raise _NotApplicable(f"the pipeline takes no {option}= keyword")
        return self.once(
            f"pipeline:{key}:{batch_size}",
            lambda: adapters.flatten_metrics(
                self.fn(model, sae, self.tokens(), batch_size=batch_size, **options), self.name
            ),
        )

    def ours(self, key: str, model: Any, sae: Any, batch_size: int) -> dict[str, float]:
        """Our engine's metrics (SAE Lens names) on the same subject."""
        return self.once(
            f"ours:{key}:{batch_size}",
            lambda: adapters.saecheck_pipeline(model, sae, self.tokens(), batch_size=batch_size),
        )

    def good_sae(self) -> Any:
        """The subjects' well-trained SAE, on the model's device."""
        return self.once(
            "good", lambda: self.subjects.trained_sae(next(self.subjects.model.parameters()).device)
        )


class _NotApplicable(Exception):
    """The property cannot be run against this pipeline (the reason is the message)."""


def _compare(
    result: PropertyResult, metrics: Mapping[str, float], right: Mapping[str, float], tol: float
) -> None:
    for metric, expected in right.items():
        if metric in metrics:
            value = metrics[metric]
            result.findings.append(
                Finding(
                    metric,
                    messages.fmt_exact(value),
                    messages.fmt_exact(expected),
                    equal(value, expected, tol),
                )
            )
    if not result.findings:
        raise _NotApplicable(f"the pipeline reports none of {', '.join(sorted(right))}")


def _exact_splice(result: PropertyResult, metrics: Mapping[str, float], tol: float) -> None:
    """CE with the dictionary spliced equals CE without; KL is 0."""
    right: dict[str, float] = {"kl_div_with_sae": 0.0}
    if "ce_loss_without_sae" in metrics:
        right["ce_loss_with_sae"] = metrics["ce_loss_without_sae"]
    _compare(result, metrics, right, tol)


BATCH = subjects.BATCH_SIZES[0]


def check_identity(run: _Run, result: PropertyResult) -> None:
    s = run.subjects
    sae = run.once(
        "identity", lambda: subjects.identity_sae(s.model.cfg.d_model, s.hook_name, s.tokens.device)
    )
    sae = sae.to(next(s.model.parameters()).device)
    metrics = run.call("identity", s.model, sae, BATCH)
    _exact_splice(result, metrics, run.tol)
    _compare(result, metrics, {"explained_variance": 1.0, "mse": 0.0}, run.tol)


def check_mean_predictor(run: _Run, result: PropertyResult) -> None:
    import torch

    s = run.subjects
    x = subjects.activations(s.model, run.tokens(), s.hook_name)
    mean = x.reshape(-1, x.shape[-1]).to(torch.float64).mean(0).to(x.dtype)
    metrics = run.call("mean", s.model, subjects.mean_sae(mean, s.hook_name), BATCH)
    _compare(result, metrics, {"explained_variance": 0.0}, run.tol)


def check_batch_size_invariance(run: _Run, result: PropertyResult) -> None:
    s = run.subjects
    sae = run.good_sae()
    first, second = (run.call("good", s.model, sae, size) for size in subjects.BATCH_SIZES)
    ours = run.ours("good", s.model, sae, BATCH)
    shared = sorted((set(first) & set(second)) - BATCH_DEPENDENT)
    if not shared:
        raise _NotApplicable("the pipeline reports no metric whose definition is free of the batch")
    for metric in shared:
        a, b = first[metric], second[metric]
        got = f"{messages.fmt_exact(a)} at {subjects.BATCH_SIZES[0]}, {messages.fmt_exact(b)} at {subjects.BATCH_SIZES[1]}"
        right = messages.fmt_exact(ours.get(metric)) if metric in ours else "equal values"
        result.findings.append(Finding(metric, got, right, equal(b, a, run.tol)))
    result.note = f"batch sizes {subjects.BATCH_SIZES[0]} and {subjects.BATCH_SIZES[1]} sequences"


def check_saturated_logits(run: _Run, result: PropertyResult) -> None:
    s = run.subjects
    model = run.once("saturated", lambda: subjects.saturated_model(s.model))
    sae = run.good_sae()
    metrics = run.call("saturated", model, sae, BATCH)
    ours = run.ours("saturated", model, sae, BATCH)
    for metric in ("kl_div_with_sae", "kl_div_with_ablation"):
        if metric in metrics:
            value = metrics[metric]
            right = ours.get(metric)
            ok = equal(value, right, run.tol) if right is not None else math.isfinite(value)
            result.findings.append(Finding(metric, messages.fmt_exact(value), messages.fmt_exact(right), ok))
    if not result.findings:
        raise _NotApplicable("the pipeline reports no KL")


def check_normalised_excluded_tokens(run: _Run, result: PropertyResult) -> None:
    s = run.subjects
    device = next(s.model.parameters()).device
    sae = subjects.identity_sae(s.model.cfg.d_model, subjects.NORMALISED_HOOK, device)
    sae.cfg.normalize_activations = "expected_average_only_in"
    metrics = run.call(
        "normalised",
        s.model,
        sae,
        BATCH,
        exclude_token_ids=tuple(s.special_token_ids),
        activation_scale=subjects.ACTIVATION_SCALE,
    )
    _exact_splice(result, metrics, run.tol)
    result.note = f"activation scale {subjects.ACTIVATION_SCALE}, token ids {list(s.special_token_ids)} (BOS, EOS) excluded"


def _offset_projection(run: _Run) -> tuple[Any, Any, Any]:
    """``(model, sae, activations)`` of the explained-variance subject: activations with a large mean, an SAE
    keeping their top :data:`~.pipeline_subjects.PROJECTION_RANK` principal directions (float32)."""
    return run.once("offset_subject", lambda: _build_offset_projection(run))


def _build_offset_projection(run: _Run) -> tuple[Any, Any, Any]:
    import torch

    s = run.subjects
    x = subjects.activations(s.model, run.tokens(), s.hook_name)
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    spread = float((flat - flat.mean(0)).pow(2).sum(-1).mean().sqrt())
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(x.shape[-1], generator=generator, dtype=torch.float64)
    offset = direction / direction.norm() * subjects.OFFSET_NORM * spread
    layer = int(s.hook_name.split(".")[1])
    model = subjects.offset_model(s.model, layer, offset.to(x.device))
    shifted = subjects.activations(model, run.tokens(), s.hook_name)
    flat = shifted.reshape(-1, x.shape[-1]).to(torch.float64)
    mean = flat.mean(0)
    _, vectors = torch.linalg.eigh(torch.cov(flat.T))
    directions = vectors[:, -subjects.PROJECTION_RANK :]
    sae = subjects.projection_sae(mean.to(x.dtype), directions.to(x.dtype), s.hook_name)
    return model, sae, shifted


def _explained_variance_finding(
    run: _Run, key: str, model: Any, sae: Any, shifted: Any, tol: float, label: str = ""
) -> tuple[Finding, str]:
    """The pipeline's R² on ``(model, sae)`` against the pooled definition on the same activations and
    reconstructions in float64, and a note naming the formula it matched."""
    import torch

    metrics = run.call(key, model, sae, BATCH)
    if "explained_variance" not in metrics:
        raise _NotApplicable("the pipeline reports no explained_variance")
    with torch.inference_mode():
        x_hat = sae.decode(sae.encode(shifted))
    candidates = subjects.variance_candidates(shifted, x_hat, BATCH)
    value = metrics["explained_variance"]
    matched = [name for name, c in candidates.items() if equal(value, c, tol)]
    finding = Finding(
        f"explained_variance{label}",
        messages.fmt_exact(value),
        messages.fmt_exact(candidates["pooled"]),
        "pooled" in matched,
    )
    formulas = ", ".join(f"{name} {messages.fmt_exact(c)}" for name, c in candidates.items())
    if matched:
        note = f"the pipeline's R²{label} matched {FORMULA_NAMES[matched[0]]} (formulas on this subject: {formulas})"
    else:
        note = f"the pipeline's R²{label} matched none of the known formulas ({formulas})"
    return finding, note


def check_explained_variance(run: _Run, result: PropertyResult) -> None:
    model, sae, shifted = _offset_projection(run)
    finding, result.note = _explained_variance_finding(run, "offset", model, sae, shifted, run.tol)
    result.findings.append(finding)


HALF_DTYPES = ("bfloat16", "float16")
"""The half-precision dtypes the battery also runs the explained-variance subject in."""

HALF_TOL = 1e-2
"""Tolerance of the half-precision R² (absolute, for values within [-1, 1]). The right value is computed in
float64 from the same half-precision activations and reconstructions, so the pipeline's accumulation (and, on an
accelerator, kernels that round a batch differently) is all that differs: SAE Lens 6.54.12 on the CPU is
8.4e-7 (bfloat16) and 2.9e-6 (float16) from it; bfloat16 keeps 8 significant bits (relative rounding 2⁻⁹ per
value), and 0.01 leaves room for that while the fault it catches is off by 0.24–0.65 (SAE Lens 6.45.1–6.51.3
summing in half precision, on a PCA SAE over a residual stream with a large mean: 0.0 in bfloat16 and 1.0 in
float16 where 0.2379 and 0.3520 are right)."""


def _half_dtypes(run: _Run) -> list[str]:
    """The half-precision dtypes of :data:`HALF_DTYPES` the pipeline accepts (its ``dtypes`` attribute, if any)."""
    accepted = getattr(run.fn, "dtypes", None)
    dtypes = [d for d in HALF_DTYPES if accepted is None or d in accepted]
    if not dtypes:
        raise _NotApplicable(f"the pipeline declares dtypes={tuple(accepted or ())!r}, no half precision")
    return dtypes


def _in_dtype(model32: Any, sae32: Any, dtype: str) -> tuple[Any, Any]:
    """Copies of ``model32`` and ``sae32`` in ``dtype`` (the float32 subjects stay as they are)."""
    import copy

    import torch

    model = copy.deepcopy(model32).to(getattr(torch, dtype))
    sae = copy.deepcopy(sae32).to(dtype=getattr(torch, dtype))
    if hasattr(sae.cfg, "dtype"):
        sae.cfg.dtype = dtype
    return model, sae


def _each_half_dtype(
    run: _Run, result: PropertyResult, check: Callable[[str], list[Finding]], subject: str
) -> None:
    """``check(dtype)``'s findings in every half-precision dtype the pipeline accepts; a pipeline that raises in a
    dtype breaks the property there, with its error."""
    dtypes = _half_dtypes(run)
    for dtype in dtypes:
        try:
            result.findings.extend(check(dtype))
        except (_NotApplicable, SAECheckError):
            raise
        except Exception as error:  # the pipeline under test raised in this dtype: broken, with the error
            result.findings.append(
                Finding(f"({dtype})", f"{type(error).__name__}: {error}", "a result", False)
            )
    result.note = (
        f"{subject} with model and SAE in {', '.join(dtypes)}; right values in float64 on the same half-precision "
        f"activations (R² within {HALF_TOL:g}). A pipeline that takes no half precision says so with a dtypes "
        "attribute (e.g. pipeline.dtypes = ('float32',))"
    )


def check_explained_variance_half_precision(run: _Run, result: PropertyResult) -> None:
    model32, sae32, _ = _offset_projection(run)

    def check(dtype: str) -> list[Finding]:
        model, sae = _in_dtype(model32, sae32, dtype)
        shifted = subjects.activations(model, run.tokens(), run.subjects.hook_name)
        finding, _ = _explained_variance_finding(
            run, f"offset_{dtype}", model, sae, shifted, max(run.tol, HALF_TOL), f" ({dtype})"
        )
        return [finding]

    _each_half_dtype(run, result, check, "the explained_variance subject")


def check_identity_half_precision(run: _Run, result: PropertyResult) -> None:
    s = run.subjects
    device = next(s.model.parameters()).device
    sae32 = run.once("identity", lambda: subjects.identity_sae(s.model.cfg.d_model, s.hook_name, device))

    def check(dtype: str) -> list[Finding]:
        model, sae = _in_dtype(s.model, sae32, dtype)
        metrics = run.call(f"identity_{dtype}", model, sae, BATCH)
        part = PropertyResult(result.name)
        _exact_splice(part, metrics, run.tol)
        _compare(part, metrics, {"explained_variance": 1.0, "mse": 0.0}, max(run.tol, HALF_TOL))
        return [replace(f, metric=f"{f.metric} ({dtype})") for f in part.findings]

    _each_half_dtype(run, result, check, "the identity subject")


def check_mean_predictor_half_precision(run: _Run, result: PropertyResult) -> None:
    import torch

    model32, _, shifted32 = _offset_projection(run)
    mean32 = shifted32.reshape(-1, shifted32.shape[-1]).to(torch.float64).mean(0).to(shifted32.dtype)
    sae32 = subjects.mean_sae(mean32, run.subjects.hook_name)

    def check(dtype: str) -> list[Finding]:
        model, sae = _in_dtype(model32, sae32, dtype)
        x = subjects.activations(model, run.tokens(), run.subjects.hook_name)
        with torch.no_grad():  # the mean of this dtype's own activations, rounded to the dtype
            sae.b_dec.copy_(x.reshape(-1, x.shape[-1]).to(torch.float64).mean(0).to(sae.b_dec.dtype))
        finding, _ = _explained_variance_finding(
            run, f"mean_{dtype}", model, sae, x, max(run.tol, HALF_TOL), f" ({dtype})"
        )
        return [finding]

    _each_half_dtype(run, result, check, "the mean predictor on activations with a large mean")


def check_transcoder_splice(run: _Run, result: PropertyResult) -> None:
    device = next(run.subjects.model.parameters()).device
    model = run.once("relu", lambda: run.subjects.relu_model(device))
    try:
        transcoder = run.once("transcoder", lambda: subjects.mlp_transcoder(model, subjects.TRANSCODER_LAYER))
    except ImportError as error:
        raise _NotApplicable(f"the installed SAE Lens has no Transcoder ({error})") from None
    gap = run.once("transcoder_gap", lambda: subjects.transcoder_gap(model, transcoder, run.tokens()))
    if not gap <= subjects.EXACT_SUBJECT_RTOL:
        raise _NotApplicable(
            f"the transcoder subject does not reproduce this model's MLP on the installed TransformerLens "
            f"(relative gap {messages.fmt_significant(gap)} > {subjects.EXACT_SUBJECT_RTOL:g}), so a faithful "
            "splice would not score CE unchanged either"
        )
    metrics = run.call("transcoder", model, transcoder, BATCH)
    _exact_splice(result, metrics, run.tol)


def check_agreement(run: _Run, result: PropertyResult) -> None:
    s = run.subjects
    sae = run.good_sae()
    metrics = run.call("good", s.model, sae, BATCH)
    ours = run.ours("good", s.model, sae, BATCH)
    shared = {name: value for name, value in ours.items() if name in metrics}
    _compare(result, metrics, shared, run.tol)
    result.note = f"{s.description}, every position evaluated, against pytest_saecheck.evaluate"


PROPERTIES: dict[str, Callable[[_Run, PropertyResult], None]] = {
    "identity": check_identity,
    "mean_predictor": check_mean_predictor,
    "batch_size_invariance": check_batch_size_invariance,
    "saturated_logits": check_saturated_logits,
    "normalised_excluded_tokens": check_normalised_excluded_tokens,
    "explained_variance": check_explained_variance,
    "explained_variance_half_precision": check_explained_variance_half_precision,
    "identity_half_precision": check_identity_half_precision,
    "mean_predictor_half_precision": check_mean_predictor_half_precision,
    "transcoder_splice": check_transcoder_splice,
    "agreement": check_agreement,
}
"""Every property of the battery, by name, in the order they run."""


def _selected(checks: Iterable[str] | str | None) -> tuple[list[str], bool]:
    if checks is None:
        return list(PROPERTIES), False
    names = [checks] if isinstance(checks, str) else list(checks)
    unknown = [name for name in names if name not in PROPERTIES]
    if unknown or not names:
        raise ConfigError(
            f"{ASSERTION}: unknown or no properties {unknown or names!r}; choose from {', '.join(PROPERTIES)}"
        )
    return list(dict.fromkeys(names)), True


def run_battery(
    pipeline: Any, *, checks: Iterable[str] | str | None = None, tol: float | None = None, device: Any = None
) -> tuple[str, list[PropertyResult]]:
    """Run the selected properties; ``(pipeline name, one PropertyResult per property)``. Raises only on bad
    arguments (:class:`ConfigError`); a pipeline that raises fails the property it was running."""
    names, _ = _selected(checks)
    tolerance = DEFAULT_TOL if tol is None else finite_number("tol", tol)
    if not tolerance > 0:
        raise ConfigError(f"{ASSERTION}: tol must be positive, got {tolerance}")
    name, fn = adapters.resolve_pipeline(pipeline)
    run = _Run(name, fn, tolerance, device)
    results = []
    for prop in names:
        result = PropertyResult(prop)
        try:
            PROPERTIES[prop](run, result)
        except _NotApplicable as reason:
            result.not_checked = str(reason)
        except SAECheckError:
            raise
        except Exception as error:  # the pipeline under test raised: the property is broken
            result.findings.append(
                Finding("(pipeline raised)", f"{type(error).__name__}: {error}", "a result", False)
            )
        results.append(result)
    return name, results


def assert_metric_pipeline(
    pipeline: Any,
    *,
    checks: Iterable[str] | str | None = None,
    tol: float | None = None,
    device: Any = None,
) -> None:
    """Run the battery of :data:`PROPERTIES` against a metric pipeline; fail listing every broken property.

    ``pipeline``: a callable ``(model, sae, tokens, *, batch_size) -> Mapping`` of SAE Lens-named metrics (nested
    like ``run_evals``' output or flat; the protocol and the optional ``exclude_token_ids=``/``activation_scale=``
    keywords are in :mod:`pytest_saecheck.checks.pipeline_adapters`), or a built-in adapter name: ``"sae_lens"``
    (the installed SAE Lens' ``run_evals``), ``"sae_bench"`` (SAEBench core, when installed) or ``"saecheck"``
    (our own engine). ``checks``: property names to run (default: all, in :data:`PROPERTIES` order). ``tol``:
    relative tolerance of every equality (default :data:`DEFAULT_TOL`). ``device``: where the subjects live
    (default CUDA when available). The subjects come from a plug-in (:func:`.pipeline_subjects.build_subjects`: the
    bundled demo model).

    The failure message has one row per broken number: property, metric, the pipeline's number, the right number
    (exact by construction, or our engine's float64 value on the same tokens), then each broken property's likely
    cause and the SAE Lens releases measured to have it. A property the pipeline cannot run (it reports none of
    the metrics, or does not take a keyword the property needs) is listed as not checked; when it was selected
    explicitly through ``checks`` that fails the check.

    Raises:
        AssertionError: a property is broken (or an explicitly selected one could not be checked).
        ConfigError: an unknown property or adapter name, a bad ``tol``, an adapter whose library is missing, or a
            pipeline output that is not a mapping of numbers.
    """
    __tracebackhide__ = True
    _, explicit = _selected(checks)
    name, results = run_battery(pipeline, checks=checks, tol=tol, device=device)
    broken = [r for r in results if r.broken]
    unchecked = [r for r in results if r.not_checked]
    failures = [f"{r.name} broken" for r in broken]
    if explicit:
        failures += [f"{r.name} could not be checked ({r.not_checked})" for r in unchecked]
    rows = [["property", "metric", "pipeline", "right"]]
    for r in broken:
        rows += [[r.name, f.metric, f.got, f.right] for f in r.broken]
    details: list[str] = []
    if broken:
        details += messages.table(rows)
        details.append("likely causes:")
        for r in broken:
            details.append(f"{messages.INDENT}{r.name}: {cause(r.name)}")
    for r in results:
        if r.note and (r.broken or r.name == "explained_variance"):
            details.append(f"{r.name}: {r.note}")
    for r in unchecked:
        details.append(f"{r.name}: not checked: {r.not_checked}")
    details.append(
        "passed: " + (", ".join(r.name for r in results if not r.broken and not r.not_checked) or "none")
    )
    outcome = CheckOutcome(
        assertion=ASSERTION,
        label=f"pipeline {name}",
        failures=tuple(failures),
        details=tuple(details),
        fields={
            "pipeline": name,
            "properties": {
                r.name: {
                    "passed": not r.broken and not r.not_checked,
                    "not_checked": r.not_checked,
                    "note": r.note,
                    "rows": [[f.metric, f.got, f.right, f.ok] for f in r.findings],
                }
                for r in results
            },
            "broken": [r.name for r in broken],
        },
    )
    conclude(outcome)


__all__: Sequence[str] = (
    "BATCH_DEPENDENT",
    "CAUSES",
    "DEFAULT_TOL",
    "PROPERTIES",
    "SAE_LENS_MEASURED",
    "SAE_LENS_RELEASES",
    "assert_metric_pipeline",
    "cause",
    "run_battery",
    "sae_lens_expected_broken",
)
