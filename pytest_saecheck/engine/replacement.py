"""The replacement model of a cross-layer transcoder: every MLP output replaced at once, streamed over tokens.

Per batch of tokens:

1. the original model runs once, capturing every layer's MLP input (the CLT's read point) and MLP output; its
   log-probs are prepared once (``scoring.prepare_original``);
2. **each layer alone**: the CLT's features read the original model's inputs at every layer; layer ``l``'s
   reconstruction ``Σ_{s ≤ l} z_s W_dec[s→l] + b_dec[l] (+ skip)`` is scored against the original MLP output
   (R², mse, L0 of that layer on clean inputs), and (with ``alone=True``) spliced in at layer ``l`` only, the
   rest of the model untouched (ΔCE of that layer alone, one forward per layer);
3. **the replacement**: one forward with every MLP output replaced at once; features at layer ``l`` read the
   MLP input of the model *with the layers below already replaced*, and each layer's reconstruction is scored
   against the MLP output the model itself computes at that point (R², mse, L0 inside the replacement). Layers
   in ``keep_layers`` keep the model's own MLP output (their features still read and write to later layers).

Positions the token policy excludes are neither replaced nor averaged (as for every splice). Sums are float64
per sequence (``engine.accumulate``); every metric comes from ``pytest_saecheck.metrics`` and intervals from a
paired bootstrap over sequences. The model is reached only through :class:`~pytest_saecheck.engine.cut.ModelCut`
(either backend), the points through the hook-point resolver (:func:`clt_sites`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pytest_saecheck.clt import CrossLayerTranscoder, layer_name
from pytest_saecheck.defaults import DEFAULT_BATCH_SIZE
from pytest_saecheck.engine.accumulate import Accumulator, totals
from pytest_saecheck.engine.backends import cut_for
from pytest_saecheck.engine.compounding import compounding
from pytest_saecheck.engine.cut import ModelCut, Site
from pytest_saecheck.engine.finish import note_compute_fraction, settle_compute_fraction
from pytest_saecheck.engine.plan import check_tokens
from pytest_saecheck.engine.progress import progress_bar
from pytest_saecheck.engine.result import Evaluation
from pytest_saecheck.engine.splice import at_kept
from pytest_saecheck.errors import ConfigError, HookNotFoundError, SAECheckWarning
from pytest_saecheck.hookpoints import HookRecord, resolve_points
from pytest_saecheck.metrics import METRIC_NAMES, metrics_from_sums
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.scaling import DEFAULT_LAW, ScalingLaw, as_scaling_law
from pytest_saecheck.scoring import chunk_rows_for, prepare_original, score_batch

REPLACEMENT_METRICS = ("ce_orig", "ce_sae", "delta_ce", "ce_rec", "kl_sae", "compute_fraction")
"""The metrics of a whole replacement (and of one layer spliced alone)."""

LAYER_METRICS = ("explained_variance", "mse", "cosine_sim", "relative_error_norm", "l2_ratio", "l0", "l1")
"""Reconstruction metrics reported per layer, inside the replacement and on the original model's inputs."""

RECONSTRUCTION_EXTRAS = (
    "explained_variance_legacy",
    "explained_variance_about_zero",
    "alive_fraction",
    "participation_ratio",
    "participation_ratio_deflated",
)
"""Other per-dictionary reconstruction metrics, not reported for a replacement (see ``members``)."""


