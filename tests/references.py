"""SAE Lens' own evaluation, the reference the engine tests compare with (imported by those tests only: importing
it imports SAE Lens, which the plugin tests expect the plugin to import first)."""

from __future__ import annotations

import math
from typing import Any

import torch


def _sae_lens_has_pooled_r2() -> bool:
    from sae_lens import evals

    return hasattr(evals, "ExplainedVarianceCalculator")


# Older sae-lens 6.x computed `explained_variance` and `mse` with formulas that differ from the current (and
# our) definitions; the pooled R² arrived with ExplainedVarianceCalculator. CI also runs the engine tests
# against sae-lens 6.5.1, where only the metrics both sides define the same way are compared.
SAE_LENS_POOLED_R2 = _sae_lens_has_pooled_r2()


class _Store:
    """The slice of SAE Lens' ActivationsStore that its eval functions use."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens, self.row = tokens, 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        batch = self.tokens[self.row : self.row + n]
        self.row += n
        return batch


def sae_lens_reference(
    model: Any,
    sae: Any,
    tokens: torch.Tensor,
    batch_size: int,
    ignore_tokens: Any = None,
    exclude_targets: bool = False,
) -> dict[str, float]:
    """SAE Lens' numbers; ``exclude_targets`` also drops predictions whose target is an ignored token (our rule)."""
    from sae_lens.evals import get_recons_loss, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    if sae.cfg.metadata.hook_name.endswith("hook_z"):
        sae.turn_off_forward_pass_hook_z_reshaping()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        values = get_recons_loss(
            sae,
            model,
            ActivationScaler(),
            batch,
            compute_kl=True,
            compute_ce_loss=True,
            ignore_tokens=set(ignore_tokens or ()),
        )
        for name, value in values.items():
            if ignore_tokens:
                ignored = torch.isin(batch, torch.tensor(ignore_tokens))
                mask = ~ignored[:, : value.shape[1]]
                if exclude_targets and value.shape[1] < batch.shape[1]:  # a CE: position t predicts t + 1
                    mask = mask & ~ignored[:, 1:]
                value = value[mask]
            parts.setdefault(name, []).append(value.flatten())
    ref = {name: torch.cat(values).mean().item() for name, values in parts.items()}
    sparsity, _ = get_sparsity_and_variance_metrics(
        sae,
        model,
        _Store(tokens),
        ActivationScaler(),
        n_batches=math.ceil(len(tokens) / batch_size),
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=False,
        eval_batch_size_prompts=batch_size,
        model_kwargs={},
        ignore_tokens=set(ignore_tokens or ()),  # sae-lens < 6.3x rejects None
    )
    ref.update(sparsity)
    ref["kl_div_score"] = (ref["kl_div_with_ablation"] - ref["kl_div_with_sae"]) / ref["kl_div_with_ablation"]
    ref["ce_loss_score"] = (ref["ce_loss_with_ablation"] - ref["ce_loss_with_sae"]) / (
        ref["ce_loss_with_ablation"] - ref["ce_loss_without_sae"]
    )
    return ref


def per_token(
    model: Any, sae: Any, tokens: torch.Tensor, hook: str = "blocks.1.hook_resid_pre"
) -> tuple[Any, ...]:
    """Independent per-position CE (orig, spliced) and KL, BOS kept untouched, float64."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[hook])
        x = cache[hook]
        spliced = torch.where(keep[..., None], sae.decode(sae.encode(x)), x)
        sae_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, hook: spliced)])
    lp, lq = torch.log_softmax(logits.double(), -1), torch.log_softmax(sae_logits.double(), -1)
    targets = tokens[:, 1:, None]
    ce_orig = -lp[:, :-1].gather(-1, targets).squeeze(-1)
    ce_sae = -lq[:, :-1].gather(-1, targets).squeeze(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return ce_orig, ce_sae, kl, keep
