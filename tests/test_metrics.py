"""Metric formulas and the bootstrap, on synthetic per-sequence sums."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_saecheck import ConfigError
from pytest_saecheck.metrics import (
    BOOTSTRAPPABLE,
    METRIC_NAMES,
    METRICS,
    metrics_from_sums,
)
from pytest_saecheck.scaling import DEFAULT_LAW
from pytest_saecheck.stats import bootstrap_interval


def sums_from_tokens(
    x: np.ndarray, x_hat: np.ndarray, ce: dict[str, np.ndarray], reference: np.ndarray
) -> dict:
    """Build one sequence's sums the way the engine does, from explicit per-token values."""
    err = ((x - x_hat) ** 2).sum(-1)
    centered = x - reference
    return {
        "n_ce": np.float64(len(x)),
        "n_kl": np.float64(len(x)),
        "n_rec": np.float64(len(x)),
        **{f"ce_sum_{v}": values.sum() for v, values in ce.items()},
        "kl_sum_sae": np.float64(0.1 * len(x)),
        "kl_sum_zero": np.float64(2.0 * len(x)),
        "sse": err.sum(),
        "sum_sq_norm": (x**2).sum(),
        "sum_sq_centered": (centered**2).sum(),
        "sum_x_centered": centered.sum(0),
        "cos_sum": np.float64(0.0),
        "rel_err_sum": np.float64(0.0),
        "l2_ratio_sum": np.float64(0.0),
        "ev_legacy_sum": np.float64(0.0),
        "l0_sum": np.float64(0.0),
        "l1_sum": np.float64(0.0),
    }


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(1e-2, 1e2),
    noise=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_explained_variance_is_centring_invariant(offset, scale, noise, seed):
    """R² about the mean does not depend on the reference the sums are centred on, nor on a common offset."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, 6)) * scale + offset
    x_hat = x + noise * scale * rng.normal(size=x.shape)
    ce = {"orig": np.ones(50), "sae": np.ones(50) * 1.5, "zero": np.ones(50) * 4}
    direct = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    # Centred near the data (as the engine does, on its first batch's mean) the sums are well conditioned...
    for reference in (x[:5].mean(0), x.mean(0) + scale):
        value = metrics_from_sums(sums_from_tokens(x, x_hat, ce, reference))["explained_variance"]
        assert value == pytest.approx(direct, rel=1e-9, abs=1e-9)
    # ...centred on zero, Σ‖x‖² − ‖Σx‖²/n cancels: float64 keeps ~16 digits, (offset/scale)² of them are lost.
    about_zero = metrics_from_sums(sums_from_tokens(x, x_hat, ce, np.zeros(6)))["explained_variance"]
    lost = (abs(offset) / scale) ** 2 + 1.0
    assert about_zero == pytest.approx(direct, abs=1e-14 * lost * len(x))


def test_ce_scores_from_sums():
    x = np.arange(12.0).reshape(4, 3)
    ce = {"orig": np.full(4, 2.0), "sae": np.full(4, 2.5), "zero": np.full(4, 7.0), "mean": np.full(4, 4.0)}
    m = metrics_from_sums(sums_from_tokens(x, x, ce, np.zeros(3)))
    assert m["delta_ce"] == pytest.approx(0.5)
    assert m["ce_loss_score"] == pytest.approx((7.0 - 2.5) / (7.0 - 2.0))
    assert m["ce_loss_score_mean_ablation"] == pytest.approx((4.0 - 2.5) / (4.0 - 2.0))
    assert m["ce_rec"] == pytest.approx(2 - 2.5 / 2.0)
    assert m["kl_div_score"] == pytest.approx((2.0 - 0.1) / 2.0)
    irreducible, gamma = DEFAULT_LAW.irreducible, DEFAULT_LAW.gamma
    assert gamma == pytest.approx(0.34 * 0.28 / 0.62)
    assert m["compute_fraction"] == pytest.approx(((2.5 - irreducible) / (2.0 - irreducible)) ** (-1 / gamma))
    assert m["explained_variance"] == pytest.approx(1.0)


def test_undefined_scores_are_nan_not_inf():
    x = np.arange(12.0).reshape(4, 3)
    ce = {"orig": np.full(4, 2.0), "sae": np.full(4, 2.5), "zero": np.full(4, 2.0)}
    m = metrics_from_sums(sums_from_tokens(x, x, ce, np.zeros(3)), scaling_law=(3.0, 0.15))
    assert np.isnan(m["ce_loss_score"])
    assert np.isnan(m["compute_fraction"])


def test_every_metric_is_documented():
    assert set(METRIC_NAMES) == set(METRICS)
    assert BOOTSTRAPPABLE == set(METRIC_NAMES) - {
        "alive_fraction",
        "participation_ratio",
        "participation_ratio_deflated",
    }
    for info in METRICS.values():
        assert info.formula and info.scale


def test_bootstrap_of_constant_data_has_zero_width():
    per_sequence = {"a": np.full(10, 3.0), "n": np.ones(10)}
    low, high = bootstrap_interval(per_sequence, lambda s: s["a"] / s["n"], n_resamples=300)
    assert low == pytest.approx(3.0) and high == pytest.approx(3.0)


def test_bootstrap_is_paired():
    """Two variants with noisy but identical per-sequence losses: the paired difference has zero width."""
    rng = np.random.default_rng(0)
    losses = rng.normal(3.0, 1.0, size=30)
    per_sequence = {"orig": losses, "sae": losses + 0.25, "n": np.ones(30)}
    low, high = bootstrap_interval(per_sequence, lambda s: (s["sae"] - s["orig"]) / s["n"], n_resamples=500)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5])
def test_bootstrap_rejects_bad_level(level):
    with pytest.raises(ConfigError, match="level"):
        bootstrap_interval({"a": np.ones(3)}, lambda s: s["a"], level=level)


def test_bootstrap_needs_two_sequences():
    with pytest.raises(ConfigError, match="at least 2 sequences"):
        bootstrap_interval({"a": np.ones(1)}, lambda s: s["a"])


@settings(max_examples=40, deadline=None)
@given(
    n_tokens=st.integers(0, 40),
    d_sae=st.integers(1, 300),
    density=st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0]),
    dtype=st.sampled_from(["float32", "bfloat16", "float64"]),
    seed=st.integers(0, 2**16),
)
def test_latent_counts_equal_counting_nonzero_entries(n_tokens, d_sae, density, dtype, seed):
    """L0 per token (the 0-norm) and firing per latent (from the nonzero indices when sparse, a boolean sum when
    dense) both equal counting ``latents != 0`` directly, for sparse and dense codes and low-precision latents."""
    import torch

    from pytest_saecheck.engine.accumulate import firing_counts
    from pytest_saecheck.metrics import reconstruction_terms

    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(n_tokens, d_sae, generator=generator) + 0.5
    mask = torch.rand(n_tokens, d_sae, generator=generator) < density
    latents = torch.where(mask, values, torch.zeros(())).to(getattr(torch, dtype))
    active = latents != 0
    assert torch.equal(firing_counts(latents), active.sum(0))
    x = torch.randn(n_tokens, 4, generator=generator, dtype=torch.float64)
    terms = reconstruction_terms(x, x, latents, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(terms["l0_sum"], active.sum(-1).double())


def test_l0_counts_exactly_on_a_wide_bfloat16_code():
    """bfloat16 holds integers exactly only up to 256: the count is made in float32 whatever the latents' dtype."""
    import torch

    from pytest_saecheck.metrics import reconstruction_terms

    latents = torch.ones(2, 4097, dtype=torch.bfloat16)
    latents[1, :1000] = 0
    x = torch.zeros(2, 3, dtype=torch.float64)
    terms = reconstruction_terms(x, x, latents, torch.zeros(3, dtype=torch.float64))
    assert terms["l0_sum"].tolist() == [4097.0, 3097.0]


