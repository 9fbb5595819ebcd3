"""The evaluation engine: every behavioural and reconstruction metric of an SAE in one streaming pass.

How a batch is evaluated:

1. the model runs once up to the hooks (``stop_at_layer``, then the blocks that hold them); the activation the
   dictionary reads (``hook_name``) and the one it writes (``hook_name_out``; the same hook for an SAE, the
   MLP output for an MLP transcoder) are reused by every variant;
2. the dictionary reconstructs the written activation from the read one (``pytest_saecheck.dictionaries``),
   inside the activation normalisation it was trained with (``pytest_saecheck.normalisation``); the spliced,
   zero-ablated and mean-ablated activations replace the written one only at the positions the token policy
   keeps (``pytest_saecheck.policy``);
3. the variants run through the rest of the model together (``start_at_layer``); each is unembedded once and
   CE/KL are scored a few rows at a time (``pytest_saecheck.scoring``), so the logits of the original run and
   of one variant are the only ``[batch, pos, vocab]`` tensors alive;
4. per-sequence sums are accumulated in float64; every metric is a function of those sums
   (``pytest_saecheck.metrics``), which also gives paired bootstrap intervals over sequences.

Before any work the model is checked (:func:`check_model`): SAEs attached to a ``HookedSAETransformer`` or a
``TransformerBridge`` are refused, hooks already on the model are named in a warning and recorded. Hooks that
TransformerLens fires only behind a flag (``hook_mlp_in``) are switched on for the evaluation and restored.

For residual-stream hooks, when only position 0 (always the same token) or nothing is excluded, the zero-
and mean-ablated continuations do not depend on the tokens: every ablated position holds the same vector
and position 0 always holds the same token. They are then computed once, for one sequence, and reused.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pytest_saecheck import normalisation as norm
from pytest_saecheck.dictionaries import DictionaryInfo, describe
from pytest_saecheck.errors import (
    ConfigError,
    DegenerateActivationsError,
    EmptyTokenSetError,
    HookNotFoundError,
    ModelStateError,
    NonFiniteError,
    SAECheckWarning,
    ShapeMismatchError,
)
from pytest_saecheck.hookpoints import HookSite, required_flags, resolve_hook
from pytest_saecheck.metrics import (
    BOOTSTRAPPABLE,
    CHINCHILLA_SCALING_LAW,
    METRIC_NAMES,
    RATIO_DENOMINATORS,
    metrics_from_sums,
    ratio_denominators,
    total_variance,
)
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.scoring import BatchScores, chunk_rows_for, score_batch
from pytest_saecheck.stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, bootstrap_intervals

SCALE_MISMATCH_FACTOR = 10.0
"""Preflight: an activation norm (or reconstruction norm) this many times off what the SAE expects is flagged."""

__all__ = ["Evaluation", "TokenPolicy", "evaluate"]


@dataclass
class Evaluation:
    """The result of :func:`evaluate`. ``metrics`` is flat: metric name → float, never NaN.

    A metric that is undefined on this data (a zero denominator, a scaling law that does not apply) is
    absent from ``metrics`` and explained in ``undefined``.
    """

    metrics: dict[str, float]
    undefined: dict[str, str]
    n_tokens: int
    n_sequences: int
    seq_len: int
    hook_name: str
    hook_head_index: int | None
    token_policy: TokenPolicy
    latent_density: list[float]
    delta_ce_by_position: list[float | None]
    kl_by_position: list[float | None]
    per_sequence: dict[str, np.ndarray] = field(repr=False)
    scaling_law: tuple[float, float] | None = None
    batch_size: int = 0
    model_dtype: str = ""
    device: str = ""
    duration_s: float = 0.0
    hook_name_out: str = ""
    dictionary: dict[str, Any] = field(default_factory=dict)
    normalisation: dict[str, Any] = field(default_factory=dict)
    model_hooks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _interval_cache: dict[tuple[float, int, int], dict[str, tuple[float, float]]] = field(
        default_factory=dict, repr=False
    )

    def confidence_interval(
        self, name: str, level: float = DEFAULT_LEVEL, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
    ) -> tuple[float, float]:
        """Percentile bootstrap interval of a metric over sequences, paired across variants."""
        if name not in METRIC_NAMES:
            raise ConfigError(f"unknown metric {name!r}; known metrics: {', '.join(METRIC_NAMES)}")
        if name not in BOOTSTRAPPABLE:
            raise ConfigError(
                f"{name!r} is a property of the whole token set and has no per-sequence interval"
            )
        if name not in self.metrics:
            raise ConfigError(
                f"{name!r} is undefined for this evaluation: {self.undefined.get(name, 'not computed')}"
            )
        return self.confidence_intervals(level, n_resamples=n_resamples, seed=seed)[name]

    def confidence_intervals(
        self, level: float = DEFAULT_LEVEL, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Bootstrap intervals of every defined metric that has one, from one set of resamples (cached)."""
        key = (float(level), int(n_resamples), int(seed))
        if key not in self._interval_cache:
            law = self.scaling_law
            names = [name for name in self.metrics if name in BOOTSTRAPPABLE]

            def statistics(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                values = metrics_from_sums(sums, law)
                return {name: values[name] for name in names}

            intervals = bootstrap_intervals(
                self.per_sequence, statistics, level=level, n_resamples=n_resamples, seed=seed
            )
            self._interval_cache[key] = intervals
            for name, (low, high) in intervals.items():
                value = self.metrics[name]
                if not low <= value <= high:
                    message = (
                        f"the {level:.0%} bootstrap interval of {name} [{low:.4g}, {high:.4g}] does not contain "
                        f"its value {value:.4g}: the resampled values are strongly skewed (a near-zero "
                        "denominator or a few dominant sequences); do not gate on this interval"
                    )
                    if message not in self.warnings:
                        self.warnings.append(message)
                        warnings.warn(message, SAECheckWarning, stacklevel=2)
        return dict(self._interval_cache[key])

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (safe to put on pytest reports and into JSON)."""
        return {
            "metrics": dict(self.metrics),
            "undefined": dict(self.undefined),
            "n_tokens": self.n_tokens,
            "n_sequences": self.n_sequences,
            "seq_len": self.seq_len,
            "hook_name": self.hook_name,
            "hook_head_index": self.hook_head_index,
            "hook_name_out": self.hook_name_out,
            "dictionary": dict(self.dictionary),
            "normalisation": dict(self.normalisation),
            "model_hooks": list(self.model_hooks),
            "warnings": list(self.warnings),
            "token_policy": self.token_policy.to_dict(),
            "latent_density": list(self.latent_density),
            "delta_ce_by_position": list(self.delta_ce_by_position),
            "kl_by_position": list(self.kl_by_position),
            "scaling_law": list(self.scaling_law) if self.scaling_law is not None else None,
            "batch_size": self.batch_size,
            "model_dtype": self.model_dtype,
            "device": self.device,
            "duration_s": self.duration_s,
        }


def evaluate(
    model: Any,
    sae: Any,
    tokens: torch.Tensor,
    *,
    batch_size: int = 16,
    exclude_bos: bool = True,
    exclude_special_tokens: bool = True,
    exclude_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    policy: TokenPolicy | None = None,
    activation_scaler: Any = None,
    mean_activation: torch.Tensor | None = None,
    mean_ablation: bool = True,
    scaling_law: tuple[float, float] | None = CHINCHILLA_SCALING_LAW,
    progress: bool | None = None,
) -> Evaluation:
    """Evaluate ``sae`` spliced into ``model`` on ``tokens`` (``[n_sequences, seq_len]`` token ids).

    ``sae`` is an SAE Lens SAE or transcoder (:mod:`pytest_saecheck.dictionaries`); ``model`` a TransformerLens
    ``HookedTransformer`` (:func:`check_model` says what is refused).

    Token policy (:class:`TokenPolicy`, whose docstring states the rule): ``exclude_bos`` leaves position 0
    out; ``exclude_special_tokens`` the tokenizer's BOS/EOS/PAD wherever they occur; ``exclude_token_ids``
    more ids; ``pad_token_id`` padding. Excluded positions are neither spliced, ablated nor averaged, and a
    prediction counts only if its position is kept and its target is not an excluded id. ``policy`` gives the
    whole policy instead (then none of the four may be given).

    ``activation_scaler``: the normalisation of an SAE Lens checkpoint trained with
    ``normalize_activations="expected_average_only_in"`` (a factor, an SAE Lens ``ActivationScaler``, or the
    checkpoint directory with its ``activation_scaler.json``); without one such an SAE gets SAE Lens'
    estimate sqrt(d_in)/E‖x‖ on these tokens, with a warning. Metrics stay in the model's units.

    ``mean_activation`` fixes the mean-ablation vector (default: the mean over the evaluated positions).
    ``scaling_law`` is ``(E, gamma)`` of ``L(C) = E + A C^-gamma`` for ``compute_fraction`` (default:
    Chinchilla's). ``progress=None`` shows a bar only after two seconds.

    Raises :class:`ConfigError`, :class:`ShapeMismatchError`, :class:`HookNotFoundError`,
    :class:`UnsupportedDictionaryError`, :class:`ModelStateError`, :class:`EmptyTokenSetError`,
    :class:`NonFiniteError`, :class:`DegenerateActivationsError` (all :class:`SAECheckError`).
    """
    started = time.perf_counter()
    if policy is None:
        policy = TokenPolicy(exclude_bos, exclude_special_tokens, tuple(exclude_token_ids), pad_token_id)
    elif (exclude_bos, exclude_special_tokens, tuple(exclude_token_ids), pad_token_id) != (
        True,
        True,
        (),
        None,
    ):
        raise ConfigError(
            "give either policy= or exclude_bos/exclude_special_tokens/exclude_token_ids/pad_token_id, not both"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    model_hooks = check_model(model)
    runner = _Runner(model, sae, policy.resolved_for(model), norm.as_normalisation(activation_scaler))
    tokens = runner.check_tokens(tokens)
    with torch.inference_mode(), _hook_z_reshaping_off(sae), _hook_flags_on(model, runner.hook_names):
        result = runner.run(tokens, batch_size, mean_activation, mean_ablation, scaling_law, progress)
    result.model_hooks = model_hooks
    if model_hooks:
        result.warnings.insert(0, _hooks_warning(model_hooks))
    for message in result.warnings:
        warnings.warn(message, SAECheckWarning, stacklevel=2)
    result.duration_s = time.perf_counter() - started
    return result


def check_model(model: Any) -> list[str]:
    """Refuse a model the engine cannot measure; return the hooks already on it (``"name (kind)"``).

    Raises :class:`ModelStateError` for a TransformerLens ``TransformerBridge``, a ``HookedSAETransformer`` with
    SAEs attached, or anything that is not a ``HookedTransformer``.
    """
    kind = type(model).__name__
    if "TransformerBridge" in {cls.__name__ for cls in type(model).__mro__}:
        raise ModelStateError(
            "the model is a TransformerLens TransformerBridge, whose hooks and layer cuts differ from "
            "HookedTransformer's; load it as a HookedTransformer instead: "
            "HookedTransformer.from_pretrained_no_processing(name) (or give the model's name and let "
            "pytest-saecheck load it the way the SAE was trained)"
        )
    if not (hasattr(model, "cfg") and hasattr(model, "hook_dict") and hasattr(model, "blocks")):
        raise ModelStateError(
            f"expected a TransformerLens HookedTransformer, got {kind}; load one with "
            "HookedTransformer.from_pretrained_no_processing(name) or pytest_saecheck.load_model(spec)"
        )
    attached = getattr(model, "acts_to_saes", None)
    if attached:
        raise ModelStateError(
            f"the {kind} has SAEs attached at {', '.join(sorted(attached))}: the engine splices the SAE itself, "
            "so attached SAEs would change the 'original' model. Call model.reset_saes() first"
        )
    found = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            permanent = any(getattr(h, "is_permanent", False) for h in getattr(module, "fwd_hooks", []))
            found.append(f"{name or '(model)'} ({'permanent' if permanent else 'forward'} hook)")
    return found


def _hooks_warning(hooks: list[str]) -> str:
    return (
        f"the model has hooks attached ({', '.join(hooks)}); they run in every variant, original included, "
        "so the numbers measure the hooked model. Remove them (model.reset_hooks(including_permanent=True)) "
        "unless that is what you intend"
    )


@contextlib.contextmanager
def _hook_flags_on(model: Any, hook_names: Sequence[str]) -> Iterator[None]:
    """Switch on the config flags that make ``hook_names`` fire (``use_hook_mlp_in``, ...), then restore them."""
    flags = {flag for name in hook_names for flag in required_flags(name)}
    previous = {flag: getattr(model.cfg, flag, False) for flag in flags}
    try:
        for flag in flags:
            setattr(model.cfg, flag, True)
        yield
    finally:
        for flag, value in previous.items():
            setattr(model.cfg, flag, value)


class _hook_z_reshaping_off:
    """SAE Lens SAEs on hook_z may reshape [.., heads, d_head] themselves; the engine feeds them flat input."""

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self.was_on = bool(getattr(sae, "hook_z_reshaping_mode", False))

    def __enter__(self) -> None:
        if self.was_on:
            self.sae.turn_off_forward_pass_hook_z_reshaping()

    def __exit__(self, *exc: object) -> None:
        if self.was_on:
            self.sae.turn_on_forward_pass_hook_z_reshaping()


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device(model.cfg.device or "cpu")


def _has_plain_unembed(model: Any) -> bool:
    """True when the model's unembedding is TransformerLens' plain affine map ``x @ W_U + b_U``.

    False (use the model's own forward) when anything could make the result differ: another unembedding
    class, hooks on it or its hook points, or a logit soft-cap.
    """
    from transformer_lens.components import Unembed

    unembed = getattr(model, "unembed", None)
    if type(unembed) is not Unembed:
        return False
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in unembed.modules()):
        return False
    return not (getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0


class _Runner:
    def __init__(
        self, model: Any, sae: Any, policy: TokenPolicy, given: norm.Normalisation | None = None
    ) -> None:
        self.model = model
        self.sae = sae
        self.policy = policy
        self.n_layers: int = model.cfg.n_layers
        self.device = _model_device(model)
        self.sae_device = torch.device(getattr(sae, "device", self.device))
        self.info: DictionaryInfo = describe(sae)
        hook_names = list(model.hook_dict)
        self.read: HookSite = resolve_hook(
            self.info.hook_name, self.info.hook_head_index, self.n_layers, hook_names
        )
        self.write: HookSite = (
            self.read
            if not self.info.is_transcoder
            else resolve_hook(self.info.hook_name_out, None, self.n_layers, hook_names)
        )
        self._check_order()
        self.given = given
        self.normalisation = given or norm.NONE
        self._check_sae_weights()
        self._plain_unembed = _has_plain_unembed(model)

    @property
    def hook_names(self) -> list[str]:
        return sorted({self.read.hook_name, self.write.hook_name})

    def _check_order(self) -> None:
        read, write = self.read, self.write
        if read is write:
            return
        reads_late = (
            read.entry > write.entry
            or (write.is_residual and not read.is_residual and read.layer >= write.entry)
            or (not write.is_residual and not read.is_residual and read.layer > write.layer)
        )
        if reads_late:
            raise ConfigError(
                f"the transcoder reads {read.hook_name!r} after it writes {write.hook_name!r}; "
                "hook_name must come before hook_name_out in the forward pass"
            )

    def _check_sae_weights(self) -> None:
        for name, param in self.sae.named_parameters():
            if not torch.isfinite(param).all():
                raise NonFiniteError(
                    f"SAE parameter {name!r} contains NaN or inf; the SAE file is corrupt or training diverged. "
                    "Re-export the SAE from a finite checkpoint."
                )

    def check_tokens(self, tokens: Any) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise ShapeMismatchError(
                f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}"
            )
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ShapeMismatchError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise ShapeMismatchError(
                f"tokens must be 2-D [n_sequences, seq_len], got shape {tuple(tokens.shape)}; "
                "use tokens.unsqueeze(0) for a single sequence"
            )
        n_sequences, seq_len = tokens.shape
        if n_sequences < 1 or seq_len < 2:
            raise ShapeMismatchError(
                f"tokens must hold at least 1 sequence of at least 2 positions, got shape {tuple(tokens.shape)}"
            )
        n_ctx = self.model.cfg.n_ctx
        if seq_len > n_ctx:
            raise ShapeMismatchError(f"seq_len {seq_len} exceeds the model's context length n_ctx={n_ctx}")
        d_vocab = self.model.cfg.d_vocab
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= d_vocab:
            raise ShapeMismatchError(
                f"token ids must lie in [0, {d_vocab}) for this model, got [{low}, {high}]"
            )
        if not self.policy.prediction_mask(tokens).any():
            raise EmptyTokenSetError(
                f"no prediction is left to evaluate after the token policy {self.policy.to_dict()} "
                f"on tokens of shape {tuple(tokens.shape)}; use longer sequences or exclude fewer tokens"
            )
        return tokens.to(self.device)

    # --- model pieces -------------------------------------------------------------------------------------

    @property
    def _start(self) -> int:
        """Where the shared prefix stops: the first block the read or the write hook needs."""
        return min(self.read.entry, self.write.entry)

    def _prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, stop_at_layer=self._start)

    def _run_capturing(
        self, resid: torch.Tensor, start: int, stop: int, names: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], list[str], torch.Tensor]:
        """Run blocks ``start..stop-1`` from ``resid``; the activations at ``names``, their firing order, the output."""
        captured: dict[str, torch.Tensor] = {}
        order: list[str] = []

        def capture(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            captured[hook.name] = activation
            order.append(hook.name)
            return activation

        with self.model.hooks(fwd_hooks=[(name, capture) for name in names]):
            out = self.model(resid, start_at_layer=start, stop_at_layer=stop)
        missing = [name for name in names if name not in captured]
        if missing:
            raise HookNotFoundError(
                f"hook {', '.join(map(repr, missing))} did not fire when the model ran blocks {start}..{stop - 1}; "
                "the model computes it only under a setting that is off, or the hook is not on the forward path"
            )
        return captured, order, out

    def _hook_activation(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """``(base, block_state, x_in, x_out)`` of one batch.

        ``base`` is the residual stream where the write hook's continuation starts (``write.entry``);
        ``block_state`` is ``(activation at the write hook, block output)`` for a hook inside a block, else
        None; ``x_in``/``x_out`` are the read and written activations as the dictionary sees them.
        """
        read, write = self.read, self.write
        resid = self._prefix(tokens)
        stop = write.entry if write.is_residual else write.layer + 1
        if stop == self._start:  # a residual write hook where the prefix stops (every residual SAE)
            x_in = resid if read.entry == self._start else None
            assert x_in is not None
            return resid, None, read.select(x_in), write.select(resid)
        names = []
        read_name = read.hook_name
        if read.is_residual and read.entry > self._start:
            read_name = f"blocks.{read.entry - 1}.hook_resid_post"  # fires inside the run; same values
        if not (read.is_residual and read.entry == self._start):
            names.append(read_name)
        if not write.is_residual:
            names.append(write.hook_name)
            if write.layer > self._start:
                names.append(f"blocks.{write.layer}.hook_resid_pre")
        captured, order, out = self._run_capturing(resid, self._start, stop, sorted(set(names)))
        if read is not write and read_name in captured and write.hook_name in captured:
            if order.index(read_name) > order.index(write.hook_name):
                raise ConfigError(
                    f"the transcoder reads {read.hook_name!r} after it writes {write.hook_name!r} in the "
                    "forward pass; hook_name must come before hook_name_out"
                )
        x_in = resid if read.is_residual and read.entry == self._start else captured[read_name]
        if write.is_residual:
            return out, None, read.select(x_in), write.select(out)
        base = captured.get(f"blocks.{write.layer}.hook_resid_pre", resid)
        activation_full = captured[write.hook_name]
        return base, (activation_full, out), read.select(x_in), write.select(activation_full)

    def _replace_in_block(self, base: torch.Tensor, activations: list[torch.Tensor]) -> torch.Tensor:
        replacement = torch.cat(activations, dim=0)

        def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            return replacement

        layer = self.write.layer
        batched = base.repeat(len(activations), *([1] * (base.ndim - 1)))
        with self.model.hooks(fwd_hooks=[(self.write.hook_name, replace)]):
            return self.model(batched, start_at_layer=layer, stop_at_layer=layer + 1)

    def _to_final(self, resid: torch.Tensor, start: int) -> torch.Tensor:
        if start >= self.n_layers:
            return resid
        return self.model(resid, start_at_layer=start, stop_at_layer=self.n_layers)

    def _logits(self, final_resid: torch.Tensor) -> torch.Tensor:
        if not self._plain_unembed:
            return self.model(final_resid, start_at_layer=self.n_layers)
        # The model's own ln_final, then one addmm: TransformerLens 3's Unembed copies the 150 MB W_U.T on every
        # call first; the product is the same at the same speed without the copy.
        normalized = (
            final_resid if self.model.cfg.normalization_type is None else self.model.ln_final(final_resid)
        )
        unembed = self.model.unembed
        logits = torch.addmm(unembed.b_U, normalized.reshape(-1, normalized.shape[-1]), unembed.W_U)
        return logits.reshape(*normalized.shape[:-1], logits.shape[-1])

    def _log_probs(self, final_resid: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self._logits(final_resid).float(), dim=-1)

    def _sae(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, reconstruction)``: the dictionary's own code, inside its activation normalisation."""
        x = x_in.to(self.sae_device)
        scaler = self.normalisation.scaler() if self.normalisation.active else None
        if scaler is not None:
            x = scaler.scale(x)
        latents, recon = self.info.reconstruct(self.sae, x)
        if scaler is not None:
            recon = scaler.unscale(recon)
        if latents.is_sparse:
            latents = latents.to_dense()
        if not torch.isfinite(recon).all():
            raise NonFiniteError(
                "the SAE's reconstruction contains NaN or inf on finite input; check its weights, dtype "
                f"({self.sae.dtype}) and activation normalisation ({self.info.normalize_activations})"
            )
        return latents, recon

    def _variant_activations(
        self, x: torch.Tensor, kept: torch.Tensor, names: Sequence[str], recon: torch.Tensor | None, mean: Any
    ) -> list[torch.Tensor]:
        keep = kept[..., None]
        out = []
        for name in names:
            if name == "sae":
                assert recon is not None
                value = recon.to(device=x.device, dtype=x.dtype)
            elif name == "zero":
                value = torch.zeros((), device=x.device, dtype=x.dtype)
            else:
                value = mean.to(device=x.device, dtype=x.dtype)
            out.append(torch.where(keep, value, x))
        return out

    def _continue(
        self, base: torch.Tensor, block_state: Any, variants: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Final residuals (before ln_final) of the original run followed by each variant."""
        if self.write.is_residual:
            stacked = torch.cat([base, *variants], dim=0)
            return list(self._to_final(stacked, self.write.entry).chunk(1 + len(variants), dim=0))
        activation_full, block_out = block_state
        replaced = [self.write.write_back(activation_full, v) for v in variants]
        outs = self._replace_in_block(base, replaced)
        stacked = torch.cat([block_out, outs], dim=0)
        return list(self._to_final(stacked, self.write.layer + 1).chunk(1 + len(variants), dim=0))

    def _check_widths(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        for site, width, expected, name in (
            (self.read, x_in.shape[-1], self.info.d_in, "d_in"),
            (self.write, x_out.shape[-1], self.info.d_out, "d_out"),
        ):
            if width != expected:
                head = f" (head {site.head_index})" if site.head_index is not None else ""
                raise ShapeMismatchError(
                    f"the SAE expects {name}={expected} but hook {site.hook_name!r}{head} has width {width}; "
                    "the SAE was trained on a different model or hook"
                )

    # --- ablation templates (token-independent continuations) -------------------------------------------

    def _ablation_is_token_independent(self, tokens: torch.Tensor, kept: torch.Tensor) -> bool:
        if not self.write.is_residual:
            return False
        excluded = ~kept
        if excluded[:, 1:].any():
            return False
        if excluded[:, 0].any():
            return bool(excluded[:, 0].all()) and bool((tokens[:, 0] == tokens[0, 0]).all())
        return True

    def _template_log_probs(
        self, tokens: torch.Tensor, kept: torch.Tensor, name: str, mean: Any
    ) -> torch.Tensor:
        """``[seq_len, vocab]`` log-probs of an ablated continuation that is the same for every sequence."""
        if bool(kept[:1].all()):
            # Every position is replaced, so the prefix's output would be discarded: skip running it.
            d_model = int(self.model.cfg.d_model)
            base = torch.zeros((1, tokens.shape[1], d_model), device=self.device, dtype=self.model.cfg.dtype)
        else:
            base = self._hook_activation(tokens[:1])[0]
        (variant,) = self._variant_activations(base, kept[:1], [name], None, mean)
        return self._log_probs(self._to_final(variant, self.write.entry))[0]

    def _prepass(
        self, tokens: torch.Tensor, kept_all: torch.Tensor, batch_size: int, *, norm: bool, mean: bool
    ) -> tuple[float | None, torch.Tensor | None]:
        """One pass to the hooks: E‖x_in‖ (for a normalisation estimate) and the mean of x_out (float64)."""
        norm_total, total, count = 0.0, None, 0
        for start in range(0, tokens.shape[0], batch_size):
            batch, kept = tokens[start : start + batch_size], kept_all[start : start + batch_size]
            _, _, x_in, x_out = self._hook_activation(batch)
            if norm:
                norm_total += float(x_in[kept].double().norm(dim=-1).sum())
            if mean:
                x64 = x_out[kept].double().sum(0)
                total = x64 if total is None else total + x64
            count += int(kept.sum())
        return (norm_total / count if norm else None), (total / count if total is not None else None)

    # --- the pass -----------------------------------------------------------------------------------------

    def run(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        mean_activation: torch.Tensor | None,
        mean_ablation: bool,
        scaling_law: tuple[float, float] | None,
        progress: bool | None,
    ) -> Evaluation:
        from tqdm.auto import tqdm

        n_sequences, seq_len = tokens.shape
        kept_all = self.policy.kept_mask(tokens)
        predicted_all = self.policy.prediction_mask(tokens)
        templated = self._ablation_is_token_independent(tokens, kept_all)
        mean = mean_activation
        if mean is not None:
            mean = torch.as_tensor(mean).to(self.device).double()
            if mean.shape != (self.info.d_out,):
                raise ShapeMismatchError(
                    f"mean_activation must have shape ({self.info.d_out},), got {tuple(mean.shape)}"
                )
        estimate = norm.needs_estimate(self.info.normalize_activations, self.given)
        want_mean = mean_ablation and mean is None and not templated
        notes: list[str] = []
        if estimate or want_mean:
            mean_norm, prepass_mean = self._prepass(
                tokens, kept_all, batch_size, norm=estimate, mean=want_mean
            )
            if want_mean:
                mean = prepass_mean
            if estimate:
                assert mean_norm is not None
                self.normalisation = norm.estimated(self.info.d_in, mean_norm)
                notes.append(
                    f"the SAE was trained with normalize_activations='{self.info.normalize_activations}' and no "
                    f"activation scaler was given: estimated the factor sqrt(d_in)/E‖x‖ = "
                    f"{self.normalisation.scaling_factor:.6g} on the evaluation tokens, as SAE Lens does. Give "
                    "the checkpoint's activation_scaler.json (activation_scaler=) to use the training value"
                )

        zero_template = self._template_log_probs(tokens, kept_all, "zero", None) if templated else None
        mean_template = (
            self._template_log_probs(tokens, kept_all, "mean", mean)
            if templated and mean_ablation and mean is not None
            else None
        )
        per_batch_variants = ["sae"]
        if not templated:
            per_batch_variants.append("zero")
            if mean_ablation:
                per_batch_variants.append("mean")

        templates = {
            name: template
            for name, template in (("zero", zero_template), ("mean", mean_template))
            if template is not None
        }
        chunk_rows = chunk_rows_for(int(self.model.cfg.d_vocab_out), self.device)
        acc = _Accumulator(seq_len, int(self.sae.cfg.d_sae), self.device, self.sae_device)
        bar = tqdm(
            total=int(kept_all.sum()),
            unit="tok",
            unit_scale=True,
            desc=f"saecheck {self.write.hook_name}",
            disable=progress is False,
            delay=0.0 if progress else 2.0,
            leave=False,
        )
        try:
            for start in range(0, n_sequences, batch_size):
                batch = tokens[start : start + batch_size]
                kept = kept_all[start : start + batch_size]
                predicted = predicted_all[start : start + batch_size]
                base, block_state, x_in, x_out = self._hook_activation(batch)
                self._check_widths(x_in, x_out)
                latents, recon = self._sae(x_in)
                acc.add_reconstruction(x_out, recon, latents, kept, x_in)
                variants = self._variant_activations(x_out, kept, per_batch_variants, recon, mean)
                finals = self._continue(base, block_state, variants)
                del base, block_state, x_in, x_out, latents, recon, variants
                logits_orig = self._logits(finals[0])
                # One variant's logits at a time: re-deriving the original's log-softmax per chunk is cheap,
                # a third or fourth [batch, pos, vocab] tensor is not.
                parts = []
                for index, name in enumerate(per_batch_variants):
                    logits = self._logits(finals[1 + index])
                    parts.append(
                        score_batch(
                            logits_orig,
                            batch,
                            {name: logits},
                            templates if index == 0 else {},
                            kl_for=("sae", "zero"),
                            chunk_rows=chunk_rows,
                        )
                    )
                    del logits
                del finals, logits_orig
                scores = BatchScores.merged(parts)
                acc.add_scores(scores, kept, predicted)
                acc.end_batch()
                bar.update(int(kept.sum()))
        finally:
            bar.close()

        if templated and mean_ablation and mean_template is None:
            mean = acc.mean_activation()
            template = self._template_log_probs(tokens, kept_all, "mean", mean)
            acc.add_mean_from_template(template, tokens, predicted_all)

        result = self._finish(acc, tokens, batch_size, scaling_law)
        result.warnings.extend(notes)
        result.warnings.extend(self._preflight(result, acc))
        return result

    def _preflight(self, result: Evaluation, acc: _Accumulator) -> list[str]:
        """Warnings when the activations are grossly off the scale the SAE expects (checked, not guessed)."""
        found: list[str] = []
        causes = (
            "likely causes: the model was loaded with weight processing the SAE was not trained with "
            "(fold_ln / center_writing_weights; SAE Lens trains on from_pretrained_no_processing), activation "
            "normalisation not applied, or the wrong hook or model"
        )
        factor = self.normalisation.scaling_factor
        if factor is not None and acc.input_norm is not None:
            ratio = acc.input_norm * factor / math.sqrt(self.info.d_in)
            if not 1 / SCALE_MISMATCH_FACTOR <= ratio <= SCALE_MISMATCH_FACTOR:
                found.append(
                    f"scaled activations at {self.read.hook_name!r} have mean norm {ratio:.3g} × sqrt(d_in), "
                    f"where the SAE's normalisation expects about 1; {causes}"
                )
        l2_ratio = result.metrics.get("l2_ratio")
        if l2_ratio is not None and not 1 / SCALE_MISMATCH_FACTOR <= l2_ratio <= SCALE_MISMATCH_FACTOR:
            found.append(
                f"the reconstruction's norm is {l2_ratio:.3g} × the activation's at {self.write.hook_name!r} "
                f"(l2_ratio): the SAE does not see the activations it was trained on; {causes}"
            )
        return found

    def _finish(
        self,
        acc: _Accumulator,
        tokens: torch.Tensor,
        batch_size: int,
        scaling_law: tuple[float, float] | None,
    ) -> Evaluation:
        per_sequence = acc.per_sequence()
        totals = {key: value.sum(axis=0) for key, value in per_sequence.items()}
        variance = total_variance(totals)
        scale = float(totals["sum_sq_centered"]) / max(float(totals["n_rec"]), 1.0)
        if not variance > 1e-12 * max(scale, 1e-30):
            raise DegenerateActivationsError(
                f"the activations at {self.write.hook_name!r} have zero variance over the "
                f"{int(totals['n_rec'])} evaluated positions, so explained variance is undefined; evaluate more "
                "varied tokens"
            )
        raw = metrics_from_sums(totals, scaling_law)
        metrics: dict[str, float] = {}
        undefined: dict[str, str] = {}
        for name in METRIC_NAMES:
            if name == "alive_fraction":
                continue
            if name not in raw:
                undefined[name] = (
                    "not computed (mean ablation disabled)" if "mean" in name else "not computed"
                )
                continue
            value = float(raw[name])
            if math.isfinite(value):
                metrics[name] = value
            else:
                undefined[name] = _why_undefined(name, scaling_law)
        for name, reason in unresolved_ratios(per_sequence, totals).items():
            if name in metrics:
                del metrics[name]
                undefined[name] = reason
        density = acc.latent_density()
        metrics["alive_fraction"] = float(np.mean(density > 0))
        curve_delta, curve_kl = acc.position_curves()
        return Evaluation(
            metrics={name: metrics[name] for name in METRIC_NAMES if name in metrics},
            undefined=undefined,
            n_tokens=int(totals["n_rec"]),
            n_sequences=int(tokens.shape[0]),
            seq_len=int(tokens.shape[1]),
            hook_name=self.read.hook_name,
            hook_head_index=self.read.head_index,
            token_policy=self.policy,
            latent_density=density.tolist(),
            delta_ce_by_position=curve_delta,
            kl_by_position=curve_kl,
            per_sequence=per_sequence,
            scaling_law=scaling_law,
            batch_size=batch_size,
            model_dtype=str(self.model.cfg.dtype).replace("torch.", ""),
            device=str(self.device),
            hook_name_out=self.write.hook_name,
            dictionary=self.info.to_dict(),
            normalisation=self.normalisation.to_dict(),
        )


def unresolved_ratios(
    per_sequence: Mapping[str, np.ndarray], totals: Mapping[str, np.ndarray], level: float = DEFAULT_LEVEL
) -> dict[str, str]:
    """The ratio scores whose denominator is not resolved from zero on this data, with the reason.

    A ratio such as ``ce_loss_score = (L_zero − L_sae) / (L_zero − L_orig)`` divides by noise when its
    denominator's bootstrap interval over sequences includes 0, or when the denominator is smaller than the
    interval's half-width: the score then swings by orders of magnitude between resamples (-6.9 with an
    interval [-1.5, 3.6] at a hook_z hook where zero ablation barely changes the loss). Such a score is
    undefined, not a number a threshold may pass. With fewer than 2 sequences nothing can be judged.
    """
    if len(next(iter(per_sequence.values()))) < 2:
        return {}
    point = ratio_denominators(totals)
    intervals = bootstrap_intervals(per_sequence, ratio_denominators, level=level)
    reasons = {}
    for name, (low, high) in intervals.items():
        value = float(point[name])
        if low > 0 or high < 0:
            if abs(value) > (high - low) / 2:
                continue
        label = RATIO_DENOMINATORS[name]
        reasons[name] = (
            f"its denominator {label} = {value:.3g} is not resolved from zero on this data (its {level:.0%} "
            f"bootstrap interval over sequences is [{low:.3g}, {high:.3g}]), so the score divides by noise; "
            "read delta_ce and kl_sae instead, or evaluate more tokens"
        )
    return reasons


def _why_undefined(name: str, scaling_law: tuple[float, float] | None) -> str:
    if name == "compute_fraction" and scaling_law is not None:
        return (
            f"the scaling law's irreducible loss E={scaling_law[0]:.3f} is not below both ce_orig and ce_sae; "
            "pass scaling_law=(E, gamma) fitted for this model"
        )
    if name in ("ce_loss_score", "kl_div_score"):
        return "the zero-ablated model is exactly as good as the original (zero denominator)"
    if name == "ce_loss_score_mean_ablation":
        return "the mean-ablated model is exactly as good as the original (zero denominator)"
    return "a denominator is zero on this data"


class _Accumulator:
    """Per-sequence float64 sums, per-position curves and per-latent firing counts."""

    def __init__(self, seq_len: int, d_sae: int, device: torch.device, sae_device: torch.device) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.current: dict[str, torch.Tensor] = {}
        self.firing = torch.zeros(d_sae, dtype=torch.float64, device=sae_device)
        # CE exists for positions 0..S-2 (the prediction of the next token), KL for every position.
        lengths = {
            "ce_orig": seq_len - 1,
            "ce_sae": seq_len - 1,
            "n_ce": seq_len - 1,
            "kl_sae": seq_len,
            "n_kl": seq_len,
        }
        self.position = {
            key: torch.zeros(length, dtype=torch.float64, device=device) for key, length in lengths.items()
        }
        self.reference: torch.Tensor | None = None
        self._input_norm_sum = 0.0
        self._input_count = 0

    @property
    def input_norm(self) -> float | None:
        """Mean ‖x_in‖ over the kept positions (the read activation, before any normalisation)."""
        return self._input_norm_sum / self._input_count if self._input_count else None

    def add_reconstruction(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        latents: torch.Tensor,
        kept: torch.Tensor,
        x_in: torch.Tensor,
    ) -> None:
        """``x``: the written activation (the target), ``x_in``: the read one (its norm feeds the preflight)."""
        self._input_norm_sum += float(x_in[kept.to(x_in.device)].double().norm(dim=-1).sum())
        self._input_count += int(kept.sum())
        kept_r = kept.to(recon.device)
        seq_index = torch.arange(kept.shape[0], device=recon.device).unsqueeze(1).expand_as(kept_r)[kept_r]
        if bool(kept_r.all()):
            # Nothing excluded: flatten instead of boolean indexing, which would copy the [tokens, d_sae] latents.
            xs = x.to(recon.device).reshape(-1, x.shape[-1]).double()
            xh = recon.reshape(-1, recon.shape[-1]).double()
            z = latents.reshape(-1, latents.shape[-1])
        else:
            xs = x.to(recon.device)[kept_r].double()
            xh = recon[kept_r].double()
            z = latents[kept_r]
        active = z != 0
        if self.reference is None:
            # Sums are centred on the first batch's mean so Σ‖x − x̄‖² does not cancel catastrophically.
            self.reference = xs.mean(0)
        n_batch = kept.shape[0]

        def per_seq(values: torch.Tensor) -> torch.Tensor:
            shape = (n_batch, *values.shape[1:])
            return torch.zeros(shape, dtype=torch.float64, device=values.device).index_add_(
                0, seq_index, values.double()
            )

        err = xs - xh
        sse = err.pow(2).sum(-1)
        norm_x = xs.norm(dim=-1)
        norm_x_safe = torch.where(norm_x < 1e-4, torch.ones_like(norm_x), norm_x)
        centered = xs - self.reference
        batch_centered = xs - xs.mean(0)
        self.current.update(
            n_rec=per_seq(torch.ones_like(sse)),
            sse=per_seq(sse),
            sum_sq_norm=per_seq(norm_x.pow(2)),
            sum_sq_centered=per_seq(centered.pow(2).sum(-1)),
            sum_x_centered=per_seq(centered),
            cos_sum=per_seq(torch.nn.functional.cosine_similarity(xs, xh, dim=-1, eps=1e-8)),
            rel_err_sum=per_seq(sse.sqrt() / norm_x_safe),
            l2_ratio_sum=per_seq(xh.norm(dim=-1) / norm_x_safe),
            ev_legacy_sum=per_seq(1.0 - sse / batch_centered.pow(2).sum(-1)),
            l0_sum=per_seq(active.sum(-1).double()),
            l1_sum=per_seq(z.abs().sum(-1).double()),
        )
        self.firing += active.sum(0).double()

    def add_scores(self, scores: BatchScores, kept: torch.Tensor, predicted: torch.Tensor) -> None:
        """``kept``: the positions averaged into KL; ``predicted``: the predictions averaged into CE."""
        kept = kept.to(scores.ce_orig.device)
        kept_ce = predicted.to(scores.ce_orig.device)

        ce_orig = _masked(scores.ce_orig, kept_ce)
        self.current["ce_sum_orig"] = ce_orig.sum(1)
        self.current["n_ce"] = kept_ce.double().sum(1)
        self.current["n_kl"] = kept.double().sum(1)
        self.position["ce_orig"] += ce_orig.sum(0)
        self.position["n_ce"] += kept_ce.double().sum(0)
        self.position["n_kl"] += kept.double().sum(0)
        for name, ce in scores.ce.items():
            ce_kept = _masked(ce, kept_ce)
            self.current[f"ce_sum_{name}"] = ce_kept.sum(1)
            if name == "sae":
                self.position["ce_sae"] += ce_kept.sum(0)
        for name, kl in scores.kl.items():
            kl_kept = _masked(kl, kept)
            self.current[f"kl_sum_{name}"] = kl_kept.sum(1)
            if name == "sae":
                self.position["kl_sae"] += kl_kept.sum(0)

    def end_batch(self) -> None:
        self.batches.append({key: value.detach().to("cpu") for key, value in self.current.items()})
        self.current = {}

    def mean_activation(self) -> torch.Tensor:
        assert self.reference is not None
        centered = torch.stack([b["sum_x_centered"].sum(0) for b in self.batches]).sum(0)
        count = sum(float(b["n_rec"].sum()) for b in self.batches)
        return self.reference.to("cpu") + centered / count

    def add_mean_from_template(
        self, template: torch.Tensor, tokens: torch.Tensor, predicted_all: torch.Tensor
    ) -> None:
        row = 0
        for batch_sums in self.batches:
            n = batch_sums["n_ce"].shape[0]
            batch, predicted = tokens[row : row + n], predicted_all[row : row + n]
            ce = _token_ce(template.unsqueeze(0).expand(n, -1, -1), batch)
            batch_sums["ce_sum_mean"] = _masked(ce, predicted.to(ce.device)).sum(1).to("cpu")
            row += n

    def per_sequence(self) -> dict[str, np.ndarray]:
        keys = self.batches[0].keys()
        return {key: torch.cat([b[key] for b in self.batches]).numpy() for key in keys}

    def latent_density(self) -> np.ndarray:
        n_rec = sum(float(b["n_rec"].sum()) for b in self.batches)
        return (self.firing / n_rec).to("cpu").numpy()

    def position_curves(self) -> tuple[list[float | None], list[float | None]]:
        pos = {key: value.to("cpu").numpy() for key, value in self.position.items()}
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = (pos["ce_sae"] - pos["ce_orig"]) / pos["n_ce"]
            kl = pos["kl_sae"] / pos["n_kl"]
        # Positions with no evaluated token (the excluded BOS, the last position for CE) have no value: None.
        return _finite_or_none(delta), _finite_or_none(kl)


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` holds, else 0, in float64.

    ``where``, not a product: an excluded position's inf (e.g. after padding) must not become 0 x inf = NaN.
    """
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).double()


def _token_ce(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at positions 0..S-2."""
    targets = tokens[:, 1:].to(log_probs.device)
    return -log_probs[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
