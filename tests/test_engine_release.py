"""A release in one pass: each SAE as if evaluated alone, and every SAE spliced at once (joint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import identity_sae, make_tokens, mlp_transcoder, random_sae, relu_model

from pytest_saecheck import ConfigError, EvaluationSet, evaluate


@pytest.fixture(scope="module")
def model():
    return relu_model()


def mixed_release(model):
    transcoder = mlp_transcoder(model, 2)
    with torch.no_grad():
        for param in transcoder.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(8)) * 0.05)
    return {
        "resid": random_sae("blocks.1.hook_resid_pre"),
        "mlp": random_sae("blocks.1.hook_mlp_out", seed=2),
        "attn": random_sae("blocks.0.hook_attn_out", seed=3),
        "z_all": random_sae("blocks.1.attn.hook_z", seed=4),
        "z_head": random_sae("blocks.2.attn.hook_z", 1, seed=5),
        "transcoder": transcoder,
        "late": random_sae("blocks.2.hook_resid_post", seed=6),
    }


def test_each_sae_in_a_set_equals_evaluating_it_alone(model):
    release = mixed_release(model)
    tokens = make_tokens(10)
    together = evaluate(model, release, tokens, batch_size=4, progress=False)
    assert isinstance(together, EvaluationSet) and list(together) == list(release)
    for name, sae in release.items():
        alone = evaluate(model, sae, tokens, batch_size=4, progress=False)
        assert together[name].metrics.keys() == alone.metrics.keys(), name
        for metric, value in alone.metrics.items():
            assert together[name].metrics[metric] == pytest.approx(value, abs=1e-6), (name, metric)
        for key, values in alone.per_sequence.items():
            np.testing.assert_allclose(
                together[name].per_sequence[key], values, atol=1e-6, err_msg=f"{name} {key}"
            )
        assert together[name].hook_name_out == alone.hook_name_out


def test_default_names_are_hooks_with_an_index_where_they_repeat(model):
    saes = [
        random_sae("blocks.1.hook_resid_pre"),
        random_sae("blocks.1.hook_resid_pre", seed=9),
        mlp_transcoder(model, 1),
    ]
    result = evaluate(model, saes, make_tokens(4), progress=False)
    assert list(result) == [
        "blocks.1.hook_resid_pre#0",
        "blocks.1.hook_resid_pre#1",
        "blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out",
    ]
    with pytest.raises(KeyError, match="no SAE named 'x'"):
        result["x"]


def test_identity_saes_spliced_jointly_change_nothing(model):
    saes = {
        "a": identity_sae("blocks.0.hook_resid_post"),
        "b": identity_sae("blocks.1.hook_mlp_out"),
        "c": identity_sae("blocks.2.hook_resid_pre"),
    }
    result = evaluate(model, saes, make_tokens(8), joint=True, batch_size=4, progress=False)
    joint = result.joint
    assert joint is not None
    assert joint.metrics["delta_ce"] == pytest.approx(0.0, abs=1e-5)
    assert joint.metrics["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    for name in saes:
        assert joint.members[name]["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert result.compounding["excess"] == pytest.approx(0.0, abs=1e-5)
    assert "ce_loss_score" in joint.undefined and "explained_variance" in joint.undefined


def independent_joint(model, saes, tokens):
    """run_with_hooks with every replacement (BOS kept untouched), then float64 CE/KL and per-SAE R²."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    recorded = {}

    def replacement(name, sae):
        def hook(activation, hook):
            x_hat = sae.decode(sae.encode(activation))
            recorded[name] = (activation[keep].double(), x_hat[keep].double())
            return torch.where(keep[..., None], x_hat, activation)

        return hook

    with torch.no_grad():
        logits = model(tokens)
        spliced = model.run_with_hooks(
            tokens, fwd_hooks=[(sae.cfg.metadata.hook_name, replacement(n, sae)) for n, sae in saes.items()]
        )
    lp, lq = torch.log_softmax(logits.double(), -1), torch.log_softmax(spliced.double(), -1)

    def ce(log_probs):
        return -log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)[keep[:, :-1]].mean().item()

    r2 = {
        name: (1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item()
        for name, (x, xh) in recorded.items()
    }
    return ce(lq) - ce(lp), (lp.exp() * (lp - lq)).sum(-1)[keep].mean().item(), r2


def test_two_real_saes_jointly_equal_an_independent_computation(model):
    saes = {
        "early": random_sae("blocks.0.hook_resid_post", seed=3),
        "late": random_sae("blocks.2.hook_mlp_out", seed=4),
    }
    tokens = make_tokens(9)
    result = evaluate(
        model, saes, tokens, joint=True, batch_size=4, exclude_special_tokens=False, progress=False
    )
    delta_ce, kl, r2 = independent_joint(model, saes, tokens)
    assert result.joint.metrics["delta_ce"] == pytest.approx(delta_ce, abs=2e-5)
    assert result.joint.metrics["kl_sae"] == pytest.approx(kl, abs=2e-5)
    for name, value in r2.items():
        assert result.joint.members[name]["explained_variance"] == pytest.approx(value, abs=2e-5), name
    # the late SAE reads a model whose early residual is already spliced: not its isolated activations
    assert result.joint.members["late"]["explained_variance"] != pytest.approx(
        result["late"].metrics["explained_variance"], abs=1e-4
    )
    compounding = result.compounding
    isolated = result["early"].metrics["delta_ce"] + result["late"].metrics["delta_ce"]
    assert compounding["delta_ce_isolated_sum"] == pytest.approx(isolated, abs=1e-9)
    assert compounding["delta_ce_joint"] == pytest.approx(result.joint.metrics["delta_ce"], abs=1e-9)
    low, high = compounding["excess_interval"]
    assert low <= compounding["excess"] <= high
    low, high = result.joint.confidence_interval("delta_ce")
    assert low <= result.joint.metrics["delta_ce"] <= high


def test_a_transcoder_in_a_joint_splice_reads_the_spliced_model(model):
    """An exact MLP transcoder after an identity SAE: still lossless jointly."""
    saes = {"sae": identity_sae("blocks.1.hook_resid_mid"), "tc": mlp_transcoder(model, 1)}
    result = evaluate(model, saes, make_tokens(6), joint=True, progress=False)
    assert result.joint.metrics["delta_ce"] == pytest.approx(0.0, abs=1e-5)
    assert result.joint.members["tc"]["explained_variance"] == pytest.approx(1.0, abs=1e-5)


def test_two_saes_on_one_hook_cannot_be_spliced_jointly(model):
    saes = [random_sae("blocks.1.hook_resid_pre"), random_sae("blocks.1.hook_resid_pre", seed=2)]
    with pytest.raises(ConfigError, match=r"both write 'blocks\.1\.hook_resid_pre'"):
        evaluate(model, saes, make_tokens(4), joint=True, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"joint": True}, "several SAEs"),
        ({"mean_activation": torch.zeros(32)}, "must be a mapping"),
        ({"activation_scaler": {"nope": 1.0}}, "not in the set"),
        ({"template_budget_bytes": -1}, "template_budget_bytes must be a non-negative integer"),
        ({"template_budget_bytes": 1.5}, "template_budget_bytes must be a non-negative integer"),
    ],
)
def test_set_options_are_checked(model, kwargs, message):
    saes = (
        [random_sae("blocks.1.hook_resid_pre")]
        if kwargs.get("joint")
        else {"a": random_sae("blocks.1.hook_resid_pre")}
    )
    if kwargs.get("joint"):
        saes = saes[0]
    with pytest.raises(ConfigError, match=message):
        evaluate(model, saes, make_tokens(4), progress=False, **kwargs)


