"""Reported-metric fingerprints: which formula produced a reported explained variance (R²)?

``assert_r2_matches_legacy`` lives here. It judges an explained variance someone else's code reported by
telling which formula produced it, from every quantity the report carries, and says which evidence decided.

The formulas in use (``x`` an activation vector of ``d`` dimensions, ``x̂`` its reconstruction, ``E`` a mean over
tokens; :data:`FORMULAS`):

* ``pooled`` (correct): ``1 − E‖x − x̂‖² / (E‖x‖² − ‖E[x]‖²)``, the coefficient of determination summed over
  dimensions (SAE Lens ≥ 6.45.1 ``explained_variance``; our ``explained_variance``).
* ``legacy``: ``mean_t (1 − ‖x_t − x̂_t‖² / ‖x_t − x̄_batch‖²)`` (SAE Lens' ``explained_variance_legacy``).
* ``collapsed``: ``1 − E‖x − x̂‖² / (E‖x‖² − (mean_d E[x_d²])²)``: ``E[x_d²]`` squared where ``E[x_d]`` was meant
  and the per-dimension means collapsed to one number (``torch.cat`` where ``torch.stack`` was meant). SAE Lens
  5.8.0–6.45.0 (added by PR #443, issue #659, fixed in 6.45.1) and SAEBench core 0.4.1–0.6.0 (PR #61; no fixed
  release). Since ``mean_d E[x_d²] = E‖x‖²/d``, the denominator is ``S − S²/d²`` with ``S = E‖x‖²``: close to
  ``S`` (variance about zero, inflated) when ``S ≪ d²``, near zero when ``S ≈ d²``, negative (R² above 1)
  when ``S > d²``.
* ``about_zero``: ``1 − E‖x − x̂‖² / E‖x‖²`` (variance about zero; inflated when activations have a large mean).
* ``dictionary_learning``: ``1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d)`` (``frac_variance_explained`` of
  saprmarks/dictionary_learning): blind to a constant offset ``x̂ = x + c``.
* ``openai_per_token``: ``1 − mean_t ‖x_t − x̂_t‖² / ‖x_t‖²`` (one minus the per-token normalised MSE of
  openai/sparse_autoencoder's ``normalized_mean_squared_error``): about zero, per token.

Evidence, strongest first: the producer and its version (SAE Lens writes ``eval_cfg.library_version`` in
``multiple_evals`` output; an SAEBench core result carries ``eval_type_id == "core"`` and
``sae_bench_commit_hash``; ``producer="sae_lens"`` names the SAE Lens installed here); the value itself (above 1
only the collapsed formula can be); the mean squared error against the mean input norm (the about-zero
denominator ``E‖x‖²`` is at least ``(E‖x‖)²``, so a pooled denominator below it excludes variance about zero);
and last the gap to the legacy per-token R², as a share of ``1 − legacy``. A correct pooled R² sits above the
legacy one by a share that depends on the data (:data:`LEGACY_GAP_RATIO`); the about-zero formulas move it
towards 1. When no evidence separates the formulas the verdict is *inconclusive*, which fails: a gate must not
silently pass a plausible wrong number. The message says what would decide it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, SupportsFloat

from pytest_saecheck.checks.workflow import CheckOutcome, Subject, conclude, finite_number, number_or_nan
from pytest_saecheck.checks.workflow import subject_of as _unwrap
from pytest_saecheck.errors import ConfigError
from pytest_saecheck.messages import fmt, table

if TYPE_CHECKING:
    import torch
    from packaging.version import Version

ASSERTION = "assert_r2_matches_legacy"

#: Upper edge of the pooled-vs-legacy gap of correct code, as a share of the legacy unexplained variance:
#: ``(R² − legacy) / (1 − legacy)``. Measured with ``benchmarks/r2_fingerprints.py`` (SAE Lens 6.54.12
#: ``run_evals`` on the demo model's blocks.1.hook_resid_post, 64 sequences × 64 tokens, batch sizes 8 and 32;
#: 16 SAEs: the demo SAEs, ``good`` noised ×3, offset, shrunk, and ``good``/``variance_only`` on activations
#: shifted to E‖x‖² = 0.1, 0.5, 0.91, 1.2 × d²; 32 runs, R² from −0.90 to 0.98): correct shares 0.036–0.363.
#: SAE Lens ``run_evals`` on gpt2-small layer 8 TopK (0.9413 vs legacy 0.8615): 0.576. The about-zero bug of
#: the bug report (0.98 vs 0.78): 0.91. 0.75 passes the highest correct share with a 1.30× margin (2.07× on the demo runs) and fails that
#: bug with a 1.21× margin. On the same activations the wrong formulas span 0.086–0.97 (about zero), 0.029–1.15
#: (collapsed), −0.04–0.97 (OpenAI per token): the gap alone cannot name them where the mean is small, so the
#: producer, the value and the norm test are read first.
LEGACY_GAP_RATIO = 0.75
#: The smallest allowed pooled-vs-legacy gap, for SAEs whose R² is close to 1.
MIN_LEGACY_TOL = 0.01
#: Default ``tol`` when a reported R² is compared with our own pooled R² (the same estimator on the same SAE;
#: differences come from other tokens or a different checkpoint, not from the formula).
DEFAULT_R2_TOL = 0.02
#: Relative slack of the norm test (``E‖x − x̂‖² / (1 − R²)`` against ``(E‖x‖)²``): float32 sums of run_evals.
NORM_SLACK = 1e-3

#: SAE Lens releases computing the collapsed formula: first bad, first fixed (bisected on the released evals.py).
SAE_LENS_COLLAPSED = ("5.8.0", "6.45.1")
#: SAE Lens releases whose ``mse`` is ``E‖x − x̂‖²`` divided by the tokens per eval batch: fixed in 6.45.2.
SAE_LENS_MSE_PER_BATCH_FIXED = "6.45.2"
#: SAEBench core releases computing the collapsed formula (0.6.0 is the latest release; none is fixed).
SAEBENCH_COLLAPSED = ("0.4.1", None)


@dataclass(frozen=True)
class Formula:
    """One way to compute an 'explained variance' that is in use."""

    key: str
    definition: str
    correct: bool


FORMULAS: dict[str, Formula] = {
    "pooled": Formula("pooled", "1 − E‖x − x̂‖² / (E‖x‖² − ‖E[x]‖²) over all tokens", True),
    "legacy": Formula("legacy", "mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄_batch‖²", False),
    "collapsed": Formula("collapsed", "1 − E‖x − x̂‖² / (E‖x‖² − (mean_d E[x_d²])²)", False),
    "about_zero": Formula("about_zero", "1 − E‖x − x̂‖² / E‖x‖²", False),
    "dictionary_learning": Formula("dictionary_learning", "1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d)", False),
    "openai_per_token": Formula("openai_per_token", "1 − mean over tokens of ‖x − x̂‖² / ‖x‖²", False),
}

#: The one home of the causes named in failure messages.
COLLAPSED_CAUSE = (
    "the explained-variance defect of SAE Lens 5.8.0–6.45.0 and SAEBench core 0.4.1–0.6.0: the total variance is "
    "E‖x‖² − (mean_d E[x_d²])², with E[x_d²] squared where E[x_d] was meant and the per-dimension means collapsed "
    "to one number (torch.cat where torch.stack was meant); added by SAE Lens PR #443 (ported from SAEBench PR #61), "
    "reported as SAE Lens issue #659. It reads about zero (inflated) when E‖x‖² ≪ d², near zero when E‖x‖² ≈ d², "
    "and above 1 when E‖x‖² > d². Fix: upgrade SAE Lens to ≥ 6.45.1 (ExplainedVarianceCalculator) and recompute; "
    "SAEBench has no fixed release: use its explained_variance_legacy, or recompute with SAE Lens ≥ 6.45.1 or "
    "pytest-saecheck"
)
ABOUT_ZERO_CAUSE = (
    "reported R² equals 1 − MSE/E‖x‖²: variance was computed about zero, not the mean (the collapsed formula of SAE "
    "Lens 5.8.0–6.45.0 and SAEBench core 0.4.1–0.6.0 reads so when E‖x‖² ≪ d²); it is inflated whenever activations "
    "have a large mean. Fix: subtract the mean of each dimension over all tokens (SAE Lens ≥ 6.45.1) and recompute"
)
DICTIONARY_LEARNING_CAUSE = (
    "dictionary_learning's frac_variance_explained = 1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d) subtracts the mean "
    "residual, so it is blind to a constant offset in the reconstruction (an SAE with x̂ = x + c scores 1): it "
    "exceeds R² by ‖E[x − x̂]‖² / Σ_d Var(x_d)"
)
OPENAI_PER_TOKEN_CAUSE = (
    "1 − normalized_mean_squared_error of openai/sparse_autoencoder is 1 − mean_t ‖x_t − x̂_t‖² / ‖x_t‖²: each "
    "token's error is divided by its squared norm about zero, not its distance from the mean, so it is inflated by "
    "the mean activation like the about-zero R²"
)
TRANSCODER_INPUT_HOOK_CAUSE = (
    "SAE Lens' run_evals measures every dictionary's reconstruction against the activation at its input hook "
    "(hook_name); a transcoder writes another hook (hook_name_out), so its R² from run_evals compares the output "
    "with the input it was never meant to reproduce (a transcoder measured 0.088 where the R² at the output hook "
    "is 0.977). Use this package's explained_variance, measured at hook_name_out"
)
CAUSES: dict[str, str] = {
    "collapsed": COLLAPSED_CAUSE,
    "about_zero": ABOUT_ZERO_CAUSE,
    "dictionary_learning": DICTIONARY_LEARNING_CAUSE,
    "openai_per_token": OPENAI_PER_TOKEN_CAUSE,
}

_EV_KEYS = ("explained_variance", "variance_explained", "r2", "r_squared")
_LEGACY_KEYS = ("explained_variance_legacy", "variance_explained_legacy")
_FVE_KEYS = ("frac_variance_explained",)
_NMSE_KEYS = ("normalized_mse", "normalized_mean_squared_error", "nmse")
_STAT_KEYS = ("mse", "l2_norm_in", "l2_norm_out", "cossim", "l2_loss")


def legacy_tolerance(legacy: float, tol: float | None) -> float:
    """The allowed |pooled − legacy| gap: ``tol`` when given, else ``LEGACY_GAP_RATIO × (1 − legacy)``, ≥ 0.01."""
    if tol is not None:
        return tol
    return max(MIN_LEGACY_TOL, LEGACY_GAP_RATIO * (1.0 - legacy))


# --------------------------------------------------------------------------------------------------------
# reference formulas (the measurement script and the tests compute every formula on the same activations)


def formula_values(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Every formula of :data:`FORMULAS` on ``batches`` of ``(x, x̂)`` tensors ``[tokens, d]``, in float64.

    ``legacy`` and ``collapsed`` depend on the batches (legacy: the batch mean; collapsed: per-batch means
    averaged, as the affected releases did); the others are over all tokens.
    """
    import torch

    xs = [x.double() for x, _ in batches]
    rs = [(x.double() - x_hat.double()) for x, x_hat in batches]
    x_all, r_all = torch.cat(xs), torch.cat(rs)
    n, d = x_all.shape
    sq_norm = x_all.pow(2).sum(dim=1)
    sq_resid = r_all.pow(2).sum(dim=1)
    centred = x_all - x_all.mean(dim=0)
    legacy = torch.cat(
        [1 - r.pow(2).sum(dim=1) / (x - x.mean(dim=0)).pow(2).sum(dim=1) for x, r in zip(xs, rs, strict=True)]
    )
    # the collapsed formula, from its description: per-batch E‖x‖² and the per-batch scalar mean_d E[x_d²]
    s_batch = torch.stack([x.pow(2).sum(dim=1).mean() for x in xs]).mean()
    m_batch = torch.stack([x.pow(2).mean(dim=0).mean() for x in xs]).mean()
    e_batch = torch.stack([r.pow(2).sum(dim=1).mean() for r in rs]).mean()
    values = {
        "pooled": 1 - sq_resid.sum() / centred.pow(2).sum(),
        "legacy": legacy.mean(),
        "collapsed": 1 - e_batch / (s_batch - m_batch**2),
        "about_zero": 1 - sq_resid.sum() / sq_norm.sum(),
        "dictionary_learning": 1
        - r_all.var(dim=0, unbiased=False).sum() / x_all.var(dim=0, unbiased=False).sum(),
        "openai_per_token": 1 - (sq_resid / sq_norm).mean(),
    }
    del n, d
    return {key: float(value) for key, value in values.items()}


