"""Sequential evaluation: ``evaluate(..., sequential=...)`` and the ``sequential`` setting grow an evaluation over
prefixes of the tokens until every gate is decided; at the ceiling it is the fixed run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories import make_engine_model, make_tokens, random_sae

from pytest_saecheck import ConfigError, evaluate
from pytest_saecheck.sequential import RULE_CEILING, RULE_INTERIM

ROOT = Path(__file__).resolve().parent.parent
DEMO_ASSETS = ROOT / "pytest_saecheck" / "demo" / "assets"


@pytest.fixture(scope="module")
def setup():
    return make_engine_model(), random_sae(), make_tokens(96)


def _gate(**kwargs):
    return {"metric": "delta_ce", "confidence": 0.95, **kwargs}


def test_clear_gates_stop_at_the_first_look_on_a_prefix(setup):
    model, sae, tokens = setup
    full = evaluate(model, sae, tokens, progress=False)
    value = full.metrics["delta_ce"]
    passed = evaluate(model, sae, tokens, progress=False, sequential=[_gate(max_value=100 * abs(value) + 1)])
    failed = evaluate(model, sae, tokens, progress=False, sequential=[_gate(max_value=value - 1.0)])
    first = evaluate(model, sae, tokens[:32], progress=False)  # the first look is the first 32 sequences
    for result, verdict in ((passed, "pass"), (failed, "fail")):
        record = result.sequential
        assert record["looks"] == [32, 64, 96] and record["ceiling"] == 96
        assert record["look"] == 1 and record["sequences_evaluated"] == 32
        assert record["tokens_evaluated"] == result.n_tokens == first.n_tokens
        (decision,) = record["decisions"]
        assert (decision["verdict"], decision["rule"], decision["look"]) == (verdict, RULE_INTERIM, 1)
        assert result.metrics == first.metrics
        for key, array in first.per_sequence.items():
            np.testing.assert_array_equal(result.per_sequence[key], array)


def test_a_gate_on_its_threshold_runs_to_the_ceiling_and_is_the_fixed_run(setup):
    """True ΔCE on the threshold: undecided at every interim look, decided at the ceiling by the fixed rule, on the
    fixed run's evaluation (the same sequences, so baselines stay paired)."""
    model, sae, tokens = setup
    full = evaluate(model, sae, tokens, progress=False)
    near = evaluate(
        model, sae, tokens, progress=False, sequential=[_gate(max_value=full.metrics["delta_ce"])]
    )
    record = near.sequential
    (decision,) = record["decisions"]
    assert decision == {
        "metric": "delta_ce",
        "gate": f"delta_ce ≤ {full.metrics['delta_ce']:g} at 95% confidence",
        "verdict": None,
        "look": 3,
        "n_sequences": 96,
        "rule": RULE_CEILING,
        "boundary": None,
    }
    assert record["sequences_evaluated"] == 96  # every look merged into the next: each sequence run once
    assert near.metrics == full.metrics
    assert near.confidence_interval("delta_ce") == full.confidence_interval("delta_ce")