def test_set_results_are_plain_values(model):
    """The set's dict holds every SAE's own numbers under its name, in plain JSON values: it survives a strict
    JSON round trip unchanged (no tuple, numpy scalar or NaN), and nothing of a joint splice was asked for."""
    import json

    release = mixed_release(model)
    result = evaluate(model, release, make_tokens(4), joint=False, progress=False)
    as_dict = result.to_dict()
    assert json.loads(json.dumps(as_dict, allow_nan=False)) == as_dict
    assert list(as_dict["evaluations"]) == list(release)
    assert as_dict["joint"] is None and as_dict["compounding"] is None
    for name, evaluation in result.items():
        entry = as_dict["evaluations"][name]
        assert entry["metrics"] == evaluation.metrics and set(entry["metrics"]) >= {"delta_ce", "kl_sae"}
        assert entry["undefined"] == evaluation.undefined
        assert entry["hook_name"] == evaluation.hook_name == release[name].cfg.metadata.hook_name
        assert (entry["n_sequences"], entry["seq_len"]) == (4, evaluation.seq_len)
        assert entry["n_tokens"] == evaluation.n_tokens > 0
        assert len(entry["latent_density"]) == release[name].cfg.d_sae


def _assert_identical(one, two):
    for name in one:
        assert one[name].metrics == two[name].metrics, name
        assert one[name].undefined == two[name].undefined, name
        assert one[name].per_sequence.keys() == two[name].per_sequence.keys(), name
        for key, values in one[name].per_sequence.items():
            np.testing.assert_array_equal(two[name].per_sequence[key], values, err_msg=f"{name} {key}")


