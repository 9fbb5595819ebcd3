"""``assert_no_regression``: the SAE's metrics against its recorded baseline (paired bootstrap intervals).

It follows the one check workflow (:mod:`pytest_saecheck.checks.workflow`): validate the arguments, find the
baseline (:mod:`pytest_saecheck.checks.baselines`), compare, build a :class:`CheckOutcome`, :func:`conclude`. Metric
directions come from the metric catalogue (:mod:`pytest_saecheck.catalogue`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_saecheck import catalogue, running
from pytest_saecheck.checks import baselines
from pytest_saecheck.checks.baselines import DEFAULT_METRICS
from pytest_saecheck.checks.workflow import (
    CheckOutcome,
    Subject,
    conclude,
    confidence_level,
    is_fixture,
    subject_of,
)
from pytest_saecheck.defaults import INTERVAL_LEVEL as DISPLAY_LEVEL
from pytest_saecheck.errors import ConfigError
from pytest_saecheck.messages import fmt, fmt_interval, fmt_significant, table

ASSERTION = "assert_no_regression"


def _text_arg(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{ASSERTION}: {name} must be an SAE spec (a non-empty string), got {value!r}")
    return value.strip()


def _validate_regression_args(metrics: Any, confidence: Any) -> tuple[tuple[str, ...], float]:
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not names:
        raise ConfigError(f"{ASSERTION}: metrics is empty; name at least one metric")
    for name in names:
        if name not in catalogue.METRICS:
            raise ConfigError(
                f"{ASSERTION}: unknown metric {name!r}; known metrics: {', '.join(catalogue.METRICS)}"
            )
        if name not in catalogue.BOOTSTRAPPABLE:
            raise ConfigError(
                f"{ASSERTION}: {name!r} is a property of the whole token set, not a sum over sequences, "
                "so it has no paired interval; compare it with assert_ce_recovery-style thresholds instead"
            )
    return names, confidence_level(ASSERTION, confidence)


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
    0.1% of the baseline value + 1e-5, :func:`pytest_saecheck.checks.baselines.default_tolerance`). It *improved* when
    the whole interval lies on the better side. A metric undefined on one side fails. ``baseline`` names another
    SAE (its spec as written in the marker, e.g. ``"demo/good"``) whose baseline to compare with, for a retrained
    or candidate SAE judged against the released one.

    In a run with ``--saecheck-update-baselines`` (or ``=missing`` and no baseline yet) the assertion compares
    nothing and passes: the run records the baseline. When it fails (a regression, or no baseline yet), the
    current numbers are written beside the baseline as ``<key>.obtained.json``, whose path the message gives (as
    pytest-regressions does): renamed to the baseline's name, that file is the new baseline.

    Raises:
        AssertionError: a metric regressed or became undefined, or the SAE has no baseline (the message gives the
            command that records one).
        ConfigError: bad arguments, no baseline directory configured, or ``check`` is not the fixture.
        BaselineError: the baseline file is unreadable, or it was recorded on other token ids or another token
            policy (pass ``unpaired=True`` to compare anyway, each side resampled on its own).
    """
    __tracebackhide__ = True
    names, level = _validate_regression_args(metrics, confidence)
    tolerances = baselines.check_tol(tol, names)
    target = _target(check, baseline)
    evaluation, facts = subject_of(check)
    law = evaluation.scaling_law
    current = baselines.document_for(check)
    del evaluation, check  # nothing below (nor the exception) may keep tensors or the model alive
    fields: dict[str, Any] = {
        **facts.subject,
        "interval_level": level,
        "confidence": level,
        "gate": "paired interval" if not unpaired else "unpaired interval",
        "n_tokens": facts.n_tokens,
    }
    comparison: dict[str, Any] = {
        "path": str(target.path),
        "key": target.key,
        "of": baseline,
        "level": level,
        "comparisons": [],
    }
    if baseline is None and (target.mode == "all" or (target.mode == "missing" and not target.path.exists())):
        conclude(_outcome(facts, fields, {**comparison, "state": "recording"}))
        return
    if not target.path.exists():
        conclude(_missing(facts, fields, comparison, target, current))
        return
    stored, mismatch = _stored(target.path, current, facts.label, unpaired)
    comparisons = baselines.compare(
        baselines.per_sequence_arrays(current),
        baselines.per_sequence_arrays(stored),
        names,
        level=level,
        tol=tolerances,
        scaling_law=law,
        paired=not mismatch,
    )
    compared = {
        **comparison,
        "state": "compared",
        "paired": not mismatch,
        "comparisons": [c.to_dict() for c in comparisons],
        "versions": stored.get("versions"),
    }
    conclude(_compared(facts, fields, compared, comparisons, target, current, mismatch))


