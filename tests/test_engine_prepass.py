"""The mean-ablation pre-pass runs the model only up to the hooks it reads (the default
configuration had run 3.5 forward passes' worth of blocks where 2.0 would do)."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pytest_saecheck import evaluate
from pytest_saecheck.engine.capture import capture_then_stop
from pytest_saecheck.engine.cut import HookedTransformerCut
from pytest_saecheck.errors import HookNotFoundError, SAECheckWarning


def _model(n_layers: int = 4) -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=16,
        n_ctx=16,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=50,
        act_fn="gelu",
        normalization_type="LN",
    )
    return HookedTransformer(cfg).eval()


def test_capture_stops_after_the_last_hook_with_the_same_activations() -> None:
    model = _model()
    tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    calls = [0] * 4
    handles = [
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(model.blocks)
    ]
    names = ["blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre"]
    with torch.no_grad():
        cut = HookedTransformerCut(model)
        early = capture_then_stop(cut, tokens, [cut.site(name, None) for name in names])
        _, cache = model.run_with_cache(tokens, names_filter=names)
    for handle in handles:
        handle.remove()
    assert calls[2] == 1 and calls[3] == 1  # only run_with_cache's run reached blocks 2 and 3
    for name in names:
        assert torch.equal(early[name], cache[name])
    assert not any(hook.fwd_hooks for hook in model.hook_dict.values())  # hooks removed after stopping
    with pytest.raises(HookNotFoundError, match=r"blocks\.1\.hook_mlp_in"):
        capture_then_stop(cut, tokens, [cut.site("blocks.1.hook_mlp_in", None)])


def test_the_default_mean_ablation_prepass_does_not_run_the_blocks_after_the_hook() -> None:
    model = _model()
    sae_cfg = StandardSAEConfig(d_in=16, d_sae=32)
    sae_cfg.metadata.hook_name = (
        "blocks.0.hook_mlp_out"  # not a residual hook: mean ablation needs the pre-pass
    )
    sae = StandardSAE(sae_cfg)
    tokens = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(1))
    last = [0]
    handle = model.blocks[3].register_forward_hook(lambda *_: last.__setitem__(0, last[0] + 1))
    with pytest.warns(SAECheckWarning, match="the model has hooks attached"):  # the counting hook
        result = evaluate(model, sae, tokens, batch_size=4, progress=False, exclude_special_tokens=False)
    handle.remove()
    # per batch: the original run and one stacked run of the spliced and ablated continuations reach block 3
    assert last[0] == 2 * 2, last
    assert "ce_mean" in result.metrics