# --------------------------------------------------------------------------------------------------------
# reading a reported mapping


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    """``value``'s leaves keyed by their path (``a/b/c``); a mapping's keys become segments."""
    flat: dict[str, object] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}/{key}" if prefix else str(key)))
    elif prefix:
        flat[prefix] = value
    return flat


def _split(key: str) -> tuple[str, str]:
    """``(namespace, last segment)`` of a flattened key; ``.`` and ``/`` both separate."""
    parts = key.replace(".", "/").rsplit("/", 1)
    return ("", parts[0].lower()) if len(parts) == 1 else (parts[0], parts[1].lower())


def _reported_mapping(metrics: object) -> Mapping[str, Any] | None:
    """The mapping of reported metrics ``metrics`` is, or None when it is not one."""
    # SAE Lens run_evals returns (metrics, feature_metrics); accept that tuple as is
    if isinstance(metrics, tuple) and metrics and isinstance(metrics[0], Mapping):
        return metrics[0]
    return metrics if isinstance(metrics, Mapping) else None


def _number(key: str, value: object, what: str) -> float:
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", None):
        raise ConfigError(
            f"reported {what} at {key!r} is a sequence, not one number; pass the aggregated value"
        )
    if isinstance(value, (bool, str)) or not isinstance(value, SupportsFloat):
        raise ConfigError(f"reported {what} at {key!r} is not a number: {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"reported {what} at {key!r} is not a number: {value!r}") from None


def _find_reported(metrics: Mapping[str, Any], names: tuple[str, ...], what: str) -> tuple[str, float] | None:
    """The one value of ``names`` in ``metrics`` (its key and value); ConfigError when several values differ."""
    flat = _flatten(metrics)
    values = {key: _number(key, value, what) for key, value in flat.items() if _split(key)[1] in names}
    if not values:
        return None
    distinct = {round(v, 12) for v in values.values() if not math.isnan(v)}
    if len(distinct) > 1:
        raise ConfigError(
            f"the reported metrics hold several different {what} values ({values}); pass the mapping of one SAE"
        )
    key = next(iter(values))
    return key, values[key]


@dataclass(frozen=True)
class Provenance:
    """Which code produced a report: ``library`` (``"sae_lens"``/``"sae_bench"``/``"pytest_saecheck"``, the last
    for this product's SAEBench-format export), its version, and how we know."""

    library: str
    version: str | None
    source: str

    def formula(self) -> str | None:
        """The formula this producer's explained_variance used, or ``None`` when the version is unknown."""
        if self.library == "sae_bench":
            return "collapsed"
        if self.library == "pytest_saecheck":
            return "pooled"
        if self.version is None:
            return None
        first_bad, first_fixed = SAE_LENS_COLLAPSED
        version = _version(self.version)
        if version is None:
            return None
        from packaging.version import Version

        if Version(first_bad) <= version < Version(first_fixed):
            return "collapsed"
        return "pooled" if version >= Version(first_fixed) else None

    def mse_is_per_token(self) -> bool | None:
        """Whether its ``mse`` is E‖x − x̂‖² (True), divided by the tokens per batch (False), or unknown."""
        if self.library == "sae_bench":
            return False
        if self.library == "pytest_saecheck":
            return True
        version = _version(self.version) if self.version else None
        if version is None:
            return None
        from packaging.version import Version

        return bool(version >= Version(SAE_LENS_MSE_PER_BATCH_FIXED))

    def describe(self) -> str:
        name = {"sae_lens": "SAE Lens", "sae_bench": "SAEBench core", "pytest_saecheck": "pytest-saecheck"}[
            self.library
        ]
        return f"{name}{' ' + self.version if self.version else ''} ({self.source})"


def _version(text: str | None) -> Version | None:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(text))
    except InvalidVersion:
        return None


