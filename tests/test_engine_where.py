"""Where the splice hurts: within vs beyond the SAE's training context, and the participation ratio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import D_MODEL, N_CTX, make_engine_model, make_tokens, random_sae
from references import per_token

from pytest_saecheck import SAECheckWarning, evaluate
from pytest_saecheck.metrics import participation_ratios

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    return make_engine_model()


def test_within_and_beyond_the_training_context_against_a_direct_computation(model):
    sae = random_sae(HOOK)
    sae.cfg.metadata.context_size = 6
    tokens = make_tokens(10)
    result = evaluate(model, sae, tokens, batch_size=4, progress=False)
    ce_orig, ce_sae, kl, _ = per_token(model, sae, tokens)
    delta = ce_sae - ce_orig
    within, beyond = slice(1, 6), slice(6, None)  # position 0 (BOS) is excluded
    assert result.metrics["delta_ce_within_context"] == pytest.approx(
        delta[:, within].mean().item(), abs=1e-5
    )
    assert result.metrics["delta_ce_beyond_context"] == pytest.approx(
        delta[:, beyond].mean().item(), abs=1e-5
    )
    assert result.metrics["kl_sae_within_context"] == pytest.approx(kl[:, within].mean().item(), abs=1e-6)
    assert result.metrics["kl_sae_beyond_context"] == pytest.approx(kl[:, beyond].mean().item(), abs=1e-6)
    # the parts add back to the whole, token-weighted
    n_within, n_beyond = 5 * 10, (N_CTX - 1 - 6) * 10
    whole = (
        n_within * result.metrics["delta_ce_within_context"]
        + n_beyond * result.metrics["delta_ce_beyond_context"]
    ) / (n_within + n_beyond)
    assert whole == pytest.approx(result.metrics["delta_ce"], abs=1e-9)
    low, high = result.confidence_interval("delta_ce_beyond_context")
    assert low <= result.metrics["delta_ce_beyond_context"] <= high


def test_context_metrics_are_undefined_with_a_reason(model):
    sae = random_sae(HOOK)
    result = evaluate(model, sae, make_tokens(4), progress=False)
    assert "no training context size" in result.undefined["delta_ce_beyond_context"]
    sae.cfg.metadata.context_size = N_CTX
    result = evaluate(model, sae, make_tokens(4), progress=False)
    assert "inside the SAE's training context" in result.undefined["delta_ce_beyond_context"]
    assert result.metrics["delta_ce_within_context"] == pytest.approx(result.metrics["delta_ce"], abs=1e-9)


def test_participation_ratio_of_a_known_spectrum():
    rng = np.random.default_rng(0)
    eigenvalues = np.array([9.0, 1.0, 1.0, 1.0, 0.5, 0.5])
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    covariance = basis @ np.diag(eigenvalues) @ basis.T
    raw, deflated = participation_ratios(covariance)
    assert raw == pytest.approx(eigenvalues.sum() ** 2 / (eigenvalues**2).sum(), rel=1e-9)
    rest = eigenvalues[1:]
    assert deflated == pytest.approx(rest.sum() ** 2 / (rest**2).sum(), rel=1e-9)
    assert participation_ratios(np.eye(5))[0] == pytest.approx(5.0)


def test_participation_ratio_of_the_activations_matches_numpy(model):
    tokens = make_tokens(8)
    result = evaluate(model, random_sae(HOOK), tokens, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, D_MODEL).double().numpy()
    eigenvalues = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))
    assert result.metrics["participation_ratio"] == pytest.approx(
        eigenvalues.sum() ** 2 / (eigenvalues**2).sum(), rel=1e-6
    )
    with pytest.raises(Exception, match="whole token set"):
        result.confidence_interval("participation_ratio")


def test_a_dominant_direction_flags_r2():
    model = make_engine_model(seed=4)
    direction = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1))
    signs = torch.tensor([(-1.0) ** t for t in range(N_CTX)])
    with torch.no_grad():
        model.W_pos.add_(300.0 * signs[:, None] * direction / direction.norm())
    with pytest.warns(SAECheckWarning, match="participation ratio .* explained_variance .* is inflated"):
        result = evaluate(model, random_sae(HOOK), make_tokens(8), progress=False)
    assert result.metrics["participation_ratio"] < 2.0
