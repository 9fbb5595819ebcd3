"""assert_ce_recovery and assert_r2_matches_legacy: thresholds, intervals, messages, NaN, records, real SAEs."""

from __future__ import annotations

import gc
import math
import re
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from factories import make_identity_sae, make_random_sae, make_tiny_model, make_token_ids

from pytest_saecheck import records, running
from pytest_saecheck.assertions import (
    CE_METRICS,
    DEFAULT_R2_TOL,
    LEGACY_GAP_RATIO,
    MIN_LEGACY_TOL,
    assert_ce_recovery,
    assert_r2_matches_legacy,
    legacy_tolerance,
)
from pytest_saecheck.checks.workflow import SAEUnderTest
from pytest_saecheck.engine import evaluate
from pytest_saecheck.errors import ConfigError
from pytest_saecheck.metrics import METRICS
from pytest_saecheck.policy import TokenPolicy

GOOD_METRICS = {
    "ce_orig": 3.0,
    "ce_sae": 3.1,
    "ce_zero": 8.0,
    "ce_mean": 5.0,
    "delta_ce": 0.1,
    "ce_loss_score": 0.98,
    "ce_loss_score_mean_ablation": 0.95,
    "ce_rec": 0.9667,
    "kl_sae": 0.08,
    "kl_zero": 5.0,
    "kl_div_score": 0.984,
    "compute_fraction": 0.8,
    "explained_variance": 0.80,
    "explained_variance_legacy": 0.78,
    "explained_variance_about_zero": 0.98,
    "delta_ce_within_context": 0.09,
    "delta_ce_beyond_context": 0.2,
    "kl_sae_within_context": 0.07,
    "kl_sae_beyond_context": 0.15,
}


@dataclass
class FakeEvaluation:
    """Evaluation-shaped: metrics, intervals, token counts. Intervals are value ± width."""

    metrics: dict[str, float]
    width: float = 0.01
    undefined: dict[str, str] = field(default_factory=dict)
    n_tokens: int = 4032
    n_sequences: int = 64
    seq_len: int = 64
    hook_name: str = "blocks.1.hook_resid_post"
    token_policy: TokenPolicy = field(default_factory=TokenPolicy)

    def confidence_interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        value = self.metrics[name]
        return (value - self.width, value + self.width)


def fake(**overrides: float) -> FakeEvaluation:
    return FakeEvaluation({**GOOD_METRICS, **overrides})


# --------------------------------------------------------------------------------------------------------
# assert_ce_recovery


def test_passes_on_a_good_score() -> None:
    assert_ce_recovery(fake(), min_score=0.95)
    assert_ce_recovery(fake(), metric="delta_ce", max_value=0.15)
    assert_ce_recovery(fake(), metric="kl_div_score", min_score=0.9, max_value=1.0)


def test_fails_below_the_minimum_with_a_tabulated_message() -> None:
    with pytest.raises(AssertionError) as caught:
        assert_ce_recovery(fake(ce_loss_score=0.90), min_score=0.95)
    message = str(caught.value)
    assert message.startswith("assert_ce_recovery failed for SAE at blocks.1.hook_resid_post: ")
    assert "ce_loss_score = 0.9000 is below min_score 0.9500" in message
    for row in (r"ce_orig\s+3\.0000", r"ce_sae\s+3\.1000", r"ce_zero\s+8\.0000", r"ce_mean\s+5\.0000"):
        assert re.search(row, message), row
    assert "[0.8900, 0.9100]" in message  # the interval is shown even when not gated on
    assert "≥ 0.9500 (gated on the point estimate)" in message
    assert "tokens: 4,032 evaluated (64 sequences × 64), position 0 (BOS) excluded" in message
    assert (
        "scale: ce_loss_score = (L_zero − L_sae) / (L_zero − L_orig): share of the zero-ablation" in message
    )


def test_confidence_gates_on_the_lower_bound_for_a_minimum() -> None:
    evaluation = fake(ce_loss_score=0.96)
    evaluation.width = 0.02
    assert_ce_recovery(evaluation, min_score=0.95)  # the point estimate passes
    with pytest.raises(
        AssertionError, match=r"the lower bound of the 95% interval of ce_loss_score = 0\.9400"
    ):
        assert_ce_recovery(evaluation, min_score=0.95, confidence=0.95)


def test_confidence_gates_on_the_upper_bound_for_a_maximum() -> None:
    evaluation = fake(delta_ce=0.14)
    evaluation.width = 0.03
    assert_ce_recovery(evaluation, metric="delta_ce", max_value=0.15)
    with pytest.raises(
        AssertionError, match=r"upper bound of the 90% interval of delta_ce = 0\.1700 is above"
    ):
        assert_ce_recovery(evaluation, metric="delta_ce", max_value=0.15, confidence=0.9)