def _provenance(flat: Mapping[str, Any], producer: str | None) -> Provenance | None:
    if producer is not None:
        name, _, version = producer.partition("==")
        library = name.strip().lower().replace("-", "_")
        if library in ("saelens", "sae_lens"):
            library = "sae_lens"
        elif library in ("saebench", "sae_bench"):
            library = "sae_bench"
        else:
            raise ConfigError(
                f"{ASSERTION}: producer={producer!r} is not known; use 'sae_lens' (the SAE Lens installed here), "
                "'sae_lens==X.Y.Z' or 'sae_bench==X.Y.Z'"
            )
        if version:
            if _version(version.strip()) is None:
                raise ConfigError(
                    f"{ASSERTION}: producer={producer!r} has no valid version after '=='; write it as "
                    "producer='sae_lens==6.36.2' (or 'sae_bench==0.6.0')"
                )
            return Provenance(library, version.strip(), f"producer={producer!r}")
        if library == "sae_lens":
            from importlib.metadata import PackageNotFoundError
            from importlib.metadata import version as installed

            try:
                return Provenance(
                    library, installed("sae-lens"), "producer='sae_lens': the installed SAE Lens"
                )
            except PackageNotFoundError:
                raise ConfigError(
                    f"{ASSERTION}: producer='sae_lens' names the installed SAE Lens, but none is installed; "
                    "give its version: producer='sae_lens==X.Y.Z'"
                ) from None
        return Provenance(library, None, f"producer={producer!r}")
    by_segment = {_split(key)[1]: (key, value) for key, value in flat.items()}
    if "saecheck_version" in by_segment:  # pytest-saecheck's SAEBench-format export: our pooled formula
        key, value = by_segment["saecheck_version"]
        return Provenance("pytest_saecheck", None if value is None else str(value), f"{key!r}")
    if "sae_bench_commit_hash" in by_segment or str(by_segment.get("eval_type_id", ("", ""))[1]) == "core":
        key = "sae_bench_commit_hash" if "sae_bench_commit_hash" in by_segment else "eval_type_id"
        return Provenance("sae_bench", None, f"{by_segment[key][0]!r} marks an SAEBench core result")
    if "library_version" in by_segment:
        key, value = by_segment["library_version"]
        return Provenance("sae_lens", str(value), f"{key!r}")
    return None


