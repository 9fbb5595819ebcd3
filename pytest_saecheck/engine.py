"""The evaluation engine: every behavioural and reconstruction metric of an SAE in one streaming pass.

How a batch is evaluated:

1. the model runs once up to the hook (``stop_at_layer``); that activation is reused by every variant;
2. the SAE reconstructs it; the spliced, zero-ablated and mean-ablated activations replace it only at the
   positions the token policy keeps;
3. the variants run through the rest of the model together (``start_at_layer``); each is unembedded once and
   CE/KL are scored a few rows at a time (``pytest_saecheck.scoring``), so the logits of the original run and
   of one variant are the only ``[batch, pos, vocab]`` tensors alive;
4. per-sequence sums are accumulated in float64; every metric is a function of those sums
   (``pytest_saecheck.metrics``), which also gives paired bootstrap intervals over sequences.

For residual-stream hooks, when only position 0 (always the same token) or nothing is excluded, the zero-
and mean-ablated continuations do not depend on the tokens: every ablated position holds the same vector
and position 0 always holds the same token. They are then computed once, for one sequence, and reused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pytest_saecheck.errors import (
    ConfigError,
    DegenerateActivationsError,
    EmptyTokenSetError,
    NonFiniteError,
    ShapeMismatchError,
)
from pytest_saecheck.hookpoints import HookSite, resolve_hook
from pytest_saecheck.metrics import (
    BOOTSTRAPPABLE,
    CHINCHILLA_SCALING_LAW,
    METRIC_NAMES,
    metrics_from_sums,
    total_variance,
)
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.scoring import BatchScores, chunk_rows_for, score_batch
from pytest_saecheck.stats import DEFAULT_RESAMPLES, bootstrap_intervals

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
    _interval_cache: dict[tuple[float, int, int], dict[str, tuple[float, float]]] = field(
        default_factory=dict, repr=False
    )

    def confidence_interval(
        self, name: str, level: float = 0.95, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
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
        self, level: float = 0.95, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Bootstrap intervals of every defined metric that has one, from one set of resamples (cached)."""
        key = (float(level), int(n_resamples), int(seed))
        if key not in self._interval_cache:
            law = self.scaling_law
            names = [name for name in self.metrics if name in BOOTSTRAPPABLE]

            def statistics(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                values = metrics_from_sums(sums, law)
                return {name: values[name] for name in names}

            self._interval_cache[key] = bootstrap_intervals(
                self.per_sequence, statistics, level=level, n_resamples=n_resamples, seed=seed
            )
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
    exclude_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    policy: TokenPolicy | None = None,
    mean_activation: torch.Tensor | None = None,
    mean_ablation: bool = True,
    scaling_law: tuple[float, float] | None = CHINCHILLA_SCALING_LAW,
    progress: bool | None = None,
) -> Evaluation:
    """Evaluate ``sae`` spliced into ``model`` on ``tokens`` (``[n_sequences, seq_len]`` token ids).

    ``policy`` (or ``exclude_bos`` / ``exclude_token_ids`` / ``pad_token_id``) decides which positions are
    spliced, ablated and averaged. ``mean_activation`` fixes the mean-ablation vector (default: the mean over
    the evaluated positions). ``scaling_law`` is ``(E, gamma)`` of ``L(C) = E + A C^-gamma`` for
    ``compute_fraction`` (default: Chinchilla's). ``progress=None`` shows a bar only after two seconds.
    """
    started = time.perf_counter()
    if policy is None:
        policy = TokenPolicy(exclude_bos, tuple(exclude_token_ids), pad_token_id)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    runner = _Runner(model, sae, policy)
    tokens = runner.check_tokens(tokens)
    with torch.inference_mode(), _hook_z_reshaping_off(sae):
        result = runner.run(tokens, batch_size, mean_activation, mean_ablation, scaling_law, progress)
    result.duration_s = time.perf_counter() - started
    return result


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
    def __init__(self, model: Any, sae: Any, policy: TokenPolicy) -> None:
        self.model = model
        self.sae = sae
        self.policy = policy
        self.n_layers: int = model.cfg.n_layers
        self.device = _model_device(model)
        self.sae_device = torch.device(getattr(sae, "device", self.device))
        metadata = getattr(sae.cfg, "metadata", None)
        hook_name = getattr(metadata, "hook_name", None) or getattr(sae.cfg, "hook_name", None)
        if not hook_name:
            raise ConfigError(
                "the SAE config names no hook (cfg.metadata.hook_name); set it to the hook it reads"
            )
        head_index = getattr(metadata, "hook_head_index", None)
        self.site: HookSite = resolve_hook(hook_name, head_index, self.n_layers, list(model.hook_dict))
        self._check_sae_weights()
        self._plain_unembed = _has_plain_unembed(model)

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
        kept = self.policy.kept_mask(tokens)
        if not kept[:, :-1].any():
            raise EmptyTokenSetError(
                f"no position is left to evaluate after the token policy {self.policy.to_dict()} "
                f"on tokens of shape {tuple(tokens.shape)}; use longer sequences or exclude fewer tokens"
            )
        return tokens.to(self.device)

    # --- model pieces -------------------------------------------------------------------------------------

    @property
    def _cut(self) -> int:
        return self.site.resid_layer if self.site.resid_layer is not None else self.site.layer

    def _prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, stop_at_layer=self._cut)

    def _capture_in_block(self, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []

        def capture(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            captured.append(activation)
            return activation

        layer = self.site.layer
        with self.model.hooks(fwd_hooks=[(self.site.hook_name, capture)]):
            block_out = self.model(resid, start_at_layer=layer, stop_at_layer=layer + 1)
        return captured[0], block_out

    def _replace_in_block(self, resid: torch.Tensor, activations: list[torch.Tensor]) -> torch.Tensor:
        replacement = torch.cat(activations, dim=0)

        def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            return replacement

        layer = self.site.layer
        batched = resid.repeat(len(activations), *([1] * (resid.ndim - 1)))
        with self.model.hooks(fwd_hooks=[(self.site.hook_name, replace)]):
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

    def _sae(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = x.to(self.sae_device)
        latents = self.sae.encode(x_in)
        recon = self.sae.decode(latents)
        if latents.is_sparse:
            latents = latents.to_dense()
        if not torch.isfinite(recon).all():
            raise NonFiniteError(
                "the SAE's reconstruction contains NaN or inf on finite input; check its weights, dtype "
                f"({self.sae.dtype}) and activation normalisation ({getattr(self.sae.cfg, 'normalize_activations', None)})"
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
        self, resid: torch.Tensor, x_full: torch.Tensor, variants: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Final residuals (before ln_final) of the original run followed by each variant."""
        if self.site.is_residual:
            stacked = torch.cat([resid, *variants], dim=0)
            return list(self._to_final(stacked, self._cut).chunk(1 + len(variants), dim=0))
        activation_full, block_out = x_full
        replaced = [self.site.write_back(activation_full, v) for v in variants]
        outs = self._replace_in_block(resid, replaced)
        stacked = torch.cat([block_out, outs], dim=0)
        return list(self._to_final(stacked, self.site.layer + 1).chunk(1 + len(variants), dim=0))

    def _hook_activation(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        resid = self._prefix(tokens)
        if self.site.is_residual:
            return resid, None, resid
        activation_full, block_out = self._capture_in_block(resid)
        return resid, (activation_full, block_out), self.site.select(activation_full)

    def _check_width(self, x: torch.Tensor) -> None:
        d_in = int(self.sae.cfg.d_in)
        if x.shape[-1] != d_in:
            head = f" (head {self.site.head_index})" if self.site.head_index is not None else ""
            raise ShapeMismatchError(
                f"the SAE expects d_in={d_in} but hook {self.site.hook_name!r}{head} has width {x.shape[-1]}; "
                "the SAE was trained on a different model or hook"
            )

    # --- ablation templates (token-independent continuations) -------------------------------------------

    def _ablation_is_token_independent(self, tokens: torch.Tensor, kept: torch.Tensor) -> bool:
        if not self.site.is_residual:
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
            resid = torch.zeros((1, tokens.shape[1], d_model), device=self.device, dtype=self.model.cfg.dtype)
        else:
            resid = self._prefix(tokens[:1])
        (variant,) = self._variant_activations(resid, kept[:1], [name], None, mean)
        return self._log_probs(self._to_final(variant, self._cut))[0]

    def _mean_prepass(self, tokens: torch.Tensor, kept_all: torch.Tensor, batch_size: int) -> torch.Tensor:
        total: torch.Tensor | None = None
        count = 0
        for start in range(0, tokens.shape[0], batch_size):
            batch, kept = tokens[start : start + batch_size], kept_all[start : start + batch_size]
            _, _, x = self._hook_activation(batch)
            x64 = x[kept].double()
            total = x64.sum(0) if total is None else total + x64.sum(0)
            count += x64.shape[0]
        assert total is not None
        return total / count

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
        templated = self._ablation_is_token_independent(tokens, kept_all)
        mean = mean_activation
        if mean is not None:
            mean = torch.as_tensor(mean).to(self.device).double()
            if mean.shape != (int(self.sae.cfg.d_in),):
                raise ShapeMismatchError(
                    f"mean_activation must have shape ({int(self.sae.cfg.d_in)},), got {tuple(mean.shape)}"
                )
        if mean_ablation and mean is None and not templated:
            mean = self._mean_prepass(tokens, kept_all, batch_size)

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
            desc=f"saecheck {self.site.hook_name}",
            disable=progress is False,
            delay=0.0 if progress else 2.0,
            leave=False,
        )
        try:
            for start in range(0, n_sequences, batch_size):
                batch = tokens[start : start + batch_size]
                kept = kept_all[start : start + batch_size]
                resid, block_state, x = self._hook_activation(batch)
                self._check_width(x)
                latents, recon = self._sae(x)
                acc.add_reconstruction(x, recon, latents, kept)
                variants = self._variant_activations(x, kept, per_batch_variants, recon, mean)
                finals = self._continue(resid, block_state, variants)
                del resid, block_state, x, latents, recon, variants
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
                acc.add_scores(scores, kept)
                acc.end_batch()
                bar.update(int(kept.sum()))
        finally:
            bar.close()

        if templated and mean_ablation and mean_template is None:
            mean = acc.mean_activation()
            template = self._template_log_probs(tokens, kept_all, "mean", mean)
            acc.add_mean_from_template(template, tokens, kept_all)

        return self._finish(acc, tokens, batch_size, scaling_law)

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
                f"the activations at {self.site.hook_name!r} have zero variance over the {int(totals['n_rec'])} "
                "evaluated positions, so explained variance is undefined; evaluate more varied tokens"
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
        density = acc.latent_density()
        metrics["alive_fraction"] = float(np.mean(density > 0))
        curve_delta, curve_kl = acc.position_curves()
        return Evaluation(
            metrics={name: metrics[name] for name in METRIC_NAMES if name in metrics},
            undefined=undefined,
            n_tokens=int(totals["n_rec"]),
            n_sequences=int(tokens.shape[0]),
            seq_len=int(tokens.shape[1]),
            hook_name=self.site.hook_name,
            hook_head_index=self.site.head_index,
            token_policy=self.policy,
            latent_density=density.tolist(),
            delta_ce_by_position=curve_delta,
            kl_by_position=curve_kl,
            per_sequence=per_sequence,
            scaling_law=scaling_law,
            batch_size=batch_size,
            model_dtype=str(self.model.cfg.dtype).replace("torch.", ""),
            device=str(self.device),
        )


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

    def add_reconstruction(
        self, x: torch.Tensor, recon: torch.Tensor, latents: torch.Tensor, kept: torch.Tensor
    ) -> None:
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

    def add_scores(self, scores: BatchScores, kept: torch.Tensor) -> None:
        kept = kept.to(scores.ce_orig.device)
        kept_ce = kept[:, :-1]

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
        self, template: torch.Tensor, tokens: torch.Tensor, kept_all: torch.Tensor
    ) -> None:
        row = 0
        for batch_sums in self.batches:
            n = batch_sums["n_ce"].shape[0]
            batch, kept = tokens[row : row + n], kept_all[row : row + n]
            ce, kept_ce = _token_ce(template.unsqueeze(0).expand(n, -1, -1), batch, kept)
            batch_sums["ce_sum_mean"] = _masked(ce, kept_ce).sum(1).to("cpu")
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


def _token_ce(
    log_probs: torch.Tensor, tokens: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at positions 0..S-2 and the mask of those that count."""
    targets = tokens[:, 1:].to(log_probs.device)
    ce = -log_probs[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return ce, kept[:, :-1].to(log_probs.device)