def evaluate_replacement(
    model: Any,
    clt: CrossLayerTranscoder,
    tokens: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    policy: TokenPolicy | None = None,
    scaling_law: ScalingLaw | str | tuple[float, float] | None = DEFAULT_LAW,
    keep_layers: Sequence[int] = (),
    alone: bool = True,
    progress: bool | None = None,
    backend: str = "auto",
) -> Evaluation:
    """Evaluate the replacement model of ``clt`` in ``model`` on ``tokens`` (``[n_sequences, seq_len]`` ids).

    Returns the :class:`Evaluation` of the whole replacement: ``metrics`` hold ``delta_ce``, ``kl_sae``,
    ``ce_rec``, ``compute_fraction`` against the original (paired bootstrap intervals over sequences);
    ``members["layer l"]`` each layer's reconstruction inside the replacement (``explained_variance``, ``mse``,
    ``l0``, ...), the same on the original model's inputs (suffix ``_alone``) and, with ``alone=True``, that
    layer's ``delta_ce_alone`` / ``kl_sae_alone``; ``layers["layer l"]`` is layer ``l`` spliced alone (an
    :class:`Evaluation`, for per-layer gates); ``compounding`` compares the replacement's ΔCE with the sum of the
    layers' ΔCE alone (:func:`pytest_saecheck.engine.compounding.compounding`); ``dictionary`` the CLT's record
    and ``weight_peak_bytes``, the most bytes of CLT weights alive at once (measured).

    ``keep_layers``: layers whose MLP output stays the model's own. ``policy``: the token policy (default:
    :class:`TokenPolicy`'s). ``alone=False`` skips the per-layer splices (one forward per layer per batch).
    ``backend``: how the model is reached (:func:`pytest_saecheck.engine.backends.cut_for`): a TransformerLens
    ``HookedTransformer`` or a Hugging Face causal language model (points: :func:`clt_sites`).

    Raises :class:`ConfigError` (a layer count or keep layer the model does not have, a weight budget too small),
    :class:`HookNotFoundError` (a read or write point that does not fire in order), :class:`ShapeMismatchError`.
    """
    started = time.perf_counter()
    law = as_scaling_law(scaling_law)
    cut = cut_for(model, backend)
    n_layers = cut.n_layers
    if clt.n_layers != n_layers:
        raise ConfigError(
            f"the CLT has {clt.n_layers} layers but the model has {n_layers}: a replacement replaces every MLP, so "
            f"the CLT must have been trained on this model ({clt.record.model_name or 'model not recorded'})"
        )
    keep = sorted({int(layer) for layer in keep_layers})
    if any(not 0 <= layer < n_layers for layer in keep):
        raise ConfigError(f"keep_layers {keep} must name layers of the model (0..{n_layers - 1})")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    clt.check_budget()
    model_hooks = cut.check()
    policy = (policy or TokenPolicy()).resolved_for(cut)
    tokens = check_tokens(cut, tokens, policy)
    try:
        reads, writes = clt_sites(cut, clt)
    except HookNotFoundError as error:
        raise type(error)(
            f"{error} (a point where the CLT ({clt.record.format}, {clt.record.path}) reads or writes; check that "
            f"the CLT was trained on this model: {clt.record.model_name or 'model not recorded'})"
        ) from None
    run = _Replacement(cut, clt, reads, writes, policy, batch_size, law, keep, alone)
    with torch.inference_mode(), cut.prepared([*reads, *writes]):
        result = run.run(tokens, progress)
    duration = time.perf_counter() - started
    layers = {name: layer.finished(model_hooks, duration) for name, layer in result.layers.items()}
    result = replace(result.finished(model_hooks, duration), layers=layers)
    for message in result.warnings:
        warnings.warn(message, SAECheckWarning, stacklevel=2)
    return result


def clt_sites(cut: ModelCut, clt: CrossLayerTranscoder) -> tuple[list[Site], list[Site]]:
    """Each layer's read and write :class:`Site` on ``cut``, from the CLT's record through the hook-point resolver
    (:func:`pytest_saecheck.hookpoints.resolve_points`, as for every dictionary): on a module tree the Hugging Face
    points where the release records them, else its TransformerLens names placed by the architecture's map; on a
    ``HookedTransformer`` the TransformerLens names, a norm's output (``CLTRecord.norm_output``) read through
    :meth:`ModelCut.norm_output_site`.

    Raises :class:`HookNotFoundError` / :class:`~pytest_saecheck.errors.NoFaithfulPointError` for a point the
    backend does not have, :class:`ConfigError` for a norm output the model folded away.
    """
    record = clt.record
    reads: list[Site] = []
    writes: list[Site] = []
    for layer in range(clt.n_layers):
        hf_in = record.hf_hook_names_in[layer] if record.hf_hook_names_in else None
        hf_out = record.hf_hook_names_out[layer] if record.hf_hook_names_out else None
        names = HookRecord(record.hook_names_in[layer], record.hook_names_out[layer])
        if cut.backend != "transformer_lens":  # where it was trained, when the release records it
            names = HookRecord(names.hook_name, names.hook_name_out, hf_in, hf_out)
        points = resolve_points(names, cut.model, transcoder=True)
        read = cut.site(points.read.point, None)
        if record.norm_output and cut.backend == "transformer_lens":
            read = cut.norm_output_site(read)
        reads.append(read)
        writes.append(cut.site(points.write.point, None))
    return reads, writes