def test_firing_counts_off_the_cpu_take_the_sum_without_a_synchronisation():
    """On an accelerator the count is the boolean sum: no nonzero() or item(), which would wait for the device.
    The meta device (no data; item() raises there) stands in for one on this CPU-only machine."""
    import torch

    from pytest_saecheck.engine.accumulate import firing_counts

    counts = firing_counts(torch.zeros(5, 7, device="meta"))
    assert counts.shape == (7,) and counts.device.type == "meta"


@settings(max_examples=30, deadline=None, derandomize=True)
@given(offset=st.floats(-1e2, 1e2), scale=st.floats(1e-2, 1e2), seed=st.integers(0, 2**16))
def test_variance_about_the_mean_from_centred_sums_equals_the_direct_sum(offset, scale, seed):
    """``variance_about_mean`` (the one home of Σ‖x − x̄‖² from sums centred on c) against the direct float64
    sum, for c near the data (as the engine centres them) and for a batch of resampled sums (leading axis)."""
    from pytest_saecheck.metrics import total_variance, variance_about_mean

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 5)) * scale + offset
    direct = float(((x - x.mean(0)) ** 2).sum())
    sums = sums_from_tokens(x, x, {"orig": np.ones(40), "sae": np.ones(40)}, x[:4].mean(0))
    # relative error of the subtraction: float64 rounding of ‖x − c‖² terms, scaled by how far c is from x̄
    assert total_variance(sums) == pytest.approx(direct, rel=1e-12)
    stacked = {key: np.stack([np.asarray(value)] * 3) for key, value in sums.items()}
    assert variance_about_mean(stacked) == pytest.approx([direct] * 3, rel=1e-12)