def _stored(
    path: Path, current: Mapping[str, Any], label: str | None, unpaired: bool
) -> tuple[dict[str, Any], list[str]]:
    """(the baseline at ``path``, how its tokens differ from the current ones).

    Raises:
        BaselineError: unreadable, or recorded on other tokens and ``unpaired`` is False.
    """
    stored = baselines.load(path)
    mismatch = baselines.token_mismatch(current, stored)
    if mismatch and not unpaired:
        raise baselines.BaselineError(
            f"{ASSERTION}: the baseline {path} of {label} was recorded on other tokens: "
            + "; ".join(mismatch)
            + f". A paired comparison needs the same tokens: restore the evaluation settings, or record a new "
            f"baseline ({baselines.UPDATE_OPTION}), or pass unpaired=True to compare the two token sets with "
            "independent resampling (wider intervals)"
        )
    return stored, mismatch


@dataclass(frozen=True)
class _Target:
    """The baseline an ``assert_no_regression`` call compares with: its key and file, the test's node id, and the
    run's baseline directory and update mode."""

    key: str
    path: Path
    directory: Path
    mode: str | None
    nodeid: str | None
    of: str | None


def _target(check: Any, of: str | None) -> _Target:
    """Where the baseline of the fixture ``check`` (or of the SAE ``of``) is, from the run's options.

    Raises:
        ConfigError: ``check`` is not the fixture, it runs outside a pytest test, or no baseline directory is
            configured.
    """
    if not is_fixture(check):
        raise ConfigError(
            f"{ASSERTION} needs the saecheck fixture (the baseline is found by its SAE and compared on its "
            f"tokens), got {type(check).__name__}"
        )
    item = check.item or running.current_item()
    if item is None:
        raise ConfigError(f"{ASSERTION} runs inside a pytest test (it reads the baseline options)")
    directory = baselines.baseline_dir(item.config)
    if directory is None:
        raise ConfigError(
            f"{ASSERTION}: no baseline directory is configured; pass {baselines.BASELINE_DIR_OPTION} DIR "
            "or set the ini key saecheck_baseline_dir (relative to the ini file)"
        )
    subject = check.subject()
    if of is not None:
        subject = {**subject, "sae": _text_arg("baseline", of)}
    key = baselines.baseline_key(subject, check.settings.hook_name)
    return _Target(
        key=key,
        path=baselines.baseline_path(directory, key),
        directory=directory,
        mode=baselines.update_mode(item.config),
        nodeid=getattr(item, "nodeid", None),
        of=of,
    )


