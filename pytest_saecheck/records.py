"""Results of saecheck assertions and evaluations, carried on pytest's test reports.

Three typed records describe a test's results: :class:`SubjectRecord` (the SAE a test uses, when the ``saecheck``
fixture is made), :class:`EvaluationRecord` (the evaluation's numbers, once per test that reads
``saecheck.evaluation``) and :class:`AssertionRecord` (one ``assert_*`` call). Each has ``to_plain()`` (a ``dict``
of str, int, float, bool, None, lists and dicts, with ``"kind"`` naming the record) and ``from_plain()`` (which
reads such a dict back, a missing field becoming ``None`` and an unknown one kept in ``extra``/``details``).

Each record is appended, in its plain form, to the running test's stash; the plugin moves them onto the report of
the phase that produced them as ``report.saecheck_records``. Plain types survive xdist's report serialisation,
so the controller sees them; the report collector (:mod:`pytest_saecheck.report.collect`) reads them back with
:func:`from_plain`. Imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pytest

from pytest_saecheck import running
from pytest_saecheck.evaluation_fields import BY_NAME

RECORDS_KEY = pytest.StashKey[list[dict[str, Any]]]()
REPORT_ATTRIBUTE = "saecheck_records"
#: The test report attribute holding the message of an SAECheckError the test raised (a plain string, so it
#: rides to the xdist controller): the report stores it, since the traceback it came with may be all hidden.
ERROR_ATTRIBUTE = "saecheck_error"
#: The fields that name what was evaluated; every record carries them.
SUBJECT_FIELDS = ("label", "model", "sae", "tokens", "device", "dtype")


def plain(value: Any) -> Any:
    """``value`` as plain Python types (numbers, strings, lists, dicts); anything else becomes its ``str``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return plain(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number


# ------------------------------------------------------------------------------------------------------------
# the typed records

_R = TypeVar("_R", bound="_Record")


@dataclass(frozen=True)
class _Record:
    """Fields shared by every record: what was evaluated (as the user wrote it), and the record's kind."""

    kind: ClassVar[str] = ""
    #: the name of the field that keeps the fields this version does not know
    _rest: ClassVar[str] = "extra"

    label: str | None = None
    model: str | None = None
    sae: str | None = None
    tokens: str | None = None
    device: str | None = None
    dtype: str | None = None

    def subject(self) -> dict[str, str | None]:
        """The subject fields (:data:`SUBJECT_FIELDS`) as strings or ``None``."""
        return {name: _str_or_none(getattr(self, name)) for name in SUBJECT_FIELDS}

    def to_plain(self) -> dict[str, Any]:
        """The record as plain values: ``{"kind": ..., <field>: ...}``, with unknown fields alongside."""
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != self._rest}
        rest = getattr(self, self._rest)
        return plain({**rest, "kind": self.kind, **known})

    @classmethod
    def from_plain(cls: type[_R], data: Mapping[str, Any]) -> _R:
        """Read a record's plain form back; missing fields are ``None`` (or empty), unknown ones kept aside."""
        names = {f.name for f in dataclasses.fields(cls)} - {cls._rest}
        known = {key: value for key, value in data.items() if key in names}
        rest = {str(key): value for key, value in data.items() if key not in names and key != "kind"}
        arguments: dict[str, Any] = {**known, cls._rest: rest}
        return cls(**arguments)