def test_every_sum_key_names_its_quantity_model_and_part():
    """A ``Sum`` is found from what it means, and means what it is found from; its value is the stored name."""
    from pytest_saecheck.sums import Part, Quantity, Scored, Sum

    for key in Sum:
        if key.quantity is not Quantity.RECONSTRUCTION:
            assert Sum.of(key.quantity, key.scored, key.part) is key
    assert Sum.ce(Scored.MEAN) == "ce_sum_mean" and Sum.kl(Scored.SAE, Part.BEYOND) == "kl_sum_sae_beyond"
    assert f"{Sum.N_CE}" == "n_ce" and str(Sum.N_CE) == "n_ce"
    with pytest.raises(KeyError, match="no sum of KL for scored=mean"):
        Sum.kl(Scored.MEAN)


def test_a_metric_without_its_ablation_says_which_ablation_from_the_metric_not_its_spelling():
    from pytest_saecheck.metrics import METRIC_NAMES, ablation_needed
    from pytest_saecheck.sums import Scored

    needs_mean = {name for name in METRIC_NAMES if ablation_needed(name) is Scored.MEAN}
    assert needs_mean == {"ce_mean", "ce_loss_score_mean_ablation"}
    needs_zero = {name for name in METRIC_NAMES if ablation_needed(name) is Scored.ZERO}
    assert needs_zero == {"ce_zero", "ce_loss_score", "kl_zero", "kl_div_score"}
    # each is computed exactly when its sums are present
    sums = {
        "n_ce": np.float64(4),
        "n_kl": np.float64(4),
        "ce_sum_orig": np.float64(8.0),
        "ce_sum_sae": np.float64(9.0),
        "kl_sum_sae": np.float64(1.0),
    }
    assert not needs_mean & set(metrics_from_sums(sums)) and not needs_zero & set(metrics_from_sums(sums))
    with_ablations = {
        **sums,
        "ce_sum_mean": np.float64(20.0),
        "ce_sum_zero": np.float64(30.0),
        "kl_sum_zero": np.float64(5.0),
    }
    assert needs_mean | needs_zero <= set(metrics_from_sums(with_ablations))


# Modules of other work streams that still spell sum keys as strings (they work: a Sum is a str whose value is
# the name); each is to use pytest_saecheck.sums.Sum, and no other module may spell one.
STILL_SPELLED = {"engine/replacement.py", "sequential.py"}


def test_no_module_spells_a_sum_key_as_a_string():
    import ast
    from pathlib import Path

    import pytest_saecheck
    from pytest_saecheck.sums import Sum

    names = {key.value for key in Sum}
    prefixes = ("ce_sum_", "kl_sum_", "n_ce_", "n_kl_")
    root = Path(pytest_saecheck.__file__).parent
    spelled: dict[str, list[int]] = {}
    for path in sorted(root.rglob("*.py")):
        if path.name == "sums.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and (node.value in names or node.value.startswith(prefixes))
            ):
                spelled.setdefault(path.relative_to(root).as_posix(), []).append(node.lineno)
    assert set(spelled) <= STILL_SPELLED, {
        path: lines for path, lines in spelled.items() if path not in STILL_SPELLED
    }
