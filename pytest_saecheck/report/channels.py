"""A test's saecheck numbers in pytest's own channels: a report section, JUnit properties, pytest-html extras.

Each function reads the plain records one test phase produced (``report.saecheck_records``, see
:mod:`pytest_saecheck.records`) and renders them for one channel; the plugin's session object puts them on the test
report (:meth:`pytest_saecheck.plugin.session.SAECheckSession.pytest_runtest_makereport`):

- :func:`section_text`: the text of a ``("saecheck", text)`` entry of ``report.sections`` (pytest shows it under a
  failed test, and under passed ones with ``-rP``);
- :func:`junit_properties`: ``(name, value)`` pairs for ``item.user_properties``, which ``--junitxml`` writes as
  ``<property>`` elements of the test case (what ``record_property`` does);
- :func:`html_extra`: an HTML table for pytest-html's ``report.extras`` (escaped).

Every value is a plain string or number, so the channels survive pytest-xdist's report serialisation. Imports no
torch.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_saecheck import records
from pytest_saecheck.messages import fmt, fmt_interval
from pytest_saecheck.report.terminal import HEADLINE

#: The title of the ``report.sections`` entry.
SECTION_TITLE = "saecheck"
#: The prefix of every JUnit property name.
PROPERTY_PREFIX = "saecheck"
#: An assertion record's thresholds, as (record field, words in the section).
_THRESHOLDS = (("min_score", "min"), ("max_value", "max"), ("tol", "tol"))


def _typed(plain_records: Iterable[Any]) -> list[records.Record]:
    return [typed for typed in map(records.from_plain, plain_records) if typed is not None]


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _headline(metrics: Mapping[str, Any] | None) -> list[tuple[str, float | None]]:
    """The headline metrics of an evaluation (those of the end-of-run table) that it has."""
    metrics = metrics or {}
    return [(name, _number(metrics.get(name))) for name, _ in HEADLINE if name in metrics]


def _verdict(record: records.AssertionRecord) -> str:
    if record.passed is None:
        return "no verdict"
    return "passed" if record.passed else "failed"


def _assertion_line(record: records.AssertionRecord) -> str:
    """``assert_ce_recovery ce_loss_score = 0.9712 [0.96, 0.98] (95%), min 0.95: passed``."""
    parts = [record.assertion or "assertion"]
    if record.metric is not None:
        parts.append(f"{record.metric} = {fmt(_number(record.value))}")
    if record.interval:
        level = f" ({record.interval_level:.0%})" if record.interval_level else ""
        parts.append(f"{fmt_interval(record.interval)}{level}")
    text = " ".join(parts)
    limits = [
        f"{word} {fmt(_number(getattr(record, name)))}"
        for name, word in _THRESHOLDS
        if getattr(record, name) is not None
    ]
    if limits:
        text += ", " + ", ".join(limits)
    return f"{text}: {_verdict(record)}"


def section_text(plain_records: Iterable[Any]) -> str | None:
    """The lines of a phase's ``saecheck`` report section: per evaluation, its SAE and headline numbers; per
    assertion, its metric, value, interval, thresholds and verdict. None when the phase recorded neither."""
    lines: list[str] = []
    for record in _typed(plain_records):
        if isinstance(record, records.EvaluationRecord):
            numbers = ", ".join(f"{name} {fmt(value)}" for name, value in _headline(record.metrics))
            tokens = f" on {record.n_tokens} tokens" if record.n_tokens else ""
            lines.append(f"{record.label or record.sae}{tokens}: {numbers or 'no metrics'}")
        elif isinstance(record, records.AssertionRecord):
            lines.append(_assertion_line(record))
            baseline = record.baseline or {}
            if baseline.get("obtained"):
                lines.append(f"  obtained numbers written to {baseline['obtained']}")
    return "\n".join(lines) if lines else None


def junit_properties(plain_records: Iterable[Any]) -> list[tuple[str, str | float]]:
    """``(name, value)`` pairs for ``item.user_properties`` (JUnit XML ``<property>`` elements).

    An evaluation gives ``saecheck.sae``, ``saecheck.n_tokens`` and ``saecheck.<metric>`` for each headline
    metric it has; the i-th assertion of the phase gives ``saecheck.<assertion>.<metric>`` (its value),
    ``….passed`` (``"true"``/``"false"``), ``….interval`` (``"low,high"``) and each threshold it was given.
    Undefined values are left out.
    """
    prefix = PROPERTY_PREFIX
    found: list[tuple[str, str | float]] = []
    for record in _typed(plain_records):
        if isinstance(record, records.EvaluationRecord):
            if record.sae is not None:
                found.append((f"{prefix}.sae", str(record.sae)))
            if record.n_tokens:
                found.append((f"{prefix}.n_tokens", float(record.n_tokens)))
            found += [
                (f"{prefix}.{name}", value) for name, value in _headline(record.metrics) if value is not None
            ]
        elif isinstance(record, records.AssertionRecord):
            name = f"{prefix}.{record.assertion}" + (f".{record.metric}" if record.metric else "")
            value = _number(record.value)
            if value is not None:
                found.append((name, value))
            if record.passed is not None:
                found.append((f"{name}.passed", "true" if record.passed else "false"))
            if record.interval and all(_number(bound) is not None for bound in record.interval):
                found.append((f"{name}.interval", ",".join(repr(float(bound)) for bound in record.interval)))
            found += [
                (f"{name}.{field}", number)
                for field, _ in _THRESHOLDS
                if (number := _number(getattr(record, field))) is not None
            ]
    return found


def html_extra(plain_records: Iterable[Any]) -> str | None:
    """An HTML table of :func:`section_text`'s lines for pytest-html (every value escaped); None when empty."""
    text = section_text(plain_records)
    if text is None:
        return None
    rows = "".join(f"<tr><td>{html.escape(line)}</td></tr>" for line in text.splitlines())
    return f'<table class="saecheck"><tr><th>saecheck</th></tr>{rows}</table>'