@dataclass
class Pair:
    """One reported explained variance with what sits beside it in its namespace."""

    namespace: str
    ev_key: str
    ev: float
    formula_key: str  # "explained_variance" style or "frac_variance_explained"
    legacy_key: str | None = None
    legacy: float | None = None
    stats: dict[str, float] = field(default_factory=dict)


def _pairs(flat: Mapping[str, Any]) -> list[Pair]:
    """Group the reported R² keys by namespace: each namespace holding an explained variance is one pair."""
    spaces: dict[str, dict[str, tuple[str, Any]]] = {}
    for key, value in flat.items():
        namespace, last = _split(key)
        spaces.setdefault(namespace, {})[last] = (key, value)
    pairs: list[Pair] = []
    loose_legacy: list[tuple[str, float]] = []
    for namespace, fields in spaces.items():
        ev = next(((fields[n], n) for n in _EV_KEYS + _FVE_KEYS if n in fields), None)
        legacy = next((fields[n] for n in _LEGACY_KEYS if n in fields), None)
        if ev is None:
            if legacy is not None:
                loose_legacy.append((legacy[0], _number(legacy[0], legacy[1], "legacy explained variance")))
            continue
        (ev_key, ev_value), name = ev
        pair = Pair(namespace, ev_key, _number(ev_key, ev_value, "explained variance"), name)
        if legacy is not None:
            pair.legacy_key, pair.legacy = (
                legacy[0],
                _number(legacy[0], legacy[1], "legacy explained variance"),
            )
        for stat in _STAT_KEYS + _NMSE_KEYS:
            if stat in fields:
                pair.stats[stat] = _number(fields[stat][0], fields[stat][1], stat)
        pairs.append(pair)
    # a flat mapping may keep the norms beside the pair's namespace (SAE Lens: shrinkage/ next to
    # reconstruction_quality/): take each statistic once when the whole mapping holds one value of it
    for stat in _STAT_KEYS + _NMSE_KEYS:
        values = {key: value for key, value in flat.items() if _split(key)[1] == stat}
        if len(values) == 1:
            key, value = next(iter(values.items()))
            for pair in pairs:
                pair.stats.setdefault(stat, _number(key, value, stat))
    unpaired = [pair for pair in pairs if pair.legacy is None]
    if len(unpaired) == 1 and len(loose_legacy) == 1 and len(pairs) == 1:
        unpaired[0].legacy_key, unpaired[0].legacy = loose_legacy[0]
    elif loose_legacy and len(pairs) > 1:
        raise ConfigError(
            f"the reported metrics hold several different explained variance values "
            f"({ {p.ev_key: p.ev for p in pairs} }) and a legacy value at {[k for k, _ in loose_legacy]} that "
            "belongs to none of them; pass the mapping of one SAE, or keep each pair in its own namespace"
        )
    return pairs


# --------------------------------------------------------------------------------------------------------
# judging one pair


@dataclass(frozen=True)
class Verdict:
    """The formula a reported R² was identified as (``None``: inconclusive), why, and whether it passes."""

    formula: str | None
    evidence: tuple[str, ...]
    passed: bool
    failure: str | None = None
    cause: str | None = None


def _judge(pair: Pair, provenance: Provenance | None, tol: float | None) -> Verdict:
    """The formula of ``pair``: from what the report says of itself (NaN, its keys, a normalised MSE, a value no
    R² can take, its producer), else from the numbers (the norm test, the gap to the legacy R²)."""
    return _judge_by_report(pair, provenance) or _judge_by_numbers(pair, provenance, tol)


