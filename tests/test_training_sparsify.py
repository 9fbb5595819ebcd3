"""The AuxK checks against EleutherAI sparsify's SparseCoder (PyPI ``eai-sparsify``, an optional dependency)."""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch
from packaging.version import Version

sparsify = pytest.importorskip("sparsify")

from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

from pytest_saecheck.training import (  # noqa: E402
    SparsifyAdapter,
    assert_aux_k_scaling,
    assert_aux_loss_zero_without_dead,
    assert_aux_residual_detached,
    assert_no_aux_bias_double_count,
    assert_training_objective,
    resolve_training_adapter,
)

SPARSIFY_VERSION = Version(importlib.metadata.version("eai-sparsify"))
#: first release whose AuxK loss decodes without b_dec (EleutherAI/sparsify#134; 1.3.2 and earlier call decode())
SPARSIFY_AUX_BIAS_FIXED = Version("1.3.3")

VARIANTS = {
    "topk": {},
    "groupmax": {"activation": "groupmax"},
    "skip_connection": {"skip_connection": True},
}


def _make(variant: str = "topk", cls: type = SparseCoder) -> SparseCoder:
    torch.manual_seed(0)
    sae = cls(16, SparseCoderConfig(num_latents=64, k=4, **VARIANTS[variant]))
    with torch.no_grad():  # sparsify zero-initialises these; give them values so every path matters
        sae.encoder.bias.normal_(0.0, 0.1)
        if sae.W_skip is not None:
            sae.W_skip.normal_(0.0, 0.05)
    return sae


def _buggy(bug: str) -> type:
    """A SparseCoder subclass whose AuxK loss has one known bug (``bug="none"``: the correct formula)."""

    class Buggy(SparseCoder):
        def forward(self, x, y=None, *, dead_mask=None, **kwargs):
            out = super().forward(x, y, **kwargs)
            if dead_mask is None or (num_dead := int(dead_mask.sum())) == 0:
                return out
            target = x if y is None else y
            e = target - out.sae_out
            if bug != "no_detach":
                e = e.detach()
            k_aux = target.shape[-1] // 2
            scale = min(num_dead / k_aux, 1.0)
            k_aux = min(k_aux, num_dead)
            pre_acts = self.encode(x).pre_acts
            vals, idx = torch.where(dead_mask[None], pre_acts, -math.inf).topk(k_aux, sorted=False)
            e_hat = self.decode(vals, idx)  # decode() adds b_dec
            if bug != "double_count":
                e_hat = e_hat - self.b_dec
            total_variance = (target - target.mean(0)).pow(2).sum()
            return out._replace(auxk_loss=scale * (e_hat - e).pow(2).sum() / total_variance)

    Buggy.__name__ = Buggy.__qualname__ = f"{bug.title().replace('_', '')}SparseCoder"
    return Buggy


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_installed_sparse_coder(variant):
    sae = _make(variant)
    before = _state(sae)
    adapter = resolve_training_adapter(sae)
    assert isinstance(adapter, SparsifyAdapter)
    assert adapter.shift_invariant == (variant != "skip_connection")
    if SPARSIFY_VERSION < SPARSIFY_AUX_BIAS_FIXED:
        with pytest.raises(AssertionError, match="matched: double-counting formula"):
            assert_no_aux_bias_double_count(sae)
    else:
        assert_no_aux_bias_double_count(sae)
    assert_aux_residual_detached(sae)
    assert_aux_k_scaling(sae)
    assert_aux_loss_zero_without_dead(sae)
    after = sae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_subclass_readding_b_dec_fails(variant):
    sae = _make(variant, cls=_buggy("double_count"))
    with pytest.raises(AssertionError) as excinfo:
        assert_no_aux_bias_double_count(sae)
    msg = str(excinfo.value)
    assert "DoubleCountSparseCoder (sparsify adapter)" in msg
    assert "matched: double-counting formula" in msg
    assert ("metamorphic check failed" in msg) == (variant != "skip_connection")
    assert_aux_residual_detached(sae)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_subclass_forgetting_detach_fails(variant):
    sae = _make(variant, cls=_buggy("no_detach"))
    with pytest.raises(AssertionError) as excinfo:
        assert_aux_residual_detached(sae)
    assert "matched: residual NOT detached, b_dec excluded" in str(excinfo.value)
    assert_no_aux_bias_double_count(sae)


def test_correct_subclass_passes_every_check():
    assert_training_objective(_make(cls=_buggy("none")))


def test_adapter_normalises_by_total_variance():
    adapter = SparsifyAdapter(_make())
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # total variance about the mean: 2
    assert float(adapter.reduce_aux_error(torch.ones(2, 2), x)) == pytest.approx(2.0)


def test_encoder_only_coder_is_rejected():
    from pytest_saecheck.errors import TrainingCheckError

    sae = SparseCoder(16, SparseCoderConfig(num_latents=64, k=4), decoder=False)
    with pytest.raises(TrainingCheckError, match="without a decoder"):
        assert_no_aux_bias_double_count(sae)
