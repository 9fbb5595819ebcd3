"""Nothing computed twice: an evaluation is keyed by what determines it; a
setting that only changes derived numbers (the scaling law) reuses it, equivalent model kwargs share one model,
and the report counts each SAE once."""

from __future__ import annotations

import json

import pytest
from factories import make_tiny_model, make_token_ids

from pytest_saecheck import evaluate, loading
from pytest_saecheck.engine.finish import under_law
from pytest_saecheck.scaling import as_scaling_law


def test_equivalent_model_kwargs_are_one_load() -> None:
    plain = loading.equivalent_load_kwargs({}, None)
    assert plain == loading.equivalent_load_kwargs({"center_writing_weights": False}, None)
    assert plain == loading.equivalent_load_kwargs({"torch_dtype": "float32"}, None)
    assert plain != loading.equivalent_load_kwargs({"center_writing_weights": True}, None)
    assert plain != loading.equivalent_load_kwargs({}, "bfloat16")


@pytest.mark.parametrize("law", ["kaplan", (1.0, 0.1), None])
def test_an_evaluation_under_another_law_equals_evaluating_under_it(law: object) -> None:
    import torch
    from factories import make_identity_sae

    torch.manual_seed(0)
    model, sae = make_tiny_model(), make_identity_sae()
    noisy = make_identity_sae()
    with torch.no_grad():
        noisy.W_dec.mul_(0.7)  # a lossy SAE: ce_sae above ce_orig
    tokens = torch.as_tensor(make_token_ids(n_sequences=8, seq_len=16))
    for subject in (sae, noisy):
        base = evaluate(model, subject, tokens, progress=False, scaling_law="chinchilla")
        direct = evaluate(model, subject, tokens, progress=False, scaling_law=law)
        derived = under_law(base, as_scaling_law(law))
        assert derived.metrics == direct.metrics
        assert derived.undefined.get("compute_fraction") == direct.undefined.get("compute_fraction") or (
            law is None and "compute_fraction" in derived.undefined
        )
        assert derived.warnings == direct.warnings
        assert derived.compute_law() == direct.compute_law()
        assert derived.confidence_intervals() == direct.confidence_intervals()
        assert under_law(base, base.scaling_law) is base


def test_changing_only_the_law_or_equivalent_kwargs_reuses_the_pass(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        test_reuse="""
        import pytest
        from pytest_saecheck import assert_ce_recovery
        from pytest_saecheck.plugin.fixtures import session_cache

        from pytest_saecheck.scaling import as_scaling_law

        CASES = [
            pytest.param(
                law,
                marks=pytest.mark.saecheck(sae=sae, scaling_law=law, model_from_pretrained_kwargs=kwargs),
                id=f"{sae}-{law}-{len(kwargs)}",
            )
            for sae in ("sae_identity", "sae_random")
            for law in ("chinchilla", "kaplan")
            for kwargs in ({}, {"center_writing_weights": False})
        ]

        @pytest.mark.parametrize("law", CASES)
        def test_gate(saecheck, law):
            assert saecheck.evaluation.scaling_law == as_scaling_law(law)
            assert_ce_recovery(saecheck, metric="delta_ce", max_value=100.0)

        def test_counts(request):
            loads = session_cache(request.config).loads
            assert loads["model"] == 1, loads
            assert loads["pass"] == 1, loads
        """
    )
    result = tiny_pytester.runpytest_inprocess(
        "test_reuse.py",
        "--saecheck-model=tiny",
        "--saecheck-tokens=tokens.npy",
        "--saecheck-n-tokens=64",
        "--saecheck-json=r.json",
    )
    result.assert_outcomes(passed=9)
    report = json.loads((tiny_pytester.path / "r.json").read_text())
    assert len(report["saes"]) == 2, [sae["label"] for sae in report["saes"]]
    durations = [sae["evaluation_duration_s"] for sae in report["saes"]]
    assert sum(durations) <= report["run"]["duration_s"]