def _judge_by_report(pair: Pair, provenance: Provenance | None) -> Verdict | None:
    """The verdict that needs no comparison with the legacy R², or None."""
    ev, legacy = pair.ev, pair.legacy
    evidence: list[str] = []
    if math.isnan(ev) or (legacy is not None and math.isnan(legacy)):
        which = pair.ev_key if math.isnan(ev) else pair.legacy_key
        return Verdict(None, (), False, f"{which} is NaN")
    if pair.formula_key in _FVE_KEYS:
        return _judge_dictionary_learning(pair)
    nmse = next((pair.stats[k] for k in _NMSE_KEYS if k in pair.stats), None)
    if nmse is not None and abs(ev - (1.0 - nmse)) <= 1e-6:
        return Verdict(
            "openai_per_token",
            (f"{pair.ev_key} = 1 − {fmt(nmse)} (the reported normalised MSE) to 1e-6",),
            False,
            f"{pair.ev_key} = {fmt(ev)} is one minus the per-token normalised MSE, not an R²",
            "openai_per_token",
        )
    if legacy is not None and legacy > 1.0 + 1e-9:
        return Verdict(
            None,
            (),
            False,
            f"{pair.legacy_key} = {fmt(legacy)} is above 1, which no R² can be (each token's legacy term is at most 1)",
        )
    known = provenance.formula() if provenance is not None else None
    if known == "collapsed":
        evidence.append(f"producer: {provenance.describe()}")  # type: ignore[union-attr]
        if ev > 1.0 + 1e-9:
            evidence.append(
                f"{pair.ev_key} = {fmt(ev)} is above 1: E‖x‖² > d², the total variance came out negative"
            )
        return Verdict(
            "collapsed",
            tuple(evidence),
            False,
            f"{pair.ev_key} = {fmt(ev)} was computed with the collapsed total variance E‖x‖² − (mean_d E[x_d²])²",
            "collapsed",
        )
    if ev > 1.0 + 1e-9:
        return Verdict(
            "collapsed",
            (
                f"{pair.ev_key} = {fmt(ev)} is above 1: no R² can be, and of the formulas in use only the collapsed "
                "one exceeds 1 (when E‖x‖² > d² its total variance is negative)",
            ),
            False,
            f"{pair.ev_key} = {fmt(ev)} is above 1, which no R² can be",
            "collapsed",
        )
    if known == "pooled":
        evidence.append(f"producer: {provenance.describe()} computes the pooled R²")  # type: ignore[union-attr]
        return Verdict("pooled", tuple(evidence), True)
    return None


def _judge_by_numbers(pair: Pair, provenance: Provenance | None, tol: float | None) -> Verdict:
    """The verdict from the norm test and the gap between the reported R² and the legacy R² beside it."""
    ev, legacy = pair.ev, pair.legacy
    evidence: list[str] = []
    if legacy is None:
        raise ConfigError(
            f"{ASSERTION}: the reported metrics hold no explained_variance_legacy beside {pair.ev_key!r}; pass SAE Lens "
            "run_evals output, an SAEBench core result, or a dict with both explained_variance and "
            "explained_variance_legacy (or compare with ours: assert_r2_matches_legacy(saecheck, reported=...))"
        )
    # the numbers alone: the norm test, then the gap to the legacy R²
    difference = ev - legacy
    ratio = difference / (1.0 - legacy) if legacy < 1.0 else (0.0 if difference == 0 else math.inf)
    allowed = legacy_tolerance(legacy, tol)
    norm = _norm_test(pair, provenance)
    if norm is not None:
        evidence.append(norm[1])
    about_zero_excluded = norm is not None and norm[0]
    gap = (
        f"gap {pair.ev_key} − {pair.legacy_key} = {fmt(difference)}"
        + (f" = {ratio:.3f} × (1 − legacy)" if math.isfinite(ratio) else "")
        + f", allowed {fmt(allowed)}"
        + (
            ""
            if tol is not None
            else f" ({LEGACY_GAP_RATIO} × (1 − legacy), above every correct pipeline measured)"
        )
    )
    evidence.append(gap)
    if abs(difference) <= allowed:
        return Verdict("pooled", tuple(evidence), True)
    if difference < 0:
        return Verdict(
            None,
            tuple(evidence),
            False,
            f"{pair.legacy_key} = {fmt(legacy)} exceeds {pair.ev_key} = {fmt(ev)} by {fmt(-difference)} > tol "
            f"{fmt(allowed)}",
            "legacy_above",
        )
    if about_zero_excluded:
        return Verdict(
            None,
            tuple(evidence),
            False,
            f"inconclusive: {pair.ev_key} = {fmt(ev)} exceeds {pair.legacy_key} = {fmt(legacy)} by {fmt(difference)} "
            f"> tol {fmt(allowed)}, more than correct pipelines measured, yet its denominator is below (E‖x‖)², so "
            "it is not variance about zero",
            "inconclusive",
        )
    return Verdict(
        "about_zero",
        tuple(evidence),
        False,
        f"{pair.ev_key} = {fmt(ev)} and {pair.legacy_key} = {fmt(legacy)} differ by {fmt(difference)} > tol {fmt(allowed)}",
        "about_zero",
    )