def test_the_template_budget_changes_no_number(model, monkeypatch):
    """Templates beyond the budget are unembedded again per batch from their final residual: the same
    operations on the same input, so the same numbers, bit for bit (mean ablation given and estimated)."""
    from pytest_saecheck.engine import passes

    calls = []
    unembed = passes.Pass._log_probs
    monkeypatch.setattr(
        passes.Pass, "_log_probs", lambda self, *args: calls.append(1) or unembed(self, *args)
    )
    release = mixed_release(model)
    tokens = make_tokens(10)  # one BOS: "resid" and "late" (residual hooks) are templated; 3 batches of 4
    held = evaluate(model, release, tokens, batch_size=4, joint=True, progress=False)
    assert len(calls) == 4  # the zero and mean templates of the two, once each
    recomputed = evaluate(
        model, release, tokens, batch_size=4, joint=True, progress=False, template_budget_bytes=0
    )
    assert len(calls) == 4 + 2 * 3 + 2  # the zero templates unembedded again for each batch
    _assert_identical(held, recomputed)
    assert held.joint is not None and recomputed.joint is not None
    assert held.joint.metrics == recomputed.joint.metrics
    means = {"resid": torch.randn(32, generator=torch.Generator().manual_seed(3))}
    given = evaluate(model, release, tokens, batch_size=4, mean_activation=means, progress=False)
    given_recomputed = evaluate(
        model, release, tokens, batch_size=4, mean_activation=means, progress=False, template_budget_bytes=0
    )
    _assert_identical(given, given_recomputed)
    # the given mean was used
    assert not np.array_equal(
        given["resid"].per_sequence["ce_sum_mean"], held["resid"].per_sequence["ce_sum_mean"]
    )


def test_a_model_spread_with_n_devices_gives_identical_results(model):
    """n_devices=1 through TransformerLens' multi-device placement: the engine reads each block's device from its
    parameters (every tensor of a hook stays there) and the numbers do not change."""
    from transformer_lens import HookedTransformer

    from pytest_saecheck.engine.cut import HookedTransformerCut
    from pytest_saecheck.hookpoints import resolve_hook

    cfg = model.cfg.to_dict()
    cfg["n_devices"] = 1
    spread = HookedTransformer(type(model.cfg).from_dict(cfg), move_to_device=True).eval()
    spread.load_state_dict(model.state_dict())
    assert spread.cfg.n_devices == 1
    cut = HookedTransformerCut(spread)
    names = list(spread.hook_dict)
    for hook in ("blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.2.hook_resid_post"):
        site = resolve_hook(hook, None, spread.cfg.n_layers, names)
        assert cut.device_at(site) == next(spread.blocks[site.layer].parameters()).device
    assert cut.output_device == spread.unembed.W_U.device
    release = mixed_release(model)
    tokens = make_tokens(8)
    one = evaluate(model, release, tokens, batch_size=4, joint=True, progress=False)
    two = evaluate(spread, release, tokens, batch_size=4, joint=True, progress=False)
    _assert_identical(one, two)
    assert one.joint is not None and two.joint is not None
    assert one.joint.metrics == two.joint.metrics


