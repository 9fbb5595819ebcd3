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


def _mapping(value: Any) -> dict[str, Any] | None:
    return json_safe(value) if isinstance(value, Mapping) else None


def sae_entry(identity: Mapping[str, Any], record: Record) -> dict[str, Any]:
    """An SAE's document entry from any of its records (numbers only from an :class:`EvaluationRecord`)."""
    subject = record.subject()
    evaluation = record if isinstance(record, EvaluationRecord) else EvaluationRecord()
    evaluated = isinstance(record, EvaluationRecord)
    settings = evaluation.settings if isinstance(evaluation.settings, Mapping) else {}
    metrics: dict[str, float] = {}
    undefined: dict[str, str] = {}
    for name, reason in (evaluation.undefined or {}).items():
        undefined[str(name)] = str(reason)
    for name, value in (evaluation.metrics or {}).items():
        number = finite_or_none(value)
        if number is None:
            undefined.setdefault(str(name), f"not a finite number ({value!r})")
        else:
            metrics[str(name)] = number
    intervals = {}
    for name, value in (evaluation.intervals or {}).items():
        interval = _interval(value)
        if interval is not None:
            intervals[str(name)] = interval
    histogram: Any = evaluation.latent_density_histogram
    if not isinstance(histogram, Mapping):
        histogram = latent_density_histogram(evaluation.latent_density)
    seq_len = int_or_none(evaluation.seq_len)
    dtype = evaluation.model_dtype or subject["dtype"] or settings.get("dtype")
    return {
        "id": _identity_id(identity),
        "label": str(subject["label"] or subject["sae"] or "(unnamed SAE)"),
        "status": "not run",
        "evaluated": evaluated,
        "model": {
            "spec": subject["model"],
            "resolved": str_or_none(evaluation.resolved_model),
            "loading": _mapping(evaluation.model_loading),
        },
        "sae": {"spec": subject["sae"]},
        "hook": {
            "name": str_or_none(evaluation.hook_name),
            "head_index": int_or_none(evaluation.hook_head_index),
            "name_out": str_or_none(evaluation.hook_name_out),
        },
        "dictionary": _mapping(evaluation.dictionary),
        "normalisation": _mapping(evaluation.normalisation),
        "model_hooks": [str(hook) for hook in evaluation.model_hooks or []],
        "warnings": [str(message) for message in evaluation.warnings or []],
        "members": _mapping(evaluation.members),
        "compounding": _mapping(evaluation.compounding),
        "tokens": {
            "spec": subject["tokens"],
            "source": str_or_none(evaluation.resolved_tokens or subject["tokens"]),
            "n_tokens": int_or_none(evaluation.n_tokens),
            "n_sequences": int_or_none(evaluation.n_sequences),
            "seq_len": seq_len,
            "requested_n_tokens": int_or_none(settings.get("n_tokens")),
            "context_size": int_or_none(settings.get("context_size")) or seq_len,
            "seed": int_or_none(settings.get("seed")),
        },
        "token_policy": _mapping(evaluation.token_policy),
        "device": subject["device"],
        "dtype": str_or_none(dtype),
        "sae_dtype": str_or_none(evaluation.sae_dtype),
        "backend": str_or_none(evaluation.backend),
        "batch_size": int_or_none(settings.get("batch_size") or evaluation.batch_size),
        "settings": json_safe(dict(settings)) if settings else None,
        "metrics": dict(sorted(metrics.items())),
        "intervals": dict(sorted(intervals.items())),
        "interval_level": finite_or_none(evaluation.interval_level) if intervals else None,
        "undefined": dict(sorted(undefined.items())),
        "scaling_law": _series(evaluation.scaling_law),
        "compute_law": _mapping(evaluation.compute_law),
        "delta_ce_by_position": _series(evaluation.delta_ce_by_position),
        "delta_ce_by_position_interval": [
            _interval(value) for value in evaluation.delta_ce_by_position_interval
        ]
        if isinstance(evaluation.delta_ce_by_position_interval, list)
        else None,
        "kl_by_position": _series(evaluation.kl_by_position),
        "latent_density_histogram": json_safe(histogram) if histogram else None,
        "evaluation_duration_s": finite_or_none(evaluation.duration_s),
        "grouping": str_or_none(settings.get("token_groups")),
        "groups": group_entries(evaluation.groups),
        "sequential": sequential_entry(evaluation.sequential),
        "tasks": [],
        "baseline": None,
        "assertions": [],
        "tests": [],
        "outcomes": {},
    }


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
        self.tests.setdefault(nodeid, _Test(nodeid)).phases.append(phase)

    def document(
        self,
        *,
        run: Mapping[str, Any] | None = None,
        environment_info: Mapping[str, Any] | None = None,
        created: str | None = None,
    ) -> dict[str, Any]:
        saes: dict[str, dict[str, Any]] = {}  # SAE id -> entry
        coarse_of: dict[str, str] = {}  # SAE id -> id of its coarse identity (label, specs, device, dtype)
        pending: list[tuple[str, dict[str, Any], Record]] = []  # tests that only used an SAE
        tests: list[dict[str, Any]] = []
        unattached: list[dict[str, Any]] = []
        for nodeid in sorted(self.tests):
            phases = sorted(self.tests[nodeid].phases, key=lambda phase: _PHASES.get(phase.when, 3))
            current: dict[str, str] = {}  # label -> SAE id, within this test
            subjects: dict[str, tuple[dict[str, Any], Record]] = {}
            test_saes: set[str] = set()
            index = 0
            for record in (record for phase in phases for record in phase.records):
                label = record.label
                if isinstance(record, _records.SubjectRecord):
                    coarse = _coarse(record)
                    subjects.setdefault(_identity_id(coarse), (coarse, record))
                elif isinstance(record, EvaluationRecord):
                    identity = _fine(record)
                    sae_id = _identity_id(identity)
                    if sae_id not in saes:
                        saes[sae_id] = sae_entry(identity, record)
                        coarse_of[sae_id] = _identity_id(_coarse(record))
                    elif _grown(saes[sae_id], record):  # a sequential run: the numbers of the furthest look
                        kept = ("assertions", "tests", "outcomes", "baseline", "tasks", "status")
                        saes[sae_id].update(
                            {
                                key: value
                                for key, value in sae_entry(identity, record).items()
                                if key not in kept
                            }
                        )
                    current[str(label)] = sae_id
                    test_saes.add(sae_id)
                else:
                    entry = assertion_entry(record, nodeid, index)
                    index += 1
                    if label is None:  # e.g. reported metrics checked without an SAE under test
                        unattached.append(entry)
                        continue
                    found = current.get(str(label))
                    if found is None:  # an assertion on an Evaluation made outside the fixture
                        coarse = _coarse(record)
                        found = _identity_id(coarse)
                        if found not in saes:
                            saes[found] = sae_entry(coarse, record)
                            coarse_of[found] = found
                        current[str(label)] = found
                    sae_id = found
                    saes[sae_id]["assertions"].append(entry)
                    if isinstance(record.baseline, Mapping):
                        saes[sae_id]["baseline"] = merge_baseline(
                            saes[sae_id].get("baseline"), baseline_entry(record.baseline)
                        )
                    test_saes.add(sae_id)
            used = {coarse_of[sae_id] for sae_id in test_saes}
            pending += [(nodeid, *value) for coarse_id, value in subjects.items() if coarse_id not in used]
            outcome = combine_outcomes(phase.outcome for phase in phases if phase.outcome is not None)
            if outcome is None:  # unfinished (interrupted): its records count, it has no result
                continue
            messages = [phase.message for phase in phases if phase.message and phase.outcome is not None]
            tests.append(
                {
                    "id": nodeid,
                    "outcome": outcome,
                    "duration_s": round(sum(phase.duration for phase in phases), 6),
                    "saes": sorted(test_saes),
                    "message": messages[0] if messages else None,
                }
            )
            for sae_id in test_saes:
                saes[sae_id]["tests"].append(nodeid)
        # a test that only used an SAE (no evaluation, no assertion) belongs to that SAE's evaluated entry
        by_id = {test["id"]: test for test in tests}
        for nodeid, coarse, record in pending:
            coarse_id = _identity_id(coarse)
            candidates = sorted(sae_id for sae_id, of in coarse_of.items() if of == coarse_id)
            sae_id = candidates[0] if candidates else coarse_id
            if sae_id not in saes:
                saes[sae_id] = sae_entry(coarse, record)
                coarse_of[sae_id] = coarse_id
            if nodeid in by_id:
                saes[sae_id]["tests"].append(nodeid)
                by_id[nodeid]["saes"].append(sae_id)
        document = {
            "schema": SCHEMA_ID,
            "schema_version": SCHEMA_VERSION,
            "generator": {"name": "pytest-saecheck", "version": package_version("pytest-saecheck")},
            "created": created or now_iso(),
            "run": {
                "id": None,
                "started": None,
                "finished": None,
                "duration_s": None,
                "exit_status": None,
                "interrupted": False,
                "complete": True,
                "workers": None,
                "shards": 1,
                **dict(run or {}),
            },
            "environment": dict(environment_info) if environment_info is not None else environment(),
            "saes": list(saes.values()),
            "tests": tests,
            "unattached_assertions": unattached,
            "extensions": {},
            "report_sections": [],
        }
        return finalise(document)


def build_document(reports: Any, **kwargs: Any) -> dict[str, Any]:
    """The document of an iterable of test reports (or report-like objects); see :meth:`Collector.document`."""
    collector = Collector()
    for report in reports:
        collector.add_report(report)
    return collector.document(**kwargs)