def _norm_test(pair: Pair, provenance: Provenance | None) -> tuple[bool, str] | None:
    """``(about zero excluded, evidence)`` from mse and l2_norm_in, or ``None`` when the report lacks them.

    The about-zero denominator is E‖x‖² ≥ (E‖x‖)² (Jensen), so ``D = E‖x − x̂‖² / (1 − R²)`` below
    ``(E‖x‖)²`` excludes it. ``mse`` is E‖x − x̂‖² only in SAE Lens ≥ 6.45.2; older releases and SAEBench divide
    it by the tokens per batch. Without the version, ``mse`` is used only when it passes the triangle inequality
    E‖x − x̂‖² ≥ (E‖x‖ − E‖x̂‖)².
    """
    mse, norm_in = pair.stats.get("mse"), pair.stats.get("l2_norm_in")
    if mse is None or norm_in is None or not (pair.ev < 1.0) or norm_in <= 0:
        return None
    per_token = provenance.mse_is_per_token() if provenance is not None else None
    if per_token is False:
        return None
    norm_out = pair.stats.get("l2_norm_out")
    if per_token is None and norm_out is not None and mse < (norm_in - norm_out) ** 2 * (1 - NORM_SLACK):
        return None  # mse is not E‖x − x̂‖² (divided by the tokens per batch): it says nothing here
    denominator = mse / (1.0 - pair.ev)
    share = denominator / norm_in**2
    if share < 1.0 - NORM_SLACK:
        return True, (
            f"mse / (1 − R²) = {fmt(denominator)} is {share:.3f} × (E‖x‖)² = {fmt(norm_in**2)}: below E‖x‖², so the "
            "denominator is not E‖x‖²: not variance about zero (the collapsed formula is not excluded)"
        )
    return False, (
        f"mse / (1 − R²) = {fmt(denominator)} is {share:.3f} × (E‖x‖)²: at least E‖x‖²'s lower bound, as variance "
        "about zero would be"
    )


def _judge_dictionary_learning(pair: Pair) -> Verdict:
    return Verdict(
        None,
        (f"{pair.ev_key!r} is dictionary_learning's frac_variance_explained",),
        False,
        f"inconclusive: {pair.ev_key} = {fmt(pair.ev)} is 1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d), blind to a constant "
        "offset in the reconstruction, and the report carries nothing that measures the offset",
        "dictionary_learning",
    )


# --------------------------------------------------------------------------------------------------------
# the assertion


def assert_r2_matches_legacy(
    check_or_metrics: Any, *, tol: float | None = None, reported: Any = None, producer: str | None = None
) -> None:
    """Assert that a reported explained variance (R²) was computed with the right formula, and name it if not.

    * ``assert_r2_matches_legacy(saecheck)``: our pooled ``explained_variance`` against our
      ``explained_variance_legacy`` (SAE Lens' per-token formula) on the same tokens.
    * ``assert_r2_matches_legacy(reported_metrics)``: a mapping of reported metrics (SAE Lens ``run_evals``
      output, nested, flat or the ``(metrics, feature_metrics)`` tuple; ``multiple_evals`` output; an SAEBench
      core result; a wandb summary; dictionary_learning's ``evaluate`` output; a plain dict). Every namespace
      holding an explained variance is one pair, judged on its own (a wandb summary holds ``metrics/`` and
      ``reconstruction_quality/``). Each is identified as one formula of :data:`FORMULAS` from the producer and
      version the mapping names (or ``producer=``: ``"sae_lens"`` for the SAE Lens installed here,
      ``"sae_lens==X.Y.Z"``, ``"sae_bench==X.Y.Z"``), the value, ``mse`` against ``l2_norm_in``, and the gap to
      the legacy R²; the message says which evidence decided. Only the pooled formula passes; an inconclusive
      verdict fails with its reason.
    * ``assert_r2_matches_legacy(saecheck, reported=0.98)`` (or ``reported=<mapping>``): a reported R² against
      our own computation on the same SAE.

    ``tol`` is the largest absolute pooled-vs-legacy difference that passes; default ``LEGACY_GAP_RATIO × (1 −
    legacy)``, at least 0.01 (:data:`LEGACY_GAP_RATIO`), and :data:`DEFAULT_R2_TOL` when a reported R² is
    compared with ours. Sources of the formulas: see this module's docstring.

    Raises:
        AssertionError: the reported R² is not the pooled formula, is inconclusive, NaN or above 1.
        ConfigError: bad ``tol``/``producer``, or a mapping without an explained variance and its legacy value.
    """
    __tracebackhide__ = True
    if tol is not None:
        tol = finite_number("tol", tol)
        if tol < 0:
            raise ConfigError(f"{ASSERTION}: tol must not be negative, got {tol}")
    mapping = _reported_mapping(check_or_metrics)
    if mapping is not None and reported is not None:
        raise ConfigError(
            f"{ASSERTION}: reported= compares a reported number with our own computation, so the first argument "
            "must be the saecheck fixture (or an Evaluation), not a mapping"
        )
    if mapping is not None:
        outcome = _r2_reported(mapping, tol, producer)
    else:
        evaluation, facts = _unwrap(check_or_metrics)
        del evaluation, check_or_metrics
        outcome = _r2_ours(facts, tol) if reported is None else _r2_reported_vs_ours(facts, reported, tol)
    conclude(outcome)