def _same(merged, one_shot):
    assert merged.n_tokens == one_shot.n_tokens and merged.n_sequences == one_shot.n_sequences
    assert merged.metrics.keys() == one_shot.metrics.keys()
    for name, value in one_shot.metrics.items():
        assert merged.metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    for key, array in one_shot.per_sequence.items():
        np.testing.assert_allclose(merged.per_sequence[key], array, rtol=1e-9, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(merged.latent_density, one_shot.latent_density, rtol=1e-12)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"])
def test_a_stream_merges_its_looks_into_the_one_shot_result(setup, hook):
    """Looks of 32, 64 and 96 sequences merged batch by batch equal one-shot evaluations on the same tokens. At a
    residual point (mean ablation by a template) each look is ``evaluate`` of its prefix; at an MLP output the
    mean-ablation vector is fixed before the first look from the whole set, as the fixed run fixes it, so a look
    is ``evaluate`` of its prefix with that vector given, and the ceiling is the fixed run. Every sequence runs
    through the model once."""
    from pytest_saecheck.engine.run import open_stream

    model, _, tokens = setup
    sae = random_sae(hook)
    stream = open_stream(model, sae, tokens, batch_size=16, progress=False)
    rows: list[int] = []
    capture = stream.run.cut.capture

    def counted(batch, sites):
        if batch.shape[1] == tokens.shape[1] and batch.shape[0] > 1:  # a batch, not a one-sequence template
            rows.append(batch.shape[0])
        return capture(batch, sites)

    stream.run.cut.capture = counted  # type: ignore[method-assign]
    looks = {n: stream.to(n) for n in (32, 64, 96)}
    assert sum(rows) == 96
    member = stream.run.members[0]
    templated = member.plan.templated
    assert templated == hook.endswith("resid_pre")
    if not templated:  # the vector is the whole set's mean over the kept positions (BOS excluded)
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        whole = cache[hook][:, 1:].reshape(-1, cache[hook].shape[-1]).double().mean(0)
        np.testing.assert_allclose(member.mean.cpu().numpy(), whole.numpy(), rtol=1e-5, atol=1e-6)
    for n, merged in looks.items():
        given = {} if templated or n == 96 else {"mean_activation": member.mean}
        _same(merged, evaluate(model, sae, tokens[:n], batch_size=16, progress=False, **given))


def test_point_value_gates_and_ceiling_only_metrics_go_straight_to_the_ceiling(setup):
    model, sae, tokens = setup
    result = evaluate(
        model,
        sae,
        tokens,
        progress=False,
        sequential=[
            {"metric": "delta_ce", "max_value": 1e6},
            {"metric": "compute_fraction", "min_score": 0.0},
        ],
    )
    assert result.sequential["sequences_evaluated"] == 96  # no interim look evaluated
    assert [d["rule"] for d in result.sequential["decisions"]] == [RULE_CEILING, RULE_CEILING]


def test_bad_sequential_arguments_are_config_errors(setup):
    model, sae, tokens = setup
    with pytest.raises(ConfigError, match="one SAE"):
        evaluate(model, {"a": sae, "b": sae}, tokens, sequential=[_gate(max_value=1.0)])
    with pytest.raises(ConfigError, match="non-empty list of gates"):
        evaluate(model, sae, tokens, sequential=_gate(max_value=1.0))
    with pytest.raises(ConfigError, match="keys metric, min_score"):
        evaluate(model, sae, tokens, sequential=[{"metric": "delta_ce", "max": 1.0}])
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate(model, sae, tokens, sequential=[{"metric": "nope", "max_value": 1.0}])


TESTS = """
import pytest
from pytest_saecheck import assert_ce_recovery, assert_r2_matches_legacy

pytestmark = pytest.mark.saecheck(n_tokens=2048, context_size=32)

@pytest.mark.saecheck(sae="demo/good")
def test_good(saecheck):
    assert_ce_recovery(saecheck, metric="delta_ce", max_value=0.05, confidence=0.95)

@pytest.mark.saecheck(sae="demo/good")
def test_good_kl(saecheck):
    assert_ce_recovery(saecheck, metric="kl_sae", max_value=0.05, confidence=0.95)

@pytest.mark.saecheck(sae="demo/variance_only")
def test_bad(saecheck):
    assert_ce_recovery(saecheck, metric="delta_ce", max_value=0.01, confidence=0.95)

@pytest.mark.saecheck(sae="demo/variance_only")
def test_bad_point(saecheck):
    assert_r2_matches_legacy(saecheck)
"""


@pytest.mark.skipif(not any(DEMO_ASSETS.glob("*")), reason="the demo assets are not built yet")
def test_the_setting_grows_one_shared_evaluation_per_sae(pytester: pytest.Pytester) -> None:
    """The tests' own assertions are the gates: the good SAE's two gates share one evaluation that stops at the first
    look; the bad SAE's interval gate fails at the first look, and a check that reads the evaluation itself (not a
    sequential gate) grows it to the ceiling. The JSON says which look and rule decided each gate."""
    pytester.makepyfile(test_sequential_demo=TESTS)
    result = pytester.runpytest_inprocess(
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "--saecheck-sequential=true",
        "--saecheck-json=out.json",
        "--saecheck-report=report.html",
    )
    result.assert_outcomes(passed=3, failed=1)
    document = json.loads((pytester.path / "out.json").read_text())
    seen = {}
    for sae in document["saes"]:
        for assertion in sae["assertions"]:
            seen[assertion["test_id"].rsplit("::", 1)[-1]] = (
                assertion["outcome"],
                assertion["details"].get("sequential"),
            )
    for name, outcome in (("test_good", "passed"), ("test_good_kl", "passed"), ("test_bad", "failed")):
        got, sequential = seen[name]
        assert got == outcome
        assert (sequential["rule"], sequential["look"], sequential["n_sequences"]) == (RULE_INTERIM, 1, 32)
        assert sequential["ceiling"] == 64 and sequential["looks"] == [32, 64]
    assert seen["test_bad_point"] == ("passed", None)  # not a sequential gate: read the ceiling
    by_sae = {sae["label"]: sae for sae in document["saes"]}
    good, bad = by_sae["demo/good"]["sequential"], by_sae["demo/variance_only"]["sequential"]
    assert good["sequences_evaluated"] == 32  # one evaluation served both gates
    assert [gate["metric"] for gate in good["gates"]] == ["delta_ce", "kl_sae"]
    assert bad["sequences_evaluated"] == 64 and bad["look"] == 2  # R² read the ceiling's evaluation
    assert by_sae["demo/variance_only"]["tokens"]["n_sequences"] == 64  # the SAE shows its furthest look
    assert by_sae["demo/good"]["tokens"]["n_sequences"] == 32
    html = (pytester.path / "report.html").read_text()
    assert "pass at look 1 (32 sequences), interim boundary" in html
    assert "ceiling 64 sequences, looks 32, 64" in html