def test_an_error_or_warning_about_one_sae_of_a_set_names_it(model):
    """In a release of a dozen SAEs, "W_dec contains NaN" or "expects d_in=48" must say which SAE; the same error
    class as evaluating that SAE alone, which does not repeat its name."""
    import warnings

    from pytest_saecheck import NonFiniteError, ShapeMismatchError

    good = random_sae("blocks.1.hook_resid_pre")
    broken = random_sae("blocks.2.hook_resid_pre", seed=3)
    with torch.no_grad():
        broken.W_dec[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^SAE 'broken': SAE parameter 'W_dec' contains NaN"):
        evaluate(model, {"good": good, "broken": broken}, make_tokens(4), progress=False)
    with pytest.raises(NonFiniteError, match=r"^SAE parameter 'W_dec'"):
        evaluate(model, broken, make_tokens(4), progress=False)
    wide = random_sae("blocks.2.hook_resid_pre", d_in=48)
    with pytest.raises(ShapeMismatchError, match=r"^SAE 'wide': .*d_in=48"):
        evaluate(model, {"good": good, "wide": wide}, make_tokens(4), progress=False)
    other = broken_free(broken)
    with torch.no_grad():  # a decoder 100x too small: the l2_ratio preflight warns about this SAE alone
        other.W_dec.div_(100)
        other.b_dec.div_(100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(model, {"good": good, "other": other}, make_tokens(4), progress=False)
    assert any("l2_ratio" in message for message in result["other"].warnings)
    for name, evaluation in result.items():
        for message in evaluation.warnings:  # recorded without the name, shown with it
            assert any(str(w.message) == f"SAE {name!r}: {message}" for w in caught), message


def broken_free(sae):
    with torch.no_grad():
        sae.W_dec.nan_to_num_(0.0)
    return sae


@pytest.mark.parametrize(
    ("isolated", "ratio"), [((0.2, 0.1), 1.5), ((-0.05, -0.03), None), ((0.0, 0.0), None)]
)
def test_the_compounding_ratio_is_defined_only_for_added_loss(isolated, ratio):
    """joint ΔCE / Σ isolated ΔCE reads "errors compound" above 1; when the isolated splices lowered the loss
    (a sum ≤ 0) that reading is backwards, so the ratio is None while excess stays defined."""
    from types import SimpleNamespace

    from pytest_saecheck.engine.finish import compounding

    n = np.full(4, 10.0)

    def acc(delta):
        sums = {"ce_sum_orig": np.full(4, 20.0), "ce_sum_sae": 20.0 + delta * n, "n_ce": n}
        return SimpleNamespace(per_sequence=lambda: sums)

    members = [SimpleNamespace(acc=acc(delta)) for delta in isolated]
    joint_delta = 1.5 * sum(isolated) if ratio else 0.01
    out = compounding(members, acc(joint_delta))
    assert out["delta_ce_isolated_sum"] == pytest.approx(sum(isolated))
    assert out["excess"] == pytest.approx(joint_delta - sum(isolated))
    assert out["ratio"] == (pytest.approx(ratio) if ratio else None)


@pytest.mark.parametrize("name", [1, "", None])
def test_a_set_is_named_by_non_empty_strings(model, name):
    with pytest.raises(ConfigError, match="named by non-empty strings"):
        evaluate(model, {name: random_sae("blocks.1.hook_resid_pre")}, make_tokens(4), progress=False)


def test_a_joint_evaluation_says_why_each_per_sae_metric_is_not_its_own(model):
    release = {"a": random_sae("blocks.1.hook_resid_pre"), "b": random_sae("blocks.2.hook_resid_pre", seed=2)}
    result = evaluate(model, release, make_tokens(4), joint=True, progress=False)
    assert result.joint is not None
    undefined = result.joint.undefined
    assert "evaluation.members" in undefined["mse"] and set(result.joint.members) == {"a", "b"}
    assert "ablation baseline" in undefined["ce_loss_score"] and "ablation baseline" in undefined["ce_zero"]
    assert "training context" in undefined["delta_ce_within_context"]
    assert "ablation" not in undefined["kl_sae_beyond_context"]  # not a ratio score