def _r2_reported(metrics: Mapping[str, Any], tol: float | None, producer: str | None) -> CheckOutcome:
    flat = _flatten(metrics)
    pairs = _pairs(flat)
    if not pairs:
        keys = sorted(flat)
        raise ConfigError(
            f"{ASSERTION}: the reported metrics hold no explained_variance (keys found: {keys[:20]}); pass SAE "
            "Lens run_evals output, an SAEBench core result, or a dict with both explained_variance and "
            "explained_variance_legacy"
        )
    provenance = _provenance(flat, producer)
    verdicts = [(pair, _judge(pair, provenance, tol)) for pair in pairs]
    failures = tuple(v.failure for _, v in verdicts if v.failure)
    details: list[str] = []
    if failures:
        rows: list[tuple[str, ...]] = [("", "reported", "formula identified", "decided by")]
        for pair, verdict in verdicts:
            rows.append(
                (pair.ev_key, fmt(pair.ev), verdict.formula or "inconclusive", "; ".join(verdict.evidence))
            )
            if pair.legacy_key is not None:
                rows.append((pair.legacy_key, fmt(pair.legacy), "legacy (per-token)", ""))
        details += table(rows)
        if len(pairs) > 1:
            details.append(
                "  "
                + f"{len(pairs)} explained variances checked, one per namespace: "
                + ", ".join(repr(p.namespace or "(top level)") for p in pairs)
            )
        for pair, verdict in verdicts:
            if not verdict.passed:
                details.append("  " + _explain(pair, verdict))
    first = pairs[0]
    return CheckOutcome(
        assertion=ASSERTION,
        label=None,
        failures=failures,
        details=tuple(details),
        metric="explained_variance",
        value=first.ev,
        fields={
            "mode": "reported",
            "legacy": first.legacy,
            "keys": [first.ev_key, first.legacy_key],
            "tol": legacy_tolerance(first.legacy, tol) if first.legacy is not None else tol,
            "producer": provenance.describe() if provenance is not None else None,
            "pairs": [
                {
                    "namespace": pair.namespace,
                    "keys": [pair.ev_key, pair.legacy_key],
                    "value": pair.ev,
                    "legacy": pair.legacy,
                    "formula": verdict.formula,
                    "evidence": list(verdict.evidence),
                    "passed": verdict.passed,
                }
                for pair, verdict in verdicts
            ],
        },
    )


def _explain(pair: Pair, verdict: Verdict) -> str:
    where = f"{pair.ev_key}: "
    cause = verdict.cause
    if cause in CAUSES:
        fix = ""
        if cause == "dictionary_learning":
            fix = (
                ". To decide, compare with ours on the same SAE and tokens: assert_r2_matches_legacy(saecheck, "
                "reported=<this mapping>)"
            )
        return f"{pair.ev_key} is the wrong number. Likely cause: {CAUSES[cause]}{fix}."
    if cause == "legacy_above":
        return (
            f"{where}{pair.legacy_key} exceeds {pair.ev_key}. The about-zero formulas inflate the pooled number, so "
            "this direction points elsewhere: the two were likely computed on different tokens (BOS / position 0 "
            "or padding included in one only), with activation normalisation applied to one, or the legacy mean "
            "was taken over very small batches. Recompute both on the same tokens with "
            "assert_r2_matches_legacy(saecheck, reported=...)."
        )
    if cause == "inconclusive":
        return (
            f"{where}no evidence in the report tells the formula: name the producer (producer='sae_lens==X.Y.Z'), "
            "or compare with ours on the same SAE and tokens: assert_r2_matches_legacy(saecheck, reported=...)."
        )
    return f"{where}the reported number is not a variance-explained number."


def _r2_ours(facts: Subject, tol: float | None) -> CheckOutcome:
    ours = facts.metrics.get("explained_variance")
    legacy = facts.metrics.get("explained_variance_legacy")
    about_zero = facts.metrics.get("explained_variance_about_zero")
    fields: dict[str, Any] = {
        **facts.subject,
        "mode": "ours",
        "legacy": legacy,
        "about_zero": about_zero,
        "n_tokens": facts.n_tokens,
    }
    outcome: dict[str, Any] = {
        "assertion": ASSERTION,
        "label": facts.label,
        "metric": "explained_variance",
        "value": ours,
    }
    if ours is None or legacy is None:
        missing = "explained_variance" if ours is None else "explained_variance_legacy"
        reason = facts.undefined.get(missing, "not computed")
        return CheckOutcome(**outcome, failures=(f"{missing} is undefined: {reason}",), fields=fields)
    problem = _above_one("explained_variance", ours) or _above_one("explained_variance_legacy", legacy)
    difference = ours - legacy
    fields["tol"] = allowed = legacy_tolerance(legacy, tol)
    if problem is None and abs(difference) <= allowed:
        return CheckOutcome(**outcome, fields=fields)
    details = [
        *table(
            [
                ("explained_variance", fmt(ours), "1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over all tokens (correct R²)"),
                (
                    "explained_variance_legacy",
                    fmt(legacy),
                    "mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄_batch‖² (SAE Lens legacy)",
                ),
                (
                    "explained_variance_about_zero",
                    fmt(about_zero),
                    "1 − Σ‖x − x̂‖² / Σ‖x‖² (what the about-zero bug reports)",
                ),
            ]
        ),
        "  " + facts.tokens_line(),
        "  Both numbers come from one pass of our engine over the same tokens, so neither is a computation bug: "
        "the two estimators disagree on this SAE. "
        + (
            "The per-token legacy mean is pulled down by tokens whose activation lies close to the batch mean "
            "(tiny denominators), so the pooled R² looks better than the typical token's reconstruction."
            if difference > 0
            else "The pooled R² is pulled down by a few high-variance tokens or directions the SAE reconstructs "
            "badly, while most tokens are reconstructed well."
        )
        + " A reported R² for this SAE is not trustworthy on its own: gate on assert_ce_recovery instead, or "
        "raise tol after checking which tokens dominate.",
    ]
    failure = problem or (
        f"explained_variance and explained_variance_legacy differ by {fmt(abs(difference))} > tol {fmt(allowed)}"
    )
    return CheckOutcome(**outcome, failures=(failure,), details=tuple(details), fields=fields)


