"""Assertion helpers: ``assert_ce_recovery``, ``assert_r2_matches_legacy`` and ``assert_no_regression``.

``assert_r2_matches_legacy`` lives in :mod:`pytest_saecheck.checks.fingerprints` and is re-exported here.

They behave like pytest's own assertions: ``__tracebackhide__`` hides their frames, a failure raises a plain
``AssertionError`` whose message tabulates the numbers, no tensor (or model) is reachable from the exception,
bad thresholds raise :class:`~pytest_saecheck.errors.ConfigError`, and NaN never passes. Each call records its
metric, threshold, interval and outcome on the running test's report (``report.saecheck_records``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pytest_saecheck import records
from pytest_saecheck.baselines import DEFAULT_METRICS
from pytest_saecheck.checks.fingerprints import (
    ABOUT_ZERO_CAUSE,
    DEFAULT_R2_TOL,
    LEGACY_GAP_RATIO,
    MIN_LEGACY_TOL,
    assert_r2_matches_legacy,
    legacy_tolerance,
)
from pytest_saecheck.checks.messages import fmt as _fmt
from pytest_saecheck.checks.messages import fmt_interval, table
from pytest_saecheck.checks.workflow import CheckOutcome, conclude, interval_of
from pytest_saecheck.checks.workflow import Subject as _Subject
from pytest_saecheck.checks.workflow import finite_number as _finite_number
from pytest_saecheck.checks.workflow import subject_of as _unwrap
from pytest_saecheck.defaults import INTERVAL_LEVEL as DISPLAY_LEVEL
from pytest_saecheck.errors import ConfigError

CE_METRICS: tuple[str, ...] = (
    "ce_loss_score",
    "ce_loss_score_mean_ablation",
    "ce_rec",
    "delta_ce",
    "kl_div_score",
    "kl_sae",
    "compute_fraction",
)
LOSS_ROWS = ("ce_orig", "ce_sae", "ce_zero", "ce_mean")

__all__ = (
    "ABOUT_ZERO_CAUSE",
    "CE_METRICS",
    "DEFAULT_R2_TOL",
    "LEGACY_GAP_RATIO",
    "MIN_LEGACY_TOL",
    "assert_ce_recovery",
    "assert_no_regression",
    "assert_r2_matches_legacy",
    "legacy_tolerance",
)

# --------------------------------------------------------------------------------------------------------
# shared plumbing


def _metric_info(name: str) -> Any:
    from pytest_saecheck.metrics import METRICS

    return METRICS.get(name)


# --------------------------------------------------------------------------------------------------------
# assert_ce_recovery


def _validate_ce_thresholds(
    metric: str, min_score: Any, max_value: Any, confidence: Any
) -> tuple[float | None, float | None, float | None]:
    if metric not in CE_METRICS:
        raise ConfigError(
            f"assert_ce_recovery: unknown metric {metric!r}; choose one of {', '.join(CE_METRICS)}"
        )
    if min_score is None and max_value is None:
        raise ConfigError(
            f"assert_ce_recovery: give a threshold: min_score= (the {metric} must be at least this) "
            "or max_value= (at most this)"
        )
    info = _metric_info(metric)
    low = None if min_score is None else _finite_number("min_score", min_score)
    high = None if max_value is None else _finite_number("max_value", max_value)
    if low is not None and info is not None and not info.higher_is_better:
        raise ConfigError(
            f"assert_ce_recovery: {metric} is lower-is-better ({info.scale}); bound it with max_value=, not min_score="
        )
    if low is not None and info is not None and info.upper_bound is not None and low > info.upper_bound:
        raise ConfigError(
            f"assert_ce_recovery: min_score={low} can never pass: {metric} is at most {info.upper_bound} "
            f"({info.formula})"
        )
    if high is not None and info is not None and info.lower_bound is not None and high < info.lower_bound:
        raise ConfigError(
            f"assert_ce_recovery: max_value={high} can never pass: {metric} is at least {info.lower_bound} "
            f"({info.formula})"
        )
    if low is not None and high is not None and low > high:
        raise ConfigError(f"assert_ce_recovery: min_score={low} is above max_value={high}")
    level = None
    if confidence is not None:
        level = _finite_number("confidence", confidence)
        if not 0.0 < level < 1.0:
            raise ConfigError(
                f"assert_ce_recovery: confidence must lie strictly between 0 and 1 (e.g. 0.95), got {level}"
            )
    return low, high, level


def assert_ce_recovery(
    check: Any,
    *,
    metric: str = "ce_loss_score",
    min_score: float | None = None,
    max_value: float | None = None,
    confidence: float | None = None,
) -> None:
    """Assert that a cross-entropy metric of the spliced model meets a threshold.

    ``check`` is the ``saecheck`` fixture (or an ``Evaluation``). ``metric`` is one of :data:`CE_METRICS`.
    ``min_score`` bounds it from below, ``max_value`` from above. With ``confidence`` (e.g. 0.95) the gate is the
    bootstrap interval over sequences: its lower bound must reach ``min_score``, its upper bound must stay
    under ``max_value``. Without it, the point estimate is gated. An undefined or NaN metric fails.
    Gating on ``compute_fraction`` under the default scaling law (published for another model family, not
    fitted for this one) raises :class:`ConfigError`: fit or choose the law (the ``scaling_law`` setting).
    """
    __tracebackhide__ = True
    low, high, level = _validate_ce_thresholds(metric, min_score, max_value, confidence)
    evaluation, facts = _unwrap(check)
    law = getattr(evaluation, "scaling_law", None)
    if metric == "compute_fraction" and getattr(law, "default", False):
        raise ConfigError(
            "assert_ce_recovery(metric='compute_fraction') gates on the default scaling law "
            f"({law.label()}); fit the law for your model family (pytest_saecheck.fit_scaling_law, then "
            "scaling_law='path/to/fit.json') or choose one explicitly (scaling_law='chinchilla', 'epoch', 'kaplan' "
            "or (E, gamma))"
        )
    value = facts.metrics.get(metric)
    shown_level = level if level is not None else DISPLAY_LEVEL
    interval = interval_of(evaluation, metric, shown_level) if value is not None else None
    if level is not None and value is not None and interval is None:
        # the caller asked for an interval: let the engine's error say why there is none
        evaluation.confidence_interval(metric, level)
    del evaluation, check  # nothing below (nor the exception) may keep tensors or the model alive

    failures = _ce_failures(metric, value, interval, low, high, level, facts)
    conclude(
        CheckOutcome(
            assertion="assert_ce_recovery",
            label=facts.label,
            failures=tuple(failures),
            details=tuple(_ce_details(metric, value, interval, shown_level, low, high, level, facts))
            if failures
            else (),
            metric=metric,
            value=value,
            fields={
                **facts.subject,
                "interval": list(interval) if interval is not None else None,
                "interval_level": shown_level,
                "confidence": level,
                "min_score": low,
                "max_value": high,
                "gate": "point estimate" if level is None else "interval bound",
                "n_tokens": facts.n_tokens,
            },
        )
    )


def _ce_failures(
    metric: str,
    value: float | None,
    interval: tuple[float, float] | None,
    low: float | None,
    high: float | None,
    level: float | None,
    facts: _Subject,
) -> list[str]:
    if value is None:
        reason = facts.undefined.get(metric, "the evaluation did not compute it")
        return [f"{metric} is undefined for this SAE: {reason}"]
    if math.isnan(value):
        return [f"{metric} is NaN"]
    failures: list[str] = []
    if low is not None:
        gated = value if level is None else (interval[0] if interval else math.nan)
        what = metric if level is None else f"the lower bound of the {level:.0%} interval of {metric}"
        if not gated >= low:  # NaN fails
            failures.append(f"{what} = {_fmt(gated)} is below min_score {_fmt(low)}")
    if high is not None:
        gated = value if level is None else (interval[1] if interval else math.nan)
        what = metric if level is None else f"the upper bound of the {level:.0%} interval of {metric}"
        if not gated <= high:
            failures.append(f"{what} = {_fmt(gated)} is above max_value {_fmt(high)}")
    return failures


def _ce_details(
    metric: str,
    value: float | None,
    interval: tuple[float, float] | None,
    shown_level: float,
    low: float | None,
    high: float | None,
    level: float | None,
    facts: _Subject,
) -> list[str]:
    info = _metric_info(metric)
    threshold = " and ".join(
        part
        for part in (
            f"≥ {_fmt(low)}" if low is not None else "",
            f"≤ {_fmt(high)}" if high is not None else "",
        )
        if part
    )
    rows: list[tuple[str, ...]] = [("", "value", f"{shown_level:.0%} interval", "threshold")]
    for name in LOSS_ROWS:
        loss = facts.metrics.get(name)
        rows.append(
            (name, _fmt(loss), "", "" if loss is not None else facts.undefined.get(name, "not computed"))
        )
    gate = "point estimate" if level is None else ("lower bound" if low is not None else "upper bound")
    rows.append((metric, _fmt(value), fmt_interval(interval), f"{threshold} (gated on the {gate})"))
    lines = table(rows)
    lines.append("  " + facts.tokens_line())
    if info is not None:
        lines.append(f"  scale: {metric} = {info.formula}: {info.scale}")
    return lines


# --------------------------------------------------------------------------------------------------------
# assert_no_regression


def _text_arg(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"assert_no_regression: {name} must be an SAE spec (a non-empty string), got {value!r}"
        )
    return value.strip()


def _validate_regression_args(metrics: Any, confidence: Any) -> tuple[tuple[str, ...], float]:
    from pytest_saecheck.metrics import BOOTSTRAPPABLE, METRICS

    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not names:
        raise ConfigError("assert_no_regression: metrics is empty; name at least one metric")
    for name in names:
        if name not in METRICS:
            raise ConfigError(
                f"assert_no_regression: unknown metric {name!r}; known metrics: {', '.join(METRICS)}"
            )
        if name not in BOOTSTRAPPABLE:
            raise ConfigError(
                f"assert_no_regression: {name!r} is a property of the whole token set, not a sum over sequences, "
                "so it has no paired interval; compare it with assert_ce_recovery-style thresholds instead"
            )
    level = _finite_number("confidence", confidence)
    if not 0.0 < level < 1.0:
        raise ConfigError(
            f"assert_no_regression: confidence must lie strictly between 0 and 1 (e.g. 0.95), got {level}"
        )
    return names, level


def assert_no_regression(
    check: Any,
    *,
    metrics: Any = DEFAULT_METRICS,
    confidence: float = DISPLAY_LEVEL,
    tol: float | Mapping[str, float] | None = None,
    unpaired: bool = False,
    baseline: str | None = None,
) -> None:
    """Assert that no metric of the SAE under test got worse than in its recorded baseline.

    ``check`` is the ``saecheck`` fixture. The baseline is the SAE's file in the baseline directory
    (``--saecheck-baseline-dir``, ini ``saecheck_baseline_dir``), recorded by a run with
    ``--saecheck-update-baselines``. On the same tokens (same token-id hash and token-policy hash) each metric's
    difference current − baseline gets a paired bootstrap interval over sequences at ``confidence``; a metric
    *regressed* when the whole interval lies on the worse side (by the metric catalogue's ``higher_is_better``)
    beyond ``tol`` (in the metric's own units: nats/token for ``delta_ce`` and ``kl_sae``, latents per token for
    ``l0``; a number for every metric, or a mapping metric → number; default: a numerical noise floor of
    0.1% of the baseline value + 1e-5, :func:`pytest_saecheck.baselines.default_tolerance`). It *improved* when
    the whole interval lies on the better side. A metric undefined on one side fails. ``baseline`` names another
    SAE (its spec as written in the marker, e.g. ``"demo/good"``) whose baseline to compare with, for a retrained
    or candidate SAE judged against the released one.

    In a run with ``--saecheck-update-baselines`` (or ``=missing`` and no baseline yet) the assertion compares
    nothing and passes: the run records the baseline.

    Raises:
        AssertionError: a metric regressed or became undefined, or the SAE has no baseline (the message gives the
            command that records one).
        ConfigError: bad arguments, no baseline directory configured, or ``check`` is not the fixture.
        BaselineError: the baseline file is unreadable, or it was recorded on other token ids or another token
            policy (pass ``unpaired=True`` to compare anyway, each side resampled on its own).
    """
    __tracebackhide__ = True
    from pytest_saecheck import baselines

    names, level = _validate_regression_args(metrics, confidence)
    tolerances = baselines.check_tol(tol, names)
    if not (hasattr(check, "settings") and hasattr(check, "tokens") and hasattr(check, "subject")):
        raise ConfigError(
            f"assert_no_regression needs the saecheck fixture (the baseline is found by its SAE and compared on its "
            f"tokens), got {type(check).__name__}"
        )
    item = getattr(check, "_item", None) or records.current_item()
    if item is None:
        raise ConfigError("assert_no_regression runs inside a pytest test (it reads the baseline options)")
    config = item.config
    directory = baselines.baseline_dir(config)
    if directory is None:
        raise ConfigError(
            f"assert_no_regression: no baseline directory is configured; pass {baselines.BASELINE_DIR_OPTION} DIR "
            "or set the ini key saecheck_baseline_dir (relative to the ini file)"
        )
    current = baselines.document_for(check)
    key = current["key"]
    if baseline is not None:
        key = baselines.baseline_key(
            {**check.subject(), "sae": _text_arg("baseline", baseline)}, check.settings.hook_name
        )
    evaluation, facts = _unwrap(check)
    law = evaluation.scaling_law
    del evaluation, check
    path = baselines.baseline_path(directory, key)
    mode = baselines.update_mode(config)
    entry: dict[str, Any] = {
        "kind": "assertion",
        "assertion": "assert_no_regression",
        **facts.subject,
        "label": facts.label,
        "metric": None,
        "value": None,
        "interval_level": level,
        "confidence": level,
        "gate": "paired interval" if not unpaired else "unpaired interval",
        "n_tokens": facts.n_tokens,
        "baseline": {"path": str(path), "key": key, "of": baseline, "level": level, "comparisons": []},
    }
    if baseline is None and (mode == "all" or (mode == "missing" and not path.exists())):
        entry["baseline"]["state"] = "recording"
        records.record({**entry, "passed": True, "message": None})
        return
    if not path.exists():
        whose = "" if baseline is None else f" of {baseline}"
        how = (
            baselines.record_command(getattr(item, "nodeid", None), directory)
            if baseline is None
            else baselines.record_command(None, directory) + f" (on a test of {baseline})"
        )
        message = f"assert_no_regression failed for {facts.label}: no baseline{whose} at {path}\n  record it with: {how}"
        entry["baseline"]["state"] = "missing"
        records.record({**entry, "passed": False, "message": message})
        raise AssertionError(message)
    stored = baselines.load(path)
    mismatch = baselines.token_mismatch(current, stored)
    if mismatch and not unpaired:
        raise baselines.BaselineError(
            f"assert_no_regression: the baseline {path} of {facts.label} was recorded on other tokens: "
            + "; ".join(mismatch)
            + f". A paired comparison needs the same tokens: restore the evaluation settings, or record a new "
            f"baseline ({baselines.UPDATE_OPTION}), or pass unpaired=True to compare the two token sets with "
            "independent resampling (wider intervals)"
        )
    comparisons = baselines.compare(
        baselines.per_sequence_arrays(current),
        baselines.per_sequence_arrays(stored),
        names,
        level=level,
        tol=tolerances,
        scaling_law=law,
        paired=not mismatch,
    )
    failures = [
        f"{c.metric} got worse: {_fmt(c.baseline)} → {_fmt(c.current)}, difference {_fmt(c.difference)} "
        f"({level:.0%} interval [{_fmt(c.interval[0])}, {_fmt(c.interval[1])}], "
        f"{'higher' if c.higher_is_better else 'lower'} is better, tol {c.tol:.2g})"
        if c.status == "regressed" and c.interval is not None
        else f"{c.metric} is {c.reason}"
        for c in comparisons
        if c.status == "regressed" or (c.status == "undefined" and c.reason != "undefined on both sides")
    ]
    entry["baseline"].update(
        state="compared",
        paired=not mismatch,
        comparisons=[c.to_dict() for c in comparisons],
        versions=stored.get("versions"),
    )
    worst = next((c for c in comparisons if c.status == "regressed"), None)
    if worst is not None:
        entry.update(metric=worst.metric, value=worst.difference, interval=list(worst.interval or ()) or None)
    message = (
        None
        if not failures
        else _regression_message(facts, comparisons, failures, level, path, mismatch, baseline)
    )
    records.record({**entry, "passed": message is None, "message": message})
    if message is not None:
        raise AssertionError(message)


def _regression_message(
    facts: _Subject,
    comparisons: list[Any],
    failures: list[str],
    level: float,
    path: Any,
    mismatch: list[str],
    of: str | None,
) -> str:
    rows: list[tuple[str, ...]] = [
        ("", "baseline", "current", "difference", f"{level:.0%} interval", "better", "status")
    ]
    for c in comparisons:
        shown = f"[{_fmt(c.interval[0])}, {_fmt(c.interval[1])}]" if c.interval is not None else "—"
        rows.append(
            (
                c.metric,
                _fmt(c.baseline),
                _fmt(c.current),
                _fmt(c.difference),
                shown,
                "higher" if c.higher_is_better else "lower",
                c.status if c.reason is None else f"{c.status}: {c.reason}",
            )
        )
    lines = [f"assert_no_regression failed for {facts.label}: " + "; ".join(failures)]
    lines += table(rows)
    lines.append("  " + facts.tokens_line())
    pairing = (
        "paired: same tokens, one set of resampled sequences for both sides"
        if not mismatch
        else "UNPAIRED (unpaired=True): " + "; ".join(mismatch)
    )
    lines.append(f"  baseline{'' if of is None else f' of {of}'}: {path} ({pairing})")
    return "\n".join(lines)
