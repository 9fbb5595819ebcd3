"""One acceptance test file over several SAEs, each with its own thresholds (the CI release gate).

``saecheck_param(sae, *values, id=..., **marker_keys)`` is ``pytest.param`` marked with
``@pytest.mark.saecheck(sae=...)``: one test case per SAE, with a readable id (``test_ce[demo/good]``), so
``pytest -k good`` selects one SAE and the failure names the SAE that regressed. Each SAE's evaluation is computed
once and shared by every test that uses it; models are loaded one at a time.
"""

import pytest

from pytest_saecheck import assert_ce_recovery, assert_r2_matches_legacy, saecheck_param

#                   SAE                  min ce_loss_score  max delta_ce (nats/token)
SAES = [
    saecheck_param("demo/good", 0.99, 0.01),
    saecheck_param("demo/variance_only", 0.97, 0.2, id="pca-18"),  # a looser gate for a baseline SAE
]


@pytest.mark.parametrize(("min_score", "max_delta_ce"), SAES)
def test_ce(saecheck, min_score, max_delta_ce):
    assert_ce_recovery(saecheck, min_score=min_score)
    assert_ce_recovery(saecheck, metric="delta_ce", max_value=max_delta_ce, confidence=0.95)


@pytest.mark.parametrize(
    "sae", [saecheck_param("demo/good"), saecheck_param("demo/variance_only", id="pca-18")]
)
def test_r2_is_consistent(saecheck, sae):
    # without thresholds, the parameter is the SAE spec itself
    assert saecheck.settings.sae == sae
    assert_r2_matches_legacy(saecheck)
