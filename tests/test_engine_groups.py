"""Token groups: the evaluation's metrics restricted to labelled positions, with intervals."""

from __future__ import annotations

import pytest
import torch
from factories import HOOK, identity_sae, make_engine_model, make_tokens, random_sae
from references import per_token

from pytest_saecheck import evaluate
from pytest_saecheck.errors import ConfigError, ShapeMismatchError


@pytest.fixture(scope="module")
def model():
    return make_engine_model()


def labels_for(
    tokens: torch.Tensor, n_groups: int = 3, seed: int = 5, with_none: bool = True
) -> torch.Tensor:
    low = -1 if with_none else 0
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, n_groups, tokens.shape, generator=generator)


def direct_reconstruction(model, sae, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        x = cache[HOOK].double()
        x_hat = sae.decode(sae.encode(cache[HOOK])).double()
    return x, x_hat


def test_group_metrics_against_a_direct_computation(model):
    sae = random_sae(HOOK)
    tokens = make_tokens(10)
    labels = labels_for(tokens)
    result = evaluate(
        model, sae, tokens, batch_size=4, progress=False, token_groups=labels, group_names=["a", "b", "c"]
    )
    ce_orig, ce_sae, kl, keep = per_token(model, sae, tokens)
    x, x_hat = direct_reconstruction(model, sae, tokens)
    assert list(result.groups) == ["a", "b", "c"]
    for index, name in enumerate(["a", "b", "c"]):
        group = result.groups[name]
        in_group = (labels == index) & keep
        in_group_ce = in_group[:, :-1]  # the prediction made at t (of token t + 1) counts for t's group
        delta = (ce_sae - ce_orig)[in_group_ce]
        assert group.n_predictions == int(in_group_ce.sum())
        assert group.n_tokens == int(in_group.sum())
        assert group.metrics["delta_ce"] == pytest.approx(delta.mean().item(), abs=1e-5)
        assert group.metrics["ce_orig"] == pytest.approx(ce_orig[in_group_ce].mean().item(), abs=1e-5)
        assert group.metrics["kl_sae"] == pytest.approx(kl[in_group].mean().item(), abs=1e-6)
        xs, xhs = x[in_group], x_hat[in_group]
        r2 = 1 - ((xs - xhs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
        assert group.metrics["explained_variance"] == pytest.approx(r2.item(), abs=1e-6)
        low, high = group.confidence_interval("delta_ce")
        assert low <= group.metrics["delta_ce"] <= high


def test_groups_sum_back_to_the_whole_token_weighted(model):
    sae = random_sae(HOOK)
    tokens = make_tokens(10)
    labels = labels_for(tokens, n_groups=4, with_none=False)
    result = evaluate(model, sae, tokens, batch_size=3, progress=False, token_groups=labels)
    groups = result.groups.values()
    assert list(result.groups) == ["0", "1", "2", "3"]
    n_ce = sum(group.n_predictions for group in groups)
    n_tokens = sum(group.n_tokens for group in groups)
    assert n_tokens == result.n_tokens
    for metric, count in (("delta_ce", "n_predictions"), ("ce_sae", "n_predictions"), ("kl_sae", "n_tokens")):
        total = sum(getattr(group, count) * group.metrics[metric] for group in groups)
        whole = n_ce if count == "n_predictions" else n_tokens
        assert total / whole == pytest.approx(result.metrics[metric], abs=1e-9)
    mse = sum(group.n_tokens * group.metrics["mse"] for group in groups) / n_tokens
    assert mse == pytest.approx(result.metrics["mse"], rel=1e-9)


def test_an_identity_sae_leaves_every_group_untouched(model):
    tokens = make_tokens(8)
    labels = labels_for(tokens)
    result = evaluate(
        model, identity_sae(HOOK), tokens, progress=False, token_groups=labels, group_names=("x", "y", "z")
    )
    for group in result.groups.values():
        assert group.n_predictions > 0
        assert group.metrics["delta_ce"] == pytest.approx(0.0, abs=1e-5)
        assert group.metrics["kl_sae"] == pytest.approx(0.0, abs=1e-6)
        assert group.metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)


def test_a_callable_grouping_and_an_empty_group(model):
    tokens = make_tokens(6)

    def by_parity(batch: torch.Tensor) -> torch.Tensor:
        return batch % 2

    result = evaluate(
        model,
        random_sae(HOOK),
        tokens,
        progress=False,
        token_groups=by_parity,
        group_names=["even", "odd", "never"],
    )
    assert result.groups["even"].n_tokens + result.groups["odd"].n_tokens == result.n_tokens
    never = result.groups["never"]
    assert never.n_tokens == 0 and not never.metrics
    assert "no evaluated position" in never.undefined["delta_ce"]
    with pytest.raises(ConfigError, match="undefined for group 'never'"):
        never.confidence_interval("delta_ce")
    record = result.to_dict()["groups"]
    assert record["even"]["n_tokens"] == result.groups["even"].n_tokens
    assert set(record["even"]["intervals"]) == set(result.groups["even"].metrics)


def test_joint_evaluations_and_set_members_carry_groups(model):
    tokens = make_tokens(6)
    labels = labels_for(tokens, with_none=False)
    saes = {
        "one": random_sae("blocks.0.hook_resid_post"),
        "two": random_sae("blocks.1.hook_resid_post", seed=3),
    }
    result = evaluate(model, saes, tokens, progress=False, joint=True, token_groups=labels)
    assert set(result["one"].groups) == {"0", "1", "2"}
    joint = result.joint.groups
    total = sum(group.n_predictions * group.metrics["delta_ce"] for group in joint.values())
    assert total / sum(group.n_predictions for group in joint.values()) == pytest.approx(
        result.joint.metrics["delta_ce"], abs=1e-9
    )
    assert "explained_variance" not in joint["0"].metrics  # a joint splice has no single reconstruction


@pytest.mark.parametrize(
    ("labels", "names", "error", "message"),
    [
        (torch.zeros(3, 4, dtype=torch.long), None, ShapeMismatchError, "shape"),
        (torch.zeros(6, 16), None, ShapeMismatchError, "integers"),
        (torch.full((6, 16), -2), None, ConfigError, "found -2"),
        (torch.full((6, 16), 2), ["a", "b"], ConfigError, "uses label 2"),
        (torch.zeros(6, 16, dtype=torch.long), ["a", "a"], ConfigError, "distinct"),
        (torch.zeros(6, 16, dtype=torch.long), "ab", ConfigError, "sequence of non-empty strings"),
        ("labels", None, ShapeMismatchError, "integer tensor"),
    ],
)
def test_bad_labels_are_refused(model, labels, names, error, message):
    tokens = make_tokens(6)
    assert tokens.shape == (6, 16)
    with pytest.raises(error, match=message):
        evaluate(model, random_sae(HOOK), tokens, progress=False, token_groups=labels, group_names=names)


def test_group_names_without_labels_are_refused(model):
    with pytest.raises(ConfigError, match="give token_groups too"):
        evaluate(model, random_sae(HOOK), make_tokens(4), progress=False, group_names=["a"])


def test_the_per_position_band_against_a_direct_bootstrap(model):
    from pytest_saecheck.stats import bootstrap_interval

    sae = random_sae(HOOK)
    tokens = make_tokens(10)
    result = evaluate(model, sae, tokens, batch_size=4, progress=False)
    band = result.delta_ce_by_position_interval(0.9)
    assert len(band) == tokens.shape[1] - 1 and band[0] is None  # position 0 (BOS) is not evaluated
    ce_orig, ce_sae, _, _ = per_token(model, sae, tokens)
    for t in (1, 7, tokens.shape[1] - 2):
        direct = {"d": (ce_sae - ce_orig)[:, t].numpy(), "n": torch.ones(tokens.shape[0]).double().numpy()}
        low, high = bootstrap_interval(direct, lambda s: s["d"] / s["n"], level=0.9)
        assert band[t] == pytest.approx([low, high], abs=1e-5)
        assert band[t][0] <= result.delta_ce_by_position[t] <= band[t][1]
    assert result.to_dict()["delta_ce_by_position_interval"] == result.delta_ce_by_position_interval()