def _add(written: list[torch.Tensor | None], target: int, part: torch.Tensor) -> None:
    """Add what one source layer writes into layer ``target`` to the running sum."""
    previous = written[target]
    written[target] = part if previous is None else previous + part.to(previous.device)


class _Replacement:
    """One streaming pass: the original, each layer alone, and the whole replacement, per batch."""

    def __init__(
        self,
        cut: ModelCut,
        clt: CrossLayerTranscoder,
        reads: Sequence[Site],
        writes: Sequence[Site],
        policy: TokenPolicy,
        batch_size: int,
        law: ScalingLaw | None,
        keep: Sequence[int],
        alone: bool,
    ) -> None:
        self.cut, self.clt, self.policy, self.batch_size, self.law = cut, clt, policy, batch_size, law
        self.keep = set(keep)
        self.alone = alone
        self.reads, self.writes = list(reads), list(writes)
        self.chunk_rows = chunk_rows_for(cut.d_vocab_out, cut.output_device)

    def _accumulator(self, seq_len: int, layer: int | None) -> Accumulator:
        width = None if layer is None else self.clt.d_sae[layer]
        device = self.cut.output_device if layer is None else self.cut.device_at(self.reads[layer])
        return Accumulator(seq_len, width, self.cut.output_device, device)

    def run(self, tokens: torch.Tensor, progress: bool | None) -> Evaluation:
        n, seq_len = self.clt.n_layers, tokens.shape[1]
        self.replacement = self._accumulator(seq_len, None)
        self.inside = [self._accumulator(seq_len, layer) for layer in range(n)]
        self.clean = [self._accumulator(seq_len, layer) for layer in range(n)]
        self.spliced_alone = [self._accumulator(seq_len, None) for _ in range(n)] if self.alone else []
        kept_all, predicted_all = self.policy.kept_mask(tokens), self.policy.prediction_mask(tokens)
        sites = [*self.reads, *self.writes]
        bar = progress_bar(int(kept_all.sum()), "saecheck replacement", progress)
        try:
            for start in range(0, tokens.shape[0], self.batch_size):
                rows = slice(start, start + self.batch_size)
                batch, kept, predicted = tokens[rows], kept_all[rows], predicted_all[rows]
                captured_run = self.cut.capture(batch, sites)
                if start == 0:
                    self._check_order(captured_run.order)
                original = prepare_original(
                    self.cut.logits(captured_run.take_final()),
                    batch,
                    in_place=True,
                    chunk_rows=self.chunk_rows,
                )
                captured = captured_run.captured
                del captured_run
                self._alone_batch(batch, kept, predicted, original, captured)
                del captured
                self._replacement_batch(batch, kept, predicted, original)
                del original
                for acc in [self.replacement, *self.inside, *self.clean, *self.spliced_alone]:
                    acc.end_batch()
                bar.update(int(kept.sum()))
        finally:
            bar.close()
        return self._finish(tokens)

    def _check_order(self, order: Sequence[str]) -> None:
        position = {name: index for index, name in enumerate(order)}
        names = [
            (read.hook_name, write.hook_name) for read, write in zip(self.reads, self.writes, strict=True)
        ]
        for layer, (read, write) in enumerate(names):
            if position[read] >= position[write] or (
                layer and position[names[layer - 1][1]] > position[read]
            ):
                raise HookNotFoundError(
                    f"the CLT reads layer {layer} at {read!r} and writes it at {write!r}, but in this model the hooks "
                    "do not fire in the order read l, write l, read l+1: the recorded points are not the MLP's input "
                    "and output, so the replacement cannot be spliced faithfully"
                )

    def _splice(
        self, layer: int, activation: torch.Tensor, recon: torch.Tensor, kept: torch.Tensor
    ) -> torch.Tensor:
        """Layer ``layer``'s written activation: ``recon`` at the kept positions, the model's own elsewhere."""
        return self.writes[layer].write_back(activation, at_kept(activation, recon, kept))

    def _score(
        self, acc: Accumulator, logits: torch.Tensor, original: Any, kept: Any, predicted: Any
    ) -> None:
        scores = score_batch(original, {"sae": logits}, {}, kl_for=("sae",), chunk_rows=self.chunk_rows)
        acc.add_scores(scores, kept, predicted)

    def _alone_batch(
        self,
        batch: torch.Tensor,
        kept: torch.Tensor,
        predicted: torch.Tensor,
        original: Any,
        captured: dict[str, torch.Tensor],
    ) -> None:
        """Features on the original inputs: each layer's reconstruction, and each layer spliced alone."""
        clt, n = self.clt, self.clt.n_layers
        written: list[torch.Tensor | None] = [None] * n
        for source in range(n):
            x_in = self.reads[source].select(captured[self.reads[source].hook_name])
            z = clt.encode_layer(x_in, source)
            for target in range(source, n):
                _add(written, target, clt.write(z, source, target))
            total = written[source]
            assert total is not None
            recon = clt.finish(total.to(x_in.device), source, x_in)
            written[source] = None
            self.clean[source].add_reconstruction(
                captured[self.writes[source].hook_name], recon, z, kept, x_in
            )
            del z
            if self.alone:

                def replace(
                    activation: torch.Tensor, recon: torch.Tensor = recon, layer: int = source
                ) -> torch.Tensor:
                    return self._splice(layer, activation, recon, kept)

                final = self.cut.forward_with_hooks(batch, [(self.writes[source], replace)])
                self._score(self.spliced_alone[source], self.cut.logits(final), original, kept, predicted)
                del final

    def _replacement_batch(
        self, batch: torch.Tensor, kept: torch.Tensor, predicted: torch.Tensor, original: Any
    ) -> None:
        """Every MLP output replaced at once, each layer's features reading the already replaced model."""
        clt, n = self.clt, self.clt.n_layers
        written: list[torch.Tensor | None] = [None] * n
        state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def read(layer: int) -> Any:
            def hook(activation: torch.Tensor) -> None:
                activation = self.reads[layer].select(activation)
                z = clt.encode_layer(activation, layer)
                for target in range(layer, n):
                    _add(written, target, clt.write(z, layer, target))
                state[layer] = (activation, z)

            return hook

        def write(layer: int) -> Any:
            def hook(activation: torch.Tensor) -> torch.Tensor:
                x_in, z = state.pop(layer)
                total = written[layer]
                assert total is not None
                written[layer] = None
                recon = clt.finish(total.to(x_in.device), layer, x_in)
                self.inside[layer].add_reconstruction(activation, recon, z, kept, x_in)
                return activation if layer in self.keep else self._splice(layer, activation, recon, kept)

            return hook

        hooks = [(self.reads[layer], read(layer)) for layer in range(n)]
        hooks += [(self.writes[layer], write(layer)) for layer in range(n)]
        final = self.cut.forward_with_hooks(batch, hooks)
        self._score(self.replacement, self.cut.logits(final), original, kept, predicted)

    # --- after the pass -----------------------------------------------------------------------------------

    def _evaluation(self, acc: Accumulator, tokens: torch.Tensor, what: str) -> Evaluation:
        per_sequence = acc.per_sequence()
        raw = metrics_from_sums(totals(per_sequence), self.law)
        metrics: dict[str, float] = {}
        undefined: dict[str, str] = {}
        for name in METRIC_NAMES:
            value = float(raw[name]) if name in REPLACEMENT_METRICS and name in raw else math.nan
            if math.isfinite(value):
                metrics[name] = value
            elif name in REPLACEMENT_METRICS:
                undefined[name] = (
                    "the loss of the replacement is not above the scaling law's irreducible loss E"
                    if name == "compute_fraction"
                    else "undefined on these tokens"
                )
            elif name in LAYER_METRICS or name in RECONSTRUCTION_EXTRAS:
                undefined[name] = "a reconstruction metric is per layer: see evaluation.members['layer l']"
            else:
                undefined[name] = "not measured for a replacement model (no ablation baseline is run)"
        settle_compute_fraction(metrics, undefined, self.law)
        curves = acc.position_curves()
        evaluation = Evaluation(
            metrics=metrics,
            undefined=undefined,
            n_tokens=int(totals(per_sequence)["n_kl"]),
            n_sequences=int(tokens.shape[0]),
            seq_len=int(tokens.shape[1]),
            hook_name=" + ".join(site.hook_name for site in self.reads),
            hook_head_index=None,
            token_policy=self.policy,
            latent_density=[],
            delta_ce_by_position=curves[0],
            kl_by_position=curves[1],
            per_sequence=per_sequence,
            scaling_law=self.law,
            batch_size=self.batch_size,
            model_dtype=str(self.cut.dtype).replace("torch.", ""),
            device=str(self.cut.output_device),
            backend=self.cut.backend,
            hook_name_out=" + ".join(site.hook_name for site in self.writes),
            dictionary={**self.clt.to_dict(), "splice": what, "keep_layers": sorted(self.keep)},
            per_position=acc.position_per_sequence(),
        )
        return note_compute_fraction(evaluation)

    def _layer_metrics(self, acc: Accumulator, scores: dict[str, np.ndarray]) -> dict[str, float]:
        raw = metrics_from_sums(totals({**scores, **acc.per_sequence()}), None)
        values = {name: float(raw[name]) for name in LAYER_METRICS if math.isfinite(float(raw[name]))}
        values["alive_fraction"] = float(np.mean(acc.latent_density() > 0))
        return values

    def _finish(self, tokens: torch.Tensor) -> Evaluation:
        joint = self._evaluation(self.replacement, tokens, "the whole replacement")
        scores = self.replacement.per_sequence()
        members: dict[str, dict[str, float]] = {}
        for layer in range(self.clt.n_layers):
            inside = self._layer_metrics(self.inside[layer], scores)
            clean = self._layer_metrics(self.clean[layer], scores)
            member = {**inside, **{f"{name}_alone": value for name, value in clean.items()}}
            if self.alone:
                raw = metrics_from_sums(totals(self.spliced_alone[layer].per_sequence()), None)
                member["delta_ce_alone"] = float(raw["delta_ce"])
                member["kl_sae_alone"] = float(raw["kl_sae"])
            member["kept"] = float(layer in self.keep)
            members[layer_name(layer)] = member
        layers: dict[str, Evaluation] = {}
        compounded = None
        if self.alone:
            for layer, acc in enumerate(self.spliced_alone):
                layers[layer_name(layer)] = replace(
                    self._evaluation(acc, tokens, f"layer {layer} alone"),
                    hook_name=self.reads[layer].hook_name,
                    hook_name_out=self.writes[layer].hook_name,
                )
            spliced = [acc for layer, acc in enumerate(self.spliced_alone) if layer not in self.keep]
            compounded = compounding(scores, [acc.per_sequence() for acc in spliced])
        dictionary = {**joint.dictionary, "weight_peak_bytes": self.clt.cache.peak_bytes}
        return replace(joint, members=members, layers=layers, compounding=compounded, dictionary=dictionary)