def _obtained(target: _Target, current: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Write the obtained numbers beside the baseline: (the comparison's ``obtained`` field, the message line)."""
    written, problem = baselines.write_obtained(target.path, current)
    if written is None:
        return {"obtained": None}, (f"  obtained numbers: {problem}",)
    accept = f"rename it to {target.path.name} to accept them" if target.of is None else "they are this SAE's"
    return {"obtained": str(written)}, (f"  obtained numbers written to {written} ({accept})",)


def _missing(
    facts: Subject,
    fields: Mapping[str, Any],
    comparison: Mapping[str, Any],
    target: _Target,
    current: Mapping[str, Any],
) -> CheckOutcome:
    """The outcome when the baseline file does not exist: a failure naming the command that records it."""
    whose = "" if target.of is None else f" of {target.of}"
    how = (
        baselines.record_command(target.nodeid, target.directory)
        if target.of is None
        else baselines.record_command(None, target.directory) + f" (on a test of {target.of})"
    )
    obtained, line = _obtained(target, current)
    return _outcome(
        facts,
        fields,
        {**comparison, **obtained, "state": "missing"},
        failures=(f"no baseline{whose} at {target.path}",),
        details=(f"  record it with: {how}", *line),
    )


def _failure(c: Any, level: float) -> str:
    """One metric's failure sentence (it regressed, or became undefined)."""
    if c.status == "regressed" and c.interval is not None:
        return (
            f"{c.metric} got worse: {fmt(c.baseline)} → {fmt(c.current)}, difference {fmt(c.difference)} "
            f"({level:.0%} interval {fmt_interval(c.interval)}, "
            f"{'higher' if c.higher_is_better else 'lower'} is better, tol {fmt_significant(c.tol)})"
        )
    return f"{c.metric} is {c.reason}"


def _compared(
    facts: Subject,
    fields: Mapping[str, Any],
    compared: Mapping[str, Any],
    comparisons: Sequence[Any],
    target: _Target,
    current: Mapping[str, Any],
    mismatch: Sequence[str],
) -> CheckOutcome:
    """The outcome of a comparison: a failure per regressed (or newly undefined) metric, with the table, and the
    obtained numbers written beside the baseline."""
    level = float(compared["level"])
    failures = tuple(
        _failure(c, level)
        for c in comparisons
        if c.status == "regressed" or (c.status == "undefined" and c.reason != "undefined on both sides")
    )
    worst = next((c for c in comparisons if c.status == "regressed"), None)
    details: tuple[str, ...] = ()
    obtained: dict[str, Any] = {}
    if failures:
        obtained, line = _obtained(target, current)
        details = (*_details(facts, comparisons, level, target.path, mismatch, target.of), *line)
    return _outcome(
        facts,
        {**fields, "interval": list(worst.interval) if worst is not None and worst.interval else None},
        {**compared, **obtained},
        failures=failures,
        details=details,
        metric=worst.metric if worst is not None else None,
        value=worst.difference if worst is not None else None,
    )


def _outcome(
    facts: Subject,
    fields: Mapping[str, Any],
    comparison: Mapping[str, Any],
    *,
    failures: tuple[str, ...] = (),
    details: tuple[str, ...] = (),
    metric: str | None = None,
    value: float | None = None,
) -> CheckOutcome:
    return CheckOutcome(
        assertion=ASSERTION,
        label=facts.label,
        failures=failures,
        details=details,
        metric=metric,
        value=value,
        fields={**fields, "baseline": dict(comparison)},
    )


def _details(
    facts: Subject,
    comparisons: Sequence[Any],
    level: float,
    path: Path,
    mismatch: Sequence[str],
    of: str | None,
) -> tuple[str, ...]:
    """The failure message after its header: every metric's comparison, the tokens, the baseline file."""
    rows: list[tuple[str, ...]] = [
        ("", "baseline", "current", "difference", f"{level:.0%} interval", "better", "status")
    ]
    for c in comparisons:
        rows.append(
            (
                c.metric,
                fmt(c.baseline),
                fmt(c.current),
                fmt(c.difference),
                fmt_interval(c.interval),
                "higher" if c.higher_is_better else "lower",
                c.status if c.reason is None else f"{c.status}: {c.reason}",
            )
        )
    pairing = (
        "paired: same tokens, one set of resampled sequences for both sides"
        if not mismatch
        else "UNPAIRED (unpaired=True): " + "; ".join(mismatch)
    )
    return (
        *table(rows),
        "  " + facts.tokens_line(),
        f"  baseline{'' if of is None else f' of {of}'}: {path} ({pairing})",
    )
