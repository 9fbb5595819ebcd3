"""Assertion helpers, re-exported from where they live in :mod:`pytest_saecheck.checks`.

``assert_ce_recovery`` is in :mod:`pytest_saecheck.checks.ce`, ``assert_no_regression`` in
:mod:`pytest_saecheck.checks.regression` and ``assert_r2_matches_legacy`` in
:mod:`pytest_saecheck.checks.fingerprints`. Import them from ``pytest_saecheck``.
"""

from __future__ import annotations

from pytest_saecheck.checks.ce import CE_METRICS, LOSS_ROWS, assert_ce_recovery
from pytest_saecheck.checks.fingerprints import (
    ABOUT_ZERO_CAUSE,
    DEFAULT_R2_TOL,
    LEGACY_GAP_RATIO,
    MIN_LEGACY_TOL,
    assert_r2_matches_legacy,
    legacy_tolerance,
)
from pytest_saecheck.checks.regression import assert_no_regression

__all__ = (
    "ABOUT_ZERO_CAUSE",
    "CE_METRICS",
    "DEFAULT_R2_TOL",
    "LEGACY_GAP_RATIO",
    "LOSS_ROWS",
    "MIN_LEGACY_TOL",
    "assert_ce_recovery",
    "assert_no_regression",
    "assert_r2_matches_legacy",
    "legacy_tolerance",
)