def _above_one(name: str, value: float) -> str | None:
    if math.isnan(value):
        return f"{name} is NaN"
    if value > 1.0 + 1e-9:
        return f"{name} = {fmt(value)} is above 1, which no R² can be"
    return None


def _reported_value(reported: object) -> tuple[str, float, bool]:
    """``(where, value, whether it is dictionary_learning's frac_variance_explained)`` of ``reported=``: a number,
    or a mapping holding one explained variance."""
    mapping = _reported_mapping(reported)
    if mapping is None:
        return "reported", number_or_nan("reported", reported), False
    found = _find_reported(mapping, _EV_KEYS, "explained variance")
    is_fve = False
    if found is None:
        found = _find_reported(mapping, _FVE_KEYS, "explained variance")
        is_fve = found is not None
    if found is None:
        raise ConfigError(
            f"{ASSERTION}: reported= is a mapping without explained_variance; pass the number or the metrics "
            "mapping that holds it"
        )
    source, value = found
    return source, number_or_nan("reported", value), is_fve


def _r2_reported_vs_ours(facts: Subject, reported: object, tol: float | None) -> CheckOutcome:
    tol = DEFAULT_R2_TOL if tol is None else tol
    source, value, is_fve = _reported_value(reported)
    ours = facts.metrics.get("explained_variance")
    legacy = facts.metrics.get("explained_variance_legacy")
    about_zero = facts.metrics.get("explained_variance_about_zero")
    fields = {
        **facts.subject,
        "mode": "reported_vs_ours",
        "reported": value,
        "legacy": legacy,
        "about_zero": about_zero,
        "n_tokens": facts.n_tokens,
        "tol": tol,
    }
    outcome: dict[str, Any] = {
        "assertion": ASSERTION,
        "label": facts.label,
        "metric": "explained_variance",
        "value": ours,
    }
    if ours is None:
        reason = facts.undefined.get("explained_variance", "not computed")
        return CheckOutcome(
            **outcome, failures=(f"our explained_variance is undefined: {reason}",), fields=fields
        )
    problem = _above_one(source, value)
    if problem is None and abs(value - ours) <= tol:
        return CheckOutcome(**outcome, fields=fields)
    rows = table(
        [
            (f"reported ({source})" if source != "reported" else "reported", fmt(value), ""),
            ("explained_variance (ours)", fmt(ours), "1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ over all tokens"),
            (
                "explained_variance_legacy (ours)",
                fmt(legacy),
                "mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄_batch‖²",
            ),
            ("explained_variance_about_zero (ours)", fmt(about_zero), "1 − Σ‖x − x̂‖² / Σ‖x‖²"),
        ]
    )
    verdict = _reported_verdict(facts, value, ours, tol, problem, is_fve)
    failure = (
        f"reported R² {fmt(value)} differs from ours {fmt(ours)} by {fmt(abs(value - ours))} > tol {fmt(tol)}"
    )
    return CheckOutcome(
        **outcome,
        failures=(failure,),
        details=(*rows, "  " + facts.tokens_line(), "  " + verdict),
        fields=fields,
    )


def _reported_verdict(
    facts: Subject, value: float, ours: float, tol: float, problem: str | None, is_fve: bool
) -> str:
    """Why a reported R² differs from ours: the likeliest cause the numbers point to."""
    legacy = facts.metrics.get("explained_variance_legacy")
    about_zero = facts.metrics.get("explained_variance_about_zero")
    if facts.dictionary.get("kind") in ("transcoder", "skip_transcoder"):
        return (
            f"the SAE is a transcoder ({facts.dictionary.get('hook_name')} → {facts.dictionary.get('hook_name_out')})"
            f"; likely cause: {TRANSCODER_INPUT_HOOK_CAUSE}."
        )
    if problem is not None:
        return f"the reported number is wrong: {problem}; likely cause: {COLLAPSED_CAUSE}."
    if (
        about_zero is not None
        and abs(value - about_zero) <= tol
        and abs(value - about_zero) < abs(value - ours)
    ):
        return f"the reported number is wrong: {ABOUT_ZERO_CAUSE}."
    if legacy is not None and abs(value - legacy) <= tol:
        return (
            "the reported number is the legacy per-token formula (mean of 1 − ‖x − x̂‖²/‖x − x̄_batch‖²), not the "
            "pooled R²; label it explained_variance_legacy, or report 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²."
        )
    if is_fve and value > ours:
        return (
            f"the reported number is wrong for this SAE: {DICTIONARY_LEARNING_CAUSE}; it exceeds ours, so the "
            "reconstruction carries a constant offset of squared norm about "
            f"{fmt(value - ours)} × the total variance."
        )
    return (
        "the reported number matches none of the formulas computed here. Likely causes: it was computed on other "
        "tokens (another dataset, context size, or with BOS / position 0 included), with activation "
        "normalisation (normalize_activations) applied on one side only, or for another SAE checkpoint."
    )


__all__: Sequence[str] = (
    "ABOUT_ZERO_CAUSE",
    "CAUSES",
    "COLLAPSED_CAUSE",
    "DEFAULT_R2_TOL",
    "FORMULAS",
    "LEGACY_GAP_RATIO",
    "MIN_LEGACY_TOL",
    "TRANSCODER_INPUT_HOOK_CAUSE",
    "assert_r2_matches_legacy",
    "formula_values",
    "legacy_tolerance",
)
