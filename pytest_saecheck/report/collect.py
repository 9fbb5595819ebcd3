"""From test reports to the JSON document: the one collector of a run's results.

The saecheck fixtures and assertions append typed records to the running test (:mod:`pytest_saecheck.records`:
``SubjectRecord``, ``EvaluationRecord``, ``AssertionRecord``); the core plugin moves their plain forms onto the
test report as ``report.saecheck_records``, and :class:`Collector` reads them back with
:func:`pytest_saecheck.records.from_plain`.

:class:`Collector` keeps every report's outcome and records as they arrive (in any order, from any xdist
worker) and :meth:`Collector.document` builds the document in a canonical order: tests sorted by node id,
phases in order. The first evaluation record of an SAE in that order supplies its numbers, so a serial run and
an ``-n N`` run choose the same one. Every renderer reads that document: the JSON file, the HTML page and the
terminal table (:mod:`pytest_saecheck.report.terminal`). Records are read defensively: a missing field becomes ``None``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pytest_saecheck import records as _records
from pytest_saecheck.evaluation_fields import EVALUATION_FIELDS
from pytest_saecheck.files import package_version
from pytest_saecheck.messages import finite_or_none
from pytest_saecheck.records import AssertionRecord, EvaluationRecord, Record
from pytest_saecheck.report.schema import (
    SCHEMA_ID,
    SCHEMA_VERSION,
    Outcome,
    combine_outcomes,
    finalise,
    int_or_none,
    json_safe,
    str_or_none,
)

RECORDS_ATTRIBUTE = _records.REPORT_ATTRIBUTE
PACKAGES = (
    "pytest-saecheck",
    "pytest",
    "pytest-xdist",
    "torch",
    "transformer-lens",
    "sae-lens",
    "numpy",
    "jinja2",
)
_PHASES = {"setup": 0, "call": 1, "teardown": 2}
_FINE_SETTINGS = (
    "n_tokens",
    "context_size",
    "batch_size",
    "exclude_bos",
    "exclude_special_tokens",
    "exclude_token_ids",
    "activation_scaler",
    "splice",
    "seed",
    "model_from_pretrained_kwargs",
    "hook_name",
    "token_groups",
)
MESSAGE_LIMIT = 2000
HISTOGRAM_STEP = 0.25  # bins of a quarter decade
HISTOGRAM_FLOOR = -10.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment() -> dict[str, Any]:
    """Python, platform and library versions of this process (read from package metadata; imports nothing)."""
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "devices": [],
        "dtypes": [],
    }


def _identity_id(identity: Mapping[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return "sae-" + digest[:12]


def _coarse(record: Record) -> dict[str, Any]:
    return record.subject()


def _fine(record: EvaluationRecord) -> dict[str, Any]:
    settings = record.settings if isinstance(record.settings, Mapping) else {}
    return {
        **_coarse(record),
        "resolved_sae": str_or_none(record.resolved_sae),
        "resolved_model": str_or_none(record.resolved_model),
        "resolved_tokens": str_or_none(record.resolved_tokens),
        **{key: json_safe(settings.get(key)) for key in _FINE_SETTINGS},
        # the model as loaded: equivalent kwargs ({} and every processing flag off) are one model, one SAE row
        **(
            {"model_from_pretrained_kwargs": json_safe(record.model_loading["kwargs"])}
            if isinstance(record.model_loading, Mapping)
            and isinstance(record.model_loading.get("kwargs"), Mapping)
            else {}
        ),
    }


def latent_density_histogram(density: Any) -> dict[str, Any] | None:
    """Histogram of per-latent firing densities on log10 bins of a quarter decade; zeros counted as dead; with
    SAEBench's density statistics of the exact densities (``saebench``, :func:`~pytest_saecheck.report.saebench.
    density_statistics`)."""
    if not isinstance(density, (list, tuple)) or not density:
        return None
    values = [finite_or_none(value) for value in density]
    if any(value is None for value in values):
        return None
    alive = [value for value in values if value is not None and value > 0]
    dead = len(values) - len(alive)
    if alive:
        lowest = max(HISTOGRAM_FLOOR, math.floor(math.log10(min(alive)) / HISTOGRAM_STEP) * HISTOGRAM_STEP)
    else:
        lowest = -1.0
    n_bins = max(1, round(-lowest / HISTOGRAM_STEP))
    edges = [round(lowest + HISTOGRAM_STEP * number, 6) for number in range(n_bins + 1)]
    counts = [0] * n_bins
    for value in alive:
        position = (math.log10(min(value, 1.0)) - lowest) / HISTOGRAM_STEP
        counts[min(n_bins - 1, max(0, math.floor(position + 1e-9)))] += 1
    from pytest_saecheck.report.saebench import density_statistics

    return {
        "log10_edges": edges,
        "counts": counts,
        "dead": dead,
        "n_latents": len(values),
        "saebench": density_statistics([value for value in values if value is not None]),
    }


def _series(values: Any) -> list[float | None] | None:
    if not isinstance(values, (list, tuple)):
        return None
    return [finite_or_none(value) for value in values]


def _interval(value: Any) -> list[float | None] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    low, high = finite_or_none(value[0]), finite_or_none(value[1])
    return None if low is None and high is None else [low, high]


def group_entries(groups: Any) -> list[dict[str, Any]] | None:
    """An evaluation record's token groups (``name → group``) as the document's list, in the grouping's order."""
    if not isinstance(groups, Mapping) or not groups:
        return None
    out = []
    for name, group in groups.items():
        if not isinstance(group, Mapping):
            continue
        metrics = {
            str(k): v for k, v in (group.get("metrics") or {}).items() if finite_or_none(v) is not None
        }
        intervals = {
            str(k): i for k, v in (group.get("intervals") or {}).items() if (i := _interval(v)) is not None
        }
        out.append(
            {
                "name": str(name),
                "n_tokens": int_or_none(group.get("n_tokens")),
                "n_predictions": int_or_none(group.get("n_predictions")),
                "metrics": dict(sorted(metrics.items())),
                "intervals": dict(sorted(intervals.items())),
                "interval_level": finite_or_none(group.get("interval_level")),
                "undefined": {str(k): str(v) for k, v in sorted((group.get("undefined") or {}).items())},
            }
        )
    return out or None


def coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    """A recorded value read defensively into the form its JSON Schema gives (``schema``, a field's in
    :data:`~pytest_saecheck.evaluation_fields.EVALUATION_FIELDS`): a non-finite number, a wrong type or a malformed
    interval becomes ``None`` (an empty list where the schema allows no null)."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "array" in types:
        if not isinstance(value, (list, tuple)):
            return None if "null" in types else []
        if schema.get("maxItems") == 2:  # an interval [low, high]
            return _interval(value)
        return [coerce(item, schema.get("items", {})) for item in value]
    if "object" in types:
        return json_safe(value) if isinstance(value, Mapping) else None
    if "integer" in types:
        return int_or_none(value)
    if "number" in types:
        return finite_or_none(value)
    if "string" in types:
        return str_or_none(value)
    return json_safe(value)


def _metric_values(evaluation: EvaluationRecord) -> tuple[dict[str, float], dict[str, str]]:
    """The finite metrics and the undefined ones with their reasons (a non-finite value among them)."""
    metrics: dict[str, float] = {}
    undefined = {str(name): str(reason) for name, reason in (evaluation.undefined or {}).items()}
    for name, value in (evaluation.metrics or {}).items():
        number = finite_or_none(value)
        if number is None:
            undefined.setdefault(str(name), f"not a finite number ({value!r})")
        else:
            metrics[str(name)] = number
    return dict(sorted(metrics.items())), dict(sorted(undefined.items()))


def _composed(
    evaluation: EvaluationRecord, subject: Mapping[str, Any], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The document values of the recorded fields that are more than their value coerced: those that combine
    several facts (the settings, the subject) or have an entry form of their own. Keyed by field name."""
    metrics, undefined = _metric_values(evaluation)
    intervals = {
        str(name): interval
        for name, value in (evaluation.intervals or {}).items()
        if (interval := _interval(value)) is not None
    }
    histogram: Any = evaluation.latent_density_histogram
    if not isinstance(histogram, Mapping):
        histogram = latent_density_histogram(evaluation.latent_density)
    return {
        "metrics": metrics,
        "undefined": undefined,
        "intervals": dict(sorted(intervals.items())),
        "interval_level": finite_or_none(evaluation.interval_level) if intervals else None,
        "resolved_tokens": str_or_none(evaluation.resolved_tokens or subject["tokens"]),
        "settings": json_safe(dict(settings)) if settings else None,
        "batch_size": int_or_none(settings.get("batch_size") or evaluation.batch_size),
        "model_dtype": str_or_none(evaluation.model_dtype or subject["dtype"] or settings.get("dtype")),
        "latent_density_histogram": json_safe(histogram) if histogram else None,
        "groups": group_entries(evaluation.groups),
        "sequential": sequential_entry(evaluation.sequential),
    }


def _put(entry: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        entry = entry.setdefault(key, {})
    entry[path[-1]] = value


def sae_entry(identity: Mapping[str, Any], record: Record) -> dict[str, Any]:
    """An SAE's document entry from any of its records (numbers only from an :class:`EvaluationRecord`): what
    names the SAE and its run, then every recorded field of the evaluation at its place, coerced to its schema
    (:data:`~pytest_saecheck.evaluation_fields.EVALUATION_FIELDS`)."""
    subject = record.subject()
    evaluation = record if isinstance(record, EvaluationRecord) else EvaluationRecord()
    settings = evaluation.settings if isinstance(evaluation.settings, Mapping) else {}
    entry: dict[str, Any] = {
        "id": _identity_id(identity),
        "label": str(subject["label"] or subject["sae"] or "(unnamed SAE)"),
        "status": "not run",
        "evaluated": isinstance(record, EvaluationRecord),
        "model": {"spec": subject["model"]},
        "sae": {"spec": subject["sae"]},
        "hook": {},
        "tokens": {
            "spec": subject["tokens"],
            "requested_n_tokens": int_or_none(settings.get("n_tokens")),
            "seed": int_or_none(settings.get("seed")),
        },
        "device": subject["device"],
        "grouping": str_or_none(settings.get("token_groups")),
        "tasks": [],
        "baseline": None,
        "assertions": [],
        "tests": [],
        "outcomes": {},
    }
    composed = _composed(evaluation, subject, settings)
    for recorded in EVALUATION_FIELDS:
        if recorded.path is not None:
            if recorded.name in composed:
                value = composed[recorded.name]
            else:
                value = coerce(getattr(evaluation, recorded.name), recorded.schema)
            _put(entry, recorded.path, value)
    tokens = entry["tokens"]
    tokens["context_size"] = int_or_none(settings.get("context_size")) or tokens["seq_len"]
    return entry


def sequential_entry(summary: Any) -> dict[str, Any] | None:
    """A sequential run's SAE-level entry (``Evaluation.sequential``): the looks and the ceiling (sequences), the
    look reached, the sequences and tokens evaluated so far, and ``gates``: each decided gate's look and rule."""
    if not isinstance(summary, Mapping):
        return None
    return {
        "looks": [int(n) for n in summary.get("looks") or []],
        "ceiling": int_or_none(summary.get("ceiling")),
        "interim_share": finite_or_none(summary.get("interim_share")),
        "look": int_or_none(summary.get("look")),
        "n_sequences": int_or_none(summary.get("n_sequences")),
        "sequences_evaluated": int_or_none(summary.get("sequences_evaluated")),
        "tokens_evaluated": int_or_none(summary.get("tokens_evaluated")),
        "gates": [
            json_safe(dict(gate)) for gate in summary.get("decisions") or [] if isinstance(gate, Mapping)
        ],
    }


def _grown(entry: dict[str, Any], record: EvaluationRecord) -> bool:
    """Whether ``record`` is a later state of the sequential run ``entry`` shows (more sequences, or more gates)."""
    later = sequential_entry(record.sequential)
    shown = entry.get("sequential")
    if later is None or shown is None:
        return False

    def progress(entry: dict[str, Any]) -> tuple[int, int]:
        return entry["sequences_evaluated"] or 0, len(entry["gates"])

    return progress(later) > progress(shown)


def assertion_entry(record: AssertionRecord, test_id: str, index: int) -> dict[str, Any]:
    """An assertion's document entry (``details``: the values it recorded beyond the known fields)."""
    message = record.message
    return {
        "test_id": test_id,
        "index": index,
        "assertion": str(record.assertion or "assertion"),
        "metric": str_or_none(record.metric),
        "value": finite_or_none(record.value),
        "interval": _interval(record.interval),
        "interval_level": finite_or_none(record.interval_level),
        "threshold": {
            "min": finite_or_none(record.min_score),
            "max": finite_or_none(record.max_value),
            "tol": finite_or_none(record.tol),
        },
        "gate": str_or_none(record.gate),
        "outcome": "passed" if record.passed is True else "failed",
        "message": None if message is None else str(message)[:MESSAGE_LIMIT],
        "details": json_safe(
            {
                **record.details,
                **{
                    name: value
                    for name, value in (("confidence", record.confidence), ("n_tokens", record.n_tokens))
                    if value is not None
                },
            }
        ),
    }


def baseline_entry(baseline: Mapping[str, Any]) -> dict[str, Any]:
    """An SAE's comparison with its regression baseline, from an ``assert_no_regression`` record."""
    comparisons = []
    for item in baseline.get("comparisons") or ():
        if not isinstance(item, Mapping):
            continue
        comparisons.append(
            {
                "metric": str(item.get("metric")),
                "current": finite_or_none(item.get("current")),
                "baseline": finite_or_none(item.get("baseline")),
                "difference": finite_or_none(item.get("difference")),
                "interval": _interval(item.get("interval")),
                "higher_is_better": bool(item.get("higher_is_better")),
                "tol": finite_or_none(item.get("tol")),
                "status": str(item.get("status")),
                "reason": str_or_none(item.get("reason")),
            }
        )
    return {
        "path": str_or_none(baseline.get("path")),
        "key": str_or_none(baseline.get("key")),
        "state": str_or_none(baseline.get("state")),
        "paired": baseline.get("paired") if isinstance(baseline.get("paired"), bool) else None,
        "level": finite_or_none(baseline.get("level")),
        "versions": json_safe(baseline.get("versions"))
        if isinstance(baseline.get("versions"), Mapping)
        else None,
        "comparisons": comparisons,
        "regressed": [c["metric"] for c in comparisons if c["status"] == "regressed"],
        "improved": [c["metric"] for c in comparisons if c["status"] == "improved"],
    }


def merge_baseline(first: dict[str, Any] | None, later: dict[str, Any]) -> dict[str, Any]:
    """The SAE's baseline entry over several ``assert_no_regression`` calls: the first comparison of each metric."""
    if first is None:
        return later
    if first.get("state") != "compared":
        return later if later.get("state") == "compared" else first
    seen = {c["metric"] for c in first["comparisons"]}
    first["comparisons"] += [c for c in later.get("comparisons", []) if c["metric"] not in seen]
    first["regressed"] = [c["metric"] for c in first["comparisons"] if c["status"] == "regressed"]
    first["improved"] = [c["metric"] for c in first["comparisons"] if c["status"] == "improved"]
    return first


def _short_message(report: Any) -> str | None:
    own = getattr(report, _records.ERROR_ATTRIBUTE, None)
    if isinstance(own, str):  # an SAECheckError: its own message (its traceback may be all hidden)
        return own[:MESSAGE_LIMIT]
    longrepr = getattr(report, "longrepr", None)
    if longrepr is None:
        return None
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return str(longrepr[2])[:MESSAGE_LIMIT]
    crash = getattr(longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if message is None:
        text = str(longrepr).strip()
        message = text.splitlines()[-1] if text else None
    return None if message is None else str(message)[:MESSAGE_LIMIT]


def phase_outcome(when: str, outcome: str, wasxfail: bool) -> Outcome | None:
    """The outcome one phase of a test contributes (``None``: it decides nothing, e.g. a passed setup).

    ``when`` is the report's phase (``setup``, ``call``, ``teardown``; ``???`` for xdist's report of a crashed
    worker), ``outcome`` pytest's ``passed``/``failed``/``skipped``, ``wasxfail`` whether the test is an xfail.
    A test's outcome is the worst of its phases' (:func:`~pytest_saecheck.report.schema.combine_outcomes`).
    """
    if when == "call":
        if wasxfail:
            return Outcome.XFAILED if outcome == "skipped" else Outcome.XPASSED
        return Outcome(outcome)
    if outcome == "failed":
        return (
            Outcome.ERROR if when in _PHASES else Outcome.FAILED
        )  # '???': xdist's report of a crashed worker
    if outcome == "skipped":
        return Outcome.XFAILED if wasxfail else Outcome.SKIPPED
    return None


@dataclass
class _Phase:
    when: str
    outcome: str | None
    duration: float
    message: str | None
    records: list[Record]


@dataclass
class _Test:
    nodeid: str
    phases: list[_Phase] = field(default_factory=list)
    worker: str | None = None


def _value(outcome: Outcome | None) -> str | None:
    return None if outcome is None else outcome.value


_XDIST_GROUP_SUFFIX = re.compile(r"@[^\[\]@:/]+$")


class Collector:
    """Gathers outcomes and saecheck records from test and collection reports, on the xdist controller.

    ``strip_xdist_group``: under ``--dist loadgroup`` pytest-xdist appends ``@<group>`` to the node id of every
    test marked ``xdist_group``; with this flag the suffix is removed, so the document names tests as a serial
    run does.
    """

    def __init__(self, *, strip_xdist_group: bool = False) -> None:
        self.tests: dict[str, _Test] = {}
        self.strip_xdist_group = strip_xdist_group

    @classmethod
    def for_config(cls, config: Any) -> Collector:
        """The collector of a pytest run: it strips xdist's group suffix under ``--dist loadgroup``."""
        try:
            dist = config.getoption("dist", default=None)
        except ValueError:
            dist = None
        return cls(strip_xdist_group=dist == "loadgroup")

    def add_report(self, report: Any) -> None:
        """Take a ``TestReport`` (any phase) or a failed ``CollectReport``."""
        nodeid = str(getattr(report, "nodeid", "") or "")
        if self.strip_xdist_group:
            nodeid = _XDIST_GROUP_SUFFIX.sub("", nodeid)
        when = getattr(report, "when", None)
        outcome = str(getattr(report, "outcome", "passed"))
        records = [
            typed
            for typed in map(_records.from_plain, getattr(report, RECORDS_ATTRIBUTE, None) or ())
            if typed is not None
        ]
        if when is None or when == "collect":  # a CollectReport: only its failures are test results
            if outcome != "failed":
                return
            phase = _Phase("collect", Outcome.ERROR.value, 0.0, _short_message(report), [])
        else:
            wasxfail = hasattr(report, "wasxfail")
            phase = _Phase(
                str(when),
                _value(phase_outcome(str(when), outcome, wasxfail)),
                finite_or_none(getattr(report, "duration", 0.0)) or 0.0,
                _short_message(report) if outcome != "passed" else None,
                records,
            )
        test = self.tests.setdefault(nodeid, _Test(nodeid))
        test.phases.append(phase)
        # set by pytest-xdist on the reports its workers send; its report of a crashed worker names the node only
        worker = getattr(report, "worker_id", None) or getattr(
            getattr(getattr(report, "node", None), "gateway", None), "id", None
        )
        if isinstance(worker, str):
            test.worker = worker

    def document(
        self,
        *,
        run: Mapping[str, Any] | None = None,
        environment_info: Mapping[str, Any] | None = None,
        created: str | None = None,
    ) -> dict[str, Any]:
        """The run's document: its SAEs, tests and unattached assertions, in canonical order (see the module)."""
        assembly = _Assembly()
        for nodeid in sorted(self.tests):
            test = self.tests[nodeid]
            assembly.add_test(nodeid, sorted(test.phases, key=lambda p: _PHASES.get(p.when, 3)), test.worker)
        assembly.attach_pending()
        document = {
            "schema": SCHEMA_ID,
            "schema_version": SCHEMA_VERSION,
            "generator": {"name": "pytest-saecheck", "version": package_version("pytest-saecheck")},
            "created": created or now_iso(),
            "run": {**_RUN_DEFAULTS, **dict(run or {})},
            "environment": dict(environment_info) if environment_info is not None else environment(),
            "saes": list(assembly.saes.values()),
            "tests": assembly.tests,
            "unattached_assertions": assembly.unattached,
            "extensions": {},
            "report_sections": [],
        }
        return finalise(document)


_RUN_DEFAULTS: dict[str, Any] = {
    "id": None,
    "started": None,
    "finished": None,
    "duration_s": None,
    "exit_status": None,
    "interrupted": False,
    "complete": True,
    "workers": None,
    "shards": 1,
}
#: What a later record of a sequential run leaves as it is in the SAE's entry (the rest shows the furthest look).
_KEPT_WHEN_GROWN = ("assertions", "tests", "outcomes", "baseline", "tasks", "status")


@dataclass
class _Assembly:
    """The document's SAE entries and tests, built from the tests' records in canonical order."""

    saes: dict[str, dict[str, Any]] = field(default_factory=dict)  # SAE id -> entry
    coarse_of: dict[str, str] = field(default_factory=dict)  # SAE id -> id of its coarse identity
    pending: list[tuple[str, dict[str, Any], Record]] = field(
        default_factory=list
    )  # tests that only used an SAE
    tests: list[dict[str, Any]] = field(default_factory=list)
    unattached: list[dict[str, Any]] = field(default_factory=list)

    def add_test(self, nodeid: str, phases: list[_Phase], worker: str | None = None) -> None:
        """One test's records (in phase order) and, when it finished, its result (``worker``: the pytest-xdist
        worker that ran it)."""
        current: dict[str, str] = {}  # label -> SAE id, within this test
        subjects: dict[str, tuple[dict[str, Any], Record]] = {}
        used: set[str] = set()
        index = 0
        for record in (record for phase in phases for record in phase.records):
            if isinstance(record, _records.SubjectRecord):
                coarse = _coarse(record)
                subjects.setdefault(_identity_id(coarse), (coarse, record))
            elif isinstance(record, EvaluationRecord):
                current[str(record.label)] = self._evaluation(record)
                used.add(current[str(record.label)])
            else:
                found = self._assertion(record, assertion_entry(record, nodeid, index), current)
                index += 1
                used.update([found] if found is not None else [])
        coarse_used = {self.coarse_of[sae_id] for sae_id in used}
        self.pending += [
            (nodeid, *value) for coarse_id, value in subjects.items() if coarse_id not in coarse_used
        ]
        self._result(nodeid, phases, used, worker)

    def _entry(self, sae_id: str, identity: Mapping[str, Any], record: Record, coarse_id: str) -> None:
        if sae_id not in self.saes:
            self.saes[sae_id] = sae_entry(identity, record)
            self.coarse_of[sae_id] = coarse_id

    def _evaluation(self, record: EvaluationRecord) -> str:
        """The id of the SAE entry an evaluation record supplies (the first, or a sequential run's furthest)."""
        identity = _fine(record)
        sae_id = _identity_id(identity)
        if sae_id in self.saes and _grown(self.saes[sae_id], record):
            later = sae_entry(identity, record)
            self.saes[sae_id].update(
                {key: value for key, value in later.items() if key not in _KEPT_WHEN_GROWN}
            )
        self._entry(sae_id, identity, record, _identity_id(_coarse(record)))
        return sae_id

    def _assertion(
        self, record: AssertionRecord, entry: dict[str, Any], current: dict[str, str]
    ) -> str | None:
        """Attach an assertion to its SAE's entry (made from the assertion when the test evaluated none); its id."""
        if record.label is None:  # e.g. reported metrics checked without an SAE under test
            self.unattached.append(entry)
            return None
        sae_id = current.get(str(record.label))
        if sae_id is None:  # an assertion on an Evaluation made outside the fixture
            coarse = _coarse(record)
            sae_id = _identity_id(coarse)
            self._entry(sae_id, coarse, record, sae_id)
            current[str(record.label)] = sae_id
        sae = self.saes[sae_id]
        sae["assertions"].append(entry)
        if isinstance(record.baseline, Mapping):
            sae["baseline"] = merge_baseline(sae.get("baseline"), baseline_entry(record.baseline))
        return sae_id

    def _result(self, nodeid: str, phases: list[_Phase], used: set[str], worker: str | None) -> None:
        outcome = combine_outcomes(phase.outcome for phase in phases if phase.outcome is not None)
        if outcome is None:  # unfinished (interrupted): its records count, it has no result
            return
        messages = [phase.message for phase in phases if phase.message and phase.outcome is not None]
        self.tests.append(
            {
                "id": nodeid,
                "outcome": outcome,
                "duration_s": round(sum(phase.duration for phase in phases), 6),
                "saes": sorted(used),
                "message": messages[0] if messages else None,
                **({"worker": worker} if worker is not None else {}),  # only in runs with xdist workers
            }
        )
        for sae_id in used:
            self.saes[sae_id]["tests"].append(nodeid)

    def attach_pending(self) -> None:
        """A test that only used an SAE (no evaluation, no assertion) belongs to that SAE's evaluated entry."""
        by_id = {test["id"]: test for test in self.tests}
        for nodeid, coarse, record in self.pending:
            coarse_id = _identity_id(coarse)
            candidates = sorted(sae_id for sae_id, of in self.coarse_of.items() if of == coarse_id)
            sae_id = candidates[0] if candidates else coarse_id
            self._entry(sae_id, coarse, record, coarse_id)
            if nodeid in by_id:
                self.saes[sae_id]["tests"].append(nodeid)
                by_id[nodeid]["saes"].append(sae_id)


def build_document(reports: Any, **kwargs: Any) -> dict[str, Any]:
    """The document of an iterable of test reports (or report-like objects); see :meth:`Collector.document`."""
    collector = Collector()
    for report in reports:
        collector.add_report(report)
    return collector.document(**kwargs)
