"""The one check workflow: validate → measure → :class:`CheckOutcome` → :func:`conclude`.

An assertion validates its arguments with the helpers here (:func:`finite_number`, :func:`confidence_level`),
reads what was evaluated with :func:`subject_of` (plain facts; no tensor or model outlives the call), measures,
and builds a :class:`CheckOutcome`. :func:`conclude` records the outcome on the running test's report
(``report.saecheck_records``, read by the terminal summary and the JSON/HTML report) and raises a plain
``AssertionError`` carrying the message when the check failed. ``__tracebackhide__`` hides these frames, so a
failure reads like pytest's own ``assert``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_saecheck import messages, records
from pytest_saecheck.errors import ConfigError, LoadError, SAECheckError


@dataclass(frozen=True)
class CheckOutcome:
    """What one assertion found.

    ``failures`` holds one short sentence per broken condition (empty when the check passed); ``details`` the
    lines of the message after its header (a table, the tokens line, the scale). ``fields`` are the extra plain
    values recorded for the report (thresholds, intervals, comparisons): numbers, strings, lists and dicts only.
    """

    assertion: str
    label: str | None
    failures: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    metric: str | None = None
    value: float | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def message(self) -> str | None:
        """The failure message (header, then details), or ``None`` when the check passed."""
        if self.passed:
            return None
        return "\n".join([messages.failure_header(self.assertion, self.label, self.failures), *self.details])

    def record(self) -> records.AssertionRecord:
        """The typed record attached to the test report (an :class:`~pytest_saecheck.records.AssertionRecord`).

        ``fields`` fill the record's known fields (subject, interval, thresholds, ...); the rest go to its
        ``details``.
        """
        return records.AssertionRecord.from_plain(
            {
                **self.fields,
                "assertion": self.assertion,
                "label": self.label,
                "metric": self.metric,
                "value": self.value,
                "passed": self.passed,
                "message": self.message,
            }
        )

    def to_record(self) -> dict[str, Any]:
        """The plain form of :meth:`record` (``kind == "assertion"``), as it travels on the test report."""
        return self.record().to_plain()


def conclude(outcome: CheckOutcome) -> None:
    """Record ``outcome`` on the running test (nothing outside pytest) and fail the test when it did not pass.

    Raises:
        AssertionError: ``outcome.failures`` is not empty; the message is :attr:`CheckOutcome.message`.
    """
    __tracebackhide__ = True
    records.record(outcome.record())
    if not outcome.passed:
        raise AssertionError(outcome.message)


# ------------------------------------------------------------------------------------------------------------
# validating arguments


def finite_number(name: str, value: Any) -> float:
    """``value`` as a finite float, else :class:`ConfigError` naming the argument."""
    if isinstance(value, (bool, str)):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {number!r}")
    return number


def number_or_nan(name: str, value: Any) -> float:
    """``value`` as a float that may be NaN or infinite (a reported number under test), else :class:`ConfigError`."""
    if isinstance(value, (bool, str)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None


def confidence_level(assertion: str, value: Any) -> float:
    """A confidence level strictly between 0 and 1, else :class:`ConfigError`."""
    level = finite_number("confidence", value)
    if not 0.0 < level < 1.0:
        raise ConfigError(
            f"{assertion}: confidence must lie strictly between 0 and 1 (e.g. 0.95), got {level}"
        )
    return level


# ------------------------------------------------------------------------------------------------------------
# what was evaluated


@dataclass(frozen=True)
class Subject:
    """Plain facts about what was evaluated (no tensors, no model)."""

    label: str | None
    metrics: dict[str, float]
    undefined: dict[str, str]
    n_tokens: int | None
    n_sequences: int | None
    seq_len: int | None
    exclude_bos: bool | None
    subject: dict[str, Any]
    dictionary: dict[str, Any] = field(default_factory=dict)

    def tokens_line(self) -> str:
        return messages.tokens_line(self.n_tokens, self.n_sequences, self.seq_len, self.exclude_bos)


class SAEUnderTest(abc.ABC):
    """The ``saecheck`` fixture as the checks read it; the plugin's fixture class is its implementation.

    :func:`is_fixture` is the one test for "is this the fixture?" (an ``isinstance``, so that asking never
    evaluates anything: the fixture's ``evaluation`` runs the model). A stand-in for the fixture subclasses this.
    """

    settings: Any

    @property
    @abc.abstractmethod
    def evaluation(self) -> Any:
        """The engine's ``Evaluation`` of the SAE under test (computed on first access, then cached)."""

    @property
    @abc.abstractmethod
    def tokens(self) -> Any:
        """The evaluation's token ids, ``[n_sequences, context_size]``."""

    @abc.abstractmethod
    def subject(self) -> dict[str, Any]:
        """What is evaluated, as the user wrote it: ``label``, ``model``, ``sae``, ``tokens``, ``device``, ``dtype``."""

    @property
    @abc.abstractmethod
    def item(self) -> pytest.Item | None:
        """The test the fixture was made for (None outside pytest)."""


def is_fixture(check: Any) -> bool:
    """Whether ``check`` is the ``saecheck`` fixture (an :class:`SAEUnderTest`) rather than an engine
    ``Evaluation``."""
    return isinstance(check, SAEUnderTest)


def subject_of(check: Any, evaluation: Any = None) -> tuple[Any, Subject]:
    """(evaluation, facts) from a ``saecheck`` fixture or an engine ``Evaluation``; ``evaluation`` given: that one
    (a sequential run's at the look a gate was decided), described as the fixture's subject.

    Raises:
        ConfigError: ``check`` is neither.
    """
    if evaluation is None:
        evaluation = check.evaluation if is_fixture(check) else check
    if not hasattr(evaluation, "metrics") or not hasattr(evaluation, "confidence_interval"):
        raise ConfigError(
            f"expected the saecheck fixture or an Evaluation from pytest_saecheck.evaluate(), "
            f"got {type(check).__name__}"
        )
    subject = check.subject() if is_fixture(check) else {}
    _refuse_contradicted_sparsity(evaluation, subject.get("label"))
    policy = getattr(evaluation, "token_policy", None)
    facts = Subject(
        label=subject.get("label") or f"SAE at {getattr(evaluation, 'hook_name', '?')}",
        metrics={key: float(value) for key, value in evaluation.metrics.items()},
        undefined=dict(getattr(evaluation, "undefined", {}) or {}),
        n_tokens=getattr(evaluation, "n_tokens", None),
        n_sequences=getattr(evaluation, "n_sequences", None),
        seq_len=getattr(evaluation, "seq_len", None),
        exclude_bos=getattr(policy, "exclude_bos", None),
        subject=subject,
        dictionary=dict(getattr(evaluation, "dictionary", None) or {}),
    )
    return evaluation, facts


def _refuse_contradicted_sparsity(evaluation: Any, label: str | None) -> None:
    """Raise :class:`LoadError` when the measured L0 contradicts the ``k`` the dictionary records (a loader or
    saving fault: :func:`~pytest_saecheck.validate.check_sparsity`), so that no gate judges it."""
    from pytest_saecheck.validate import check_sparsity

    l0 = getattr(evaluation, "metrics", {}).get("l0")
    dictionary = getattr(evaluation, "dictionary", None)
    if l0 is None or not isinstance(dictionary, Mapping):
        return
    problem = check_sparsity(dictionary, float(l0))
    if problem is not None:
        raise LoadError(
            f"{label or 'the dictionary'} at {dictionary.get('hook_name')}: {problem}. It is refused rather than "
            "scored: its metrics would describe a different SAE from the one that was trained"
        )


def interval_of(evaluation: Any, metric: str, level: float) -> tuple[float, float] | None:
    """The bootstrap interval of ``metric`` at ``level``, or ``None`` when the evaluation has none."""
    try:
        low, high = evaluation.confidence_interval(metric, level)
    except SAECheckError:
        return None
    return float(low), float(high)


__all__: Sequence[str] = (
    "CheckOutcome",
    "SAEUnderTest",
    "Subject",
    "conclude",
    "confidence_level",
    "finite_number",
    "interval_of",
    "is_fixture",
    "number_or_nan",
    "subject_of",
)