@dataclass(frozen=True)
class SubjectRecord(_Record):
    """The SAE a test uses, recorded when its ``saecheck`` fixture is made (before anything is loaded)."""

    kind: ClassVar[str] = "subject"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationRecord(_Record):
    """An evaluation's numbers and how they were made: the fields of
    :data:`~pytest_saecheck.evaluation_fields.EVALUATION_FIELDS` (the engine's ``Evaluation.to_dict()`` and what
    the fixture adds: the specs as resolved, the settings, the intervals), read as attributes (``record.metrics``;
    ``None`` when absent).

    ``values`` holds them by name; the plain form is flat (``{"kind": "evaluation", <field>: ..., ...}``).
    """

    kind: ClassVar[str] = "evaluation"
    values: Mapping[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """A recorded field's value (``None`` when the record does not carry it)."""
        if name in BY_NAME:
            return self.__dict__.get("values", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} has no field {name!r}")

    def to_plain(self) -> dict[str, Any]:
        subject = {name: getattr(self, name) for name in SUBJECT_FIELDS}
        return plain({**self.extra, "kind": self.kind, **subject, **self.values})

    @classmethod
    def from_plain(cls, data: Mapping[str, Any]) -> EvaluationRecord:
        subject = {key: data[key] for key in SUBJECT_FIELDS if key in data}
        values = {key: value for key, value in data.items() if key in BY_NAME}
        rest = {
            str(key): value
            for key, value in data.items()
            if key not in BY_NAME and key not in SUBJECT_FIELDS and key != "kind"
        }
        return cls(**subject, values=values, extra=rest)


@dataclass(frozen=True)
class AssertionRecord(_Record):
    """One ``assert_*`` call: its metric, value, interval, thresholds, outcome and message.

    ``passed`` is the assertion's own verdict (its test's outcome is pytest's); ``message`` the failure message
    (``None`` when it passed); ``baseline`` ``assert_no_regression``'s comparison with the SAE's baseline;
    ``details`` every other value the assertion recorded (shown in the report's assertion details).
    """

    kind: ClassVar[str] = "assertion"
    _rest: ClassVar[str] = "details"
    assertion: str | None = None
    metric: str | None = None
    value: float | None = None
    passed: bool | None = None
    message: str | None = None
    interval: list[float] | None = None
    interval_level: float | None = None
    confidence: float | None = None
    min_score: float | None = None
    max_value: float | None = None
    tol: float | None = None
    gate: str | None = None
    n_tokens: int | None = None
    baseline: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)


Record = SubjectRecord | EvaluationRecord | AssertionRecord
RECORD_TYPES: dict[str, type[SubjectRecord] | type[EvaluationRecord] | type[AssertionRecord]] = {
    cls.kind: cls for cls in (SubjectRecord, EvaluationRecord, AssertionRecord)
}


def from_plain(data: Any) -> Record | None:
    """The typed record of a plain one (``data["kind"]`` names its type); ``None`` for anything else."""
    if not isinstance(data, Mapping):
        return None
    cls = RECORD_TYPES.get(str(data.get("kind")))
    return None if cls is None else cls.from_plain(data)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


# ------------------------------------------------------------------------------------------------------------
# carrying records on the running test


def record(entry: Record | Mapping[str, Any], item: pytest.Item | None = None) -> None:
    """Attach ``entry`` to ``item`` (default: the running test, :func:`pytest_saecheck.running.current_item`).
    Outside pytest this does nothing.

    ``entry`` is a typed record or its plain form (a mapping with a known ``"kind"``).

    Raises:
        ValueError: ``entry`` is a mapping whose ``kind`` is not one of :data:`RECORD_TYPES`.
    """
    typed: Record | None
    if isinstance(entry, (SubjectRecord, EvaluationRecord, AssertionRecord)):
        typed = entry
    else:
        typed = from_plain(entry)
        if typed is None:
            raise ValueError(
                f"a saecheck record needs a 'kind' among {', '.join(RECORD_TYPES)}, got {entry.get('kind')!r}"
            )
    target = item if item is not None else running.current_item()
    if target is None:
        return
    target.stash.setdefault(RECORDS_KEY, []).append(typed.to_plain())


def take(item: pytest.Item) -> list[dict[str, Any]]:
    """Remove and return the records ``item`` has gathered since the last call (plain forms)."""
    records = item.stash.get(RECORDS_KEY, [])
    item.stash[RECORDS_KEY] = []
    return records