# --- how evaluate() hands a CLT over ----------------------------------------------------------------------------


def is_clt(sae: Any) -> bool:
    """Whether ``sae`` is a cross-layer transcoder (evaluated as a whole replacement)."""
    return isinstance(sae, CrossLayerTranscoder)


def refuse_clt_in_set(saes: Any) -> None:
    """Raise :class:`ConfigError` for a set of dictionaries holding a CLT (a replacement model on its own)."""
    if isinstance(saes, Mapping):
        values: Any = saes.values()
    elif isinstance(saes, (list, tuple)):
        values = saes
    else:
        return
    if any(is_clt(one) for one in values):
        raise ConfigError(
            "a cross-layer transcoder is a whole replacement model on its own: evaluate it alone "
            "(evaluate(model, clt, tokens)), not in a set with other dictionaries"
        )


def evaluate_clt(
    model: Any, clt: CrossLayerTranscoder, tokens: Any, unsupported: Mapping[str, Any], **options: Any
) -> Evaluation:
    """:func:`evaluate_replacement`, refusing the options of :func:`pytest_saecheck.evaluate` that do not apply."""
    given = [name for name, value in unsupported.items() if value is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)} do not apply to a cross-layer transcoder's replacement (it has no activation "
            "normalisation, no single ablation baseline, and token groups are not split per replacement yet); "
            "leave them unset"
        )
    return evaluate_replacement(model, clt, tokens, **options)


def alone_view(joint: Evaluation, evaluations: Mapping[str, Evaluation]) -> Evaluation:
    """The joint evaluation of a set with each member's isolated evaluation (``layers``) and, in ``members``, its
    R², ΔCE and KL alone: the view a CLT's replacement gives, so the two compare side by side."""
    members = {name: dict(values) for name, values in joint.members.items()}
    for name, evaluation in evaluations.items():
        for metric in ("explained_variance", "delta_ce", "kl_sae"):
            if metric in evaluation.metrics:
                members.setdefault(name, {})[f"{metric}_alone"] = evaluation.metrics[metric]
    return replace(joint, layers=dict(evaluations), members=members)