@pytest.mark.parametrize("value", [math.nan])
def test_nan_never_passes(value: float) -> None:
    with pytest.raises(AssertionError, match="ce_loss_score is NaN"):
        assert_ce_recovery(fake(ce_loss_score=value), min_score=-1e9)
    with pytest.raises(AssertionError, match="delta_ce is NaN"):
        assert_ce_recovery(fake(delta_ce=value), metric="delta_ce", max_value=1e9)
    evaluation = fake()
    evaluation.width = math.nan
    with pytest.raises(AssertionError, match="interval of ce_loss_score = nan"):
        assert_ce_recovery(evaluation, min_score=0.0, confidence=0.95)


def test_an_undefined_metric_fails_with_the_engine_reason() -> None:
    evaluation = fake()
    del evaluation.metrics["compute_fraction"]
    evaluation.undefined["compute_fraction"] = "L_orig is below the scaling law's E"
    with pytest.raises(AssertionError, match="compute_fraction is undefined for this SAE: L_orig is below"):
        assert_ce_recovery(evaluation, metric="compute_fraction", min_score=0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"metric": "kl_div_score", "min_score": 1.01},
            r"min_score=1\.01 can never pass: kl_div_score is at most 1\.0",
        ),
        ({"metric": "kl_sae", "max_value": -0.1}, r"max_value=-0\.1 can never pass: kl_sae is at least 0\.0"),
        ({"metric": "delta_ce", "min_score": 0.0}, "lower-is-better.*use max_value|bound it with max_value="),
        ({}, "give a threshold"),
        ({"metric": "explained_variance", "min_score": 0.9}, "unknown metric 'explained_variance'"),
        ({"min_score": math.nan}, "min_score must be a finite number"),
        ({"min_score": "0.9"}, "min_score must be a number"),
        ({"min_score": True}, "min_score must be a number"),
        ({"min_score": 0.9, "confidence": 95}, "confidence must lie strictly between 0 and 1"),
        ({"min_score": 0.9, "max_value": 0.8}, "is above max_value"),
    ],
)
def test_thresholds_are_validated(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        assert_ce_recovery(fake(), **kwargs)


def test_every_ce_metric_is_accepted() -> None:
    for metric in CE_METRICS:
        lower_is_better = not METRICS[metric].higher_is_better
        bound = {"max_value": 1e6} if lower_is_better else {"min_score": -1e6}
        assert_ce_recovery(fake(), metric=metric, **bound)


def test_rejects_objects_that_are_not_evaluations() -> None:
    with pytest.raises(ConfigError, match="expected the saecheck fixture or an Evaluation"):
        assert_ce_recovery({"ce_loss_score": 0.9}, min_score=0.5)


def test_helpers_hide_their_frames_like_pytest() -> None:
    import pytest_saecheck.assertions as module

    for function in (module.assert_ce_recovery, module.assert_r2_matches_legacy):
        assert "__tracebackhide__" in function.__code__.co_varnames


def _tensors_reachable_from(error: BaseException) -> list[str]:
    """Tensors and modules held by the frames of the exception's traceback (what pytest keeps alive)."""
    found = []
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        path = frame.f_code.co_filename.replace("\\", "/")
        if path.endswith("pytest_saecheck/assertions.py") or "pytest_saecheck/checks/" in path:
            for name, value in frame.f_locals.items():
                if isinstance(value, (torch.Tensor, torch.nn.Module)) or hasattr(value, "evaluation"):
                    found.append(f"{frame.f_code.co_name}:{name}")
        tb = tb.tb_next
    return found


@pytest.fixture(scope="module")
def tiny_evaluations() -> dict[str, Any]:
    model = make_tiny_model()
    tokens = torch.as_tensor(make_token_ids(n_sequences=24))
    return {
        "identity": evaluate(model, make_identity_sae(), tokens, batch_size=8),
        "random": evaluate(model, make_random_sae(), tokens, batch_size=8),
    }


def test_planted_good_sae_passes_and_planted_bad_sae_fails(tiny_evaluations: dict[str, Any]) -> None:
    assert_ce_recovery(tiny_evaluations["identity"], metric="delta_ce", max_value=1e-5, confidence=0.95)
    assert_ce_recovery(tiny_evaluations["identity"], metric="kl_sae", max_value=1e-6)
    # A random model barely cares about zero ablation, so the score that divides by that gap is undefined:
    # it neither passes nor fails on noise, it refuses with the reason.
    with pytest.raises(AssertionError, match=r"ce_loss_score is undefined.*not resolved from zero"):
        assert_ce_recovery(tiny_evaluations["identity"], min_score=0.999)
    assert_r2_matches_legacy(tiny_evaluations["identity"])
    with pytest.raises(AssertionError, match="kl_div_score = -"):
        assert_ce_recovery(tiny_evaluations["random"], metric="kl_div_score", min_score=0.5)
    # A random SAE's two R² estimates are both meaningless and far apart in absolute terms, but within the default
    # share of its huge unexplained variance: the default compares estimators, it is no quality gate.
    assert_r2_matches_legacy(tiny_evaluations["random"])
    with pytest.raises(AssertionError, match="explained_variance and explained_variance_legacy differ by"):
        assert_r2_matches_legacy(tiny_evaluations["random"], tol=0.05)


class _StandInFixture(SAEUnderTest):
    """A stand-in for the saecheck fixture holding an evaluation and its model."""

    settings = None

    def __init__(self, evaluation: Any, model: Any) -> None:
        self._evaluation, self.model = evaluation, model

    @property
    def evaluation(self) -> Any:
        return self._evaluation

    @property
    def tokens(self) -> Any:
        return None

    def subject(self) -> dict[str, Any]:
        return {"label": "x"}

    @property
    def item(self) -> pytest.Item | None:
        return None


def test_failures_keep_no_tensor_or_model_alive() -> None:
    model = make_tiny_model()
    sae = make_random_sae()
    evaluation = evaluate(model, sae, torch.as_tensor(make_token_ids(n_sequences=8)), batch_size=8)
    bundle = _StandInFixture(evaluation, model)
    model_ref = weakref.ref(model)
    with pytest.raises(AssertionError) as caught:
        assert_ce_recovery(bundle, metric="kl_div_score", min_score=0.99)
    assert _tensors_reachable_from(caught.value) == []
    with pytest.raises(AssertionError) as caught_r2:
        assert_r2_matches_legacy(bundle, reported=0.5)
    assert _tensors_reachable_from(caught_r2.value) == []
    del model, sae, bundle, evaluation
    error = caught.value
    del caught, caught_r2
    gc.collect()
    assert model_ref() is None, "the failure must not keep the model alive"
    assert isinstance(error, AssertionError)


# --------------------------------------------------------------------------------------------------------
# assert_r2_matches_legacy


def test_r2_ours_passes_within_tol_and_fails_outside() -> None:
    assert_r2_matches_legacy(fake(explained_variance=0.80, explained_variance_legacy=0.78))
    # default: the allowed gap is 0.75 x (1 - legacy) = 0.225 here
    assert_r2_matches_legacy(fake(explained_variance=0.92, explained_variance_legacy=0.70))
    with pytest.raises(AssertionError, match=r"differ by 0\.2500 > tol 0\.2250"):
        assert_r2_matches_legacy(fake(explained_variance=0.95, explained_variance_legacy=0.70))
    # near R² = 1 the allowed gap bottoms out at 0.01
    with pytest.raises(AssertionError, match=r"differ by 0\.0120 > tol 0\.0100"):
        assert_r2_matches_legacy(fake(explained_variance=0.9999, explained_variance_legacy=0.9879))
    assert legacy_tolerance(0.999, None) == MIN_LEGACY_TOL
    with pytest.raises(AssertionError) as caught:
        assert_r2_matches_legacy(fake(explained_variance=0.80, explained_variance_legacy=0.70), tol=0.05)
    message = str(caught.value)
    assert "differ by 0.1000 > tol 0.0500" in message
    assert "explained_variance_about_zero  0.9800" in message
    assert "neither is a computation bug" in message


BUGGY_SAE_LENS = {  # run_evals output, nested, reproducing the about-zero bug (0.98 reported, 0.78 correct)
    "model_performance_preservation": {"ce_loss_score": 0.97},
    "reconstruction_quality": {
        "explained_variance": 0.98,
        "explained_variance_legacy": 0.78,
        "mse": 120.0,
        "cossim": 0.93,
    },
}


@pytest.mark.parametrize(
    "reported",
    [
        BUGGY_SAE_LENS,
        (BUGGY_SAE_LENS, {}),  # run_evals returns (metrics, feature_metrics)
        {"metrics/explained_variance": 0.98, "metrics/explained_variance_legacy": 0.78},  # training log, flat
        {"eval_result_metrics": BUGGY_SAE_LENS},  # SAEBench core result
        {
            "metrics.reconstruction_quality.explained_variance": 0.98,
            "metrics.reconstruction_quality.explained_variance_legacy": 0.78,
        },
    ],
    ids=["sae-lens-nested", "run-evals-tuple", "flat-slash", "saebench-core", "json-normalize"],
)
def test_reported_about_zero_bug_is_caught_and_explained(reported: Any) -> None:
    with pytest.raises(AssertionError) as caught:
        assert_r2_matches_legacy(reported)
    message = str(caught.value)
    assert "explained_variance = 0.9800" in message and "explained_variance_legacy = 0.7800" in message
    assert "explained_variance is the wrong number" in message
    assert "reported R² equals 1 − MSE/E‖x‖²: variance was computed about zero, not the mean" in message


def test_correct_reported_metrics_pass() -> None:
    assert_r2_matches_legacy(
        {"reconstruction_quality": {"explained_variance": 0.79, "explained_variance_legacy": 0.78}}
    )
    assert_r2_matches_legacy({"explained_variance": 0.60, "explained_variance_legacy": 0.64})


def test_legacy_above_pooled_points_at_token_mismatch() -> None:
    with pytest.raises(AssertionError, match="computed on different tokens"):
        assert_r2_matches_legacy({"explained_variance": 0.60, "explained_variance_legacy": 0.80})


def test_impossible_reported_values_fail() -> None:
    with pytest.raises(AssertionError, match="is above 1, which no R² can be"):
        assert_r2_matches_legacy({"explained_variance": 1.3, "explained_variance_legacy": 1.3})
    with pytest.raises(AssertionError, match="is NaN"):
        assert_r2_matches_legacy({"explained_variance": math.nan, "explained_variance_legacy": 0.8})


@pytest.mark.parametrize(
    ("reported", "match"),
    [
        ({"reconstruction_quality": {"mse": 1.0}}, "hold no explained_variance"),
        ({"explained_variance": 0.9}, "hold no explained_variance_legacy"),
        (
            {
                "a": {"explained_variance": 0.9},
                "b": {"explained_variance": 0.5},
                "explained_variance_legacy": 0.9,
            },
            "several different",
        ),
        ({"explained_variance": [0.9, 0.8], "explained_variance_legacy": 0.9}, "is a sequence"),
        ({"explained_variance": "high", "explained_variance_legacy": 0.9}, "is not a number"),
    ],
)
def test_malformed_reported_metrics_are_config_errors(reported: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        assert_r2_matches_legacy(reported)


def test_reported_number_equal_to_our_about_zero_value_is_diagnosed() -> None:
    evaluation = fake(
        explained_variance=0.78, explained_variance_legacy=0.77, explained_variance_about_zero=0.98
    )
    with pytest.raises(AssertionError) as caught:
        assert_r2_matches_legacy(evaluation, reported=0.981)
    message = str(caught.value)
    assert "reported R² 0.9810 differs from ours 0.7800" in message
    assert "the reported number is wrong: reported R² equals 1 − MSE/E‖x‖²" in message
    assert_r2_matches_legacy(evaluation, reported=0.79)  # a correct report passes
    assert_r2_matches_legacy(
        evaluation, reported=BUGGY_SAE_LENS | {"reconstruction_quality": {"explained_variance": 0.78}}
    )


def test_reported_legacy_number_is_named_as_such() -> None:
    evaluation = fake(
        explained_variance=0.90, explained_variance_legacy=0.70, explained_variance_about_zero=0.99
    )
    with pytest.raises(AssertionError, match="the reported number is the legacy per-token formula"):
        assert_r2_matches_legacy(evaluation, reported=0.71)


def test_reported_number_matching_nothing_lists_causes() -> None:
    with pytest.raises(AssertionError, match="matches none of the formulas computed here"):
        assert_r2_matches_legacy(fake(), reported=0.3)


def test_r2_arguments_are_validated() -> None:
    with pytest.raises(ConfigError, match="tol must not be negative"):
        assert_r2_matches_legacy(fake(), tol=-0.1)
    with pytest.raises(ConfigError, match="first argument must be the saecheck fixture"):
        assert_r2_matches_legacy(BUGGY_SAE_LENS, reported=0.9)
    with pytest.raises(ConfigError, match="reported must be a number"):
        assert_r2_matches_legacy(fake(), reported="0.9")
    assert DEFAULT_R2_TOL == 0.02
    assert LEGACY_GAP_RATIO == 0.75


def test_about_zero_reproduction_on_real_activations(tiny_evaluations: dict[str, Any]) -> None:
    """Our own about-zero number, reported as if it were R², is caught and named (when it differs enough)."""
    evaluation = tiny_evaluations["random"]
    about_zero = evaluation.metrics["explained_variance_about_zero"]
    assert abs(about_zero - evaluation.metrics["explained_variance"]) > DEFAULT_R2_TOL
    with pytest.raises(AssertionError, match="variance was computed about zero"):
        assert_r2_matches_legacy(evaluation, reported=about_zero)


# --------------------------------------------------------------------------------------------------------
# records


def test_assertions_record_plain_values_on_the_running_test(request: pytest.FixtureRequest) -> None:
    item = request.node
    records.take(item)
    assert_ce_recovery(fake(), min_score=0.95, confidence=0.9)
    with pytest.raises(AssertionError):
        assert_r2_matches_legacy(BUGGY_SAE_LENS)
    ce, r2 = records.take(item)
    assert ce == {
        "kind": "assertion",
        "assertion": "assert_ce_recovery",
        "label": "SAE at blocks.1.hook_resid_post",
        "metric": "ce_loss_score",
        "value": 0.98,
        "interval": [0.97, 0.99],
        "interval_level": 0.9,
        "confidence": 0.9,
        "min_score": 0.95,
        "max_value": None,
        "gate": "interval bound",
        "n_tokens": 4032,
        "passed": True,
        "message": None,
        # the typed record's other fields (records.AssertionRecord): empty for this check
        **dict.fromkeys(("model", "sae", "tokens", "device", "dtype", "tol", "baseline")),
    }
    assert records.from_plain(ce) == records.AssertionRecord.from_plain(ce)
    assert r2["passed"] is False and r2["value"] == 0.98 and r2["legacy"] == 0.78
    assert r2["tol"] == pytest.approx(0.75 * (1 - 0.78))
    assert "about zero" in r2["message"]
    assert r2["label"] is None  # reported metrics are not an SAE under test: no summary row


def test_outside_pytest_nothing_is_recorded() -> None:
    outside = types.SimpleNamespace(hook=None, item=None)  # a run between tests: no item to record on
    with running.activated(outside):
        assert running.current_item() is None
        assert_ce_recovery(fake(), min_score=0.5)  # no item: no error, nothing to record to


# --------------------------------------------------------------------------------------------------------
# assert_ce_recovery(group=...)


@pytest.fixture(scope="module")
def grouped() -> Any:
    model = make_tiny_model()
    tokens = torch.as_tensor(make_token_ids(n_sequences=12))
    labels = torch.zeros_like(tokens)
    labels[:, tokens.shape[1] // 2 :] = 1
    return {
        "identity": evaluate(
            model, make_identity_sae(), tokens, token_groups=labels, group_names=["early", "late"]
        ),
        "random": evaluate(
            model, make_random_sae(), tokens, token_groups=labels, group_names=["early", "late"]
        ),
        "plain": evaluate(model, make_identity_sae(), tokens),
    }


def test_a_group_is_gated_on_its_own_metric(grouped: dict[str, Any], request: pytest.FixtureRequest) -> None:
    records.take(request.node)
    assert_ce_recovery(grouped["identity"], metric="delta_ce", max_value=1e-5, confidence=0.95, group="late")
    found = records.take(request.node)
    assert found[-1]["group"] == "late"
    assert found[-1]["value"] == grouped["identity"].groups["late"].metrics["delta_ce"]
    assert found[-1]["n_tokens"] == grouped["identity"].groups["late"].n_tokens
    random = grouped["random"].groups["early"]
    low, high = random.confidence_interval("kl_sae")
    with pytest.raises(
        AssertionError, match=r"in token group 'early', the upper bound of the 95% interval of kl_sae"
    ):
        assert_ce_recovery(grouped["random"], metric="kl_sae", max_value=low, confidence=0.95, group="early")
    # the group's number, not the whole evaluation's
    assert_ce_recovery(
        grouped["random"], metric="kl_sae", max_value=high + 1e-12, confidence=0.95, group="early"
    )


def test_an_unknown_group_or_a_metric_not_measured_per_group_is_refused(grouped: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="unknown group 'middle'; the groups are 'early', 'late'"):
        assert_ce_recovery(grouped["identity"], metric="delta_ce", max_value=0.1, group="middle")
    with pytest.raises(ConfigError, match="has no token groups: set token_groups"):
        assert_ce_recovery(grouped["plain"], metric="delta_ce", max_value=0.1, group="early")
    with pytest.raises(ConfigError, match="ce_loss_score is not measured per token group"):
        assert_ce_recovery(grouped["identity"], min_score=0.5, group="early")
