"""From test reports to the JSON document.

The saecheck fixtures and assertions append plain records (``dict``) to the running test; the core plugin moves
them onto the test report as ``report.saecheck_records`` (see :mod:`pytest_saecheck.records`). Record kinds:

- ``subject``: the SAE a test uses (label, model, sae, tokens, device, dtype), appended when the fixture is made;
- ``evaluation``: the evaluation's numbers, appended by each test that touches ``saecheck.evaluation``;
- ``assertion``: one ``assert_*`` call: metric, value, interval, thresholds, outcome, message.

:class:`Collector` keeps every report's outcome and records as they arrive (in any order, from any xdist
worker) and :meth:`Collector.document` builds the document in a canonical order: tests sorted by node id,
phases in order. The first evaluation record of an SAE in that order supplies its numbers, so a serial run and
an ``-n N`` run choose the same one. Records are read defensively: a missing field becomes ``None``.
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
from importlib import metadata
from typing import Any

from pytest_saecheck.report.schema import (
    SCHEMA_ID,
    SCHEMA_VERSION,
    combine_outcomes,
    finalise,
    finite_or_none,
    int_or_none,
    json_safe,
    str_or_none,
)

RECORDS_ATTRIBUTE = "saecheck_records"
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
_SUBJECT_FIELDS = ("label", "model", "sae", "tokens", "device", "dtype")
_FINE_SETTINGS = (
    "n_tokens",
    "context_size",
    "batch_size",
    "exclude_bos",
    "exclude_special_tokens",
    "exclude_token_ids",
    "activation_scaler",
    "splice",
    "scaling_law",
    "seed",
    "model_from_pretrained_kwargs",
    "hook_name",
)
_ASSERTION_KNOWN = {
    "kind",
    "assertion",
    "metric",
    "value",
    "interval",
    "interval_level",
    "min_score",
    "max_value",
    "tol",
    "gate",
    "passed",
    "message",
    "baseline",  # assert_no_regression's comparison: the SAE entry's ``baseline``
    *_SUBJECT_FIELDS,
}
MESSAGE_LIMIT = 2000
HISTOGRAM_STEP = 0.25  # bins of a quarter decade
HISTOGRAM_FLOOR = -10.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


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


def _coarse(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: str_or_none(record.get(key)) for key in _SUBJECT_FIELDS}


def _fine(record: Mapping[str, Any]) -> dict[str, Any]:
    settings = record.get("settings") if isinstance(record.get("settings"), Mapping) else {}
    return {
        **_coarse(record),
        "resolved_sae": str_or_none(record.get("resolved_sae")),
        "resolved_model": str_or_none(record.get("resolved_model")),
        "resolved_tokens": str_or_none(record.get("resolved_tokens")),
        **{key: json_safe(settings.get(key)) for key in _FINE_SETTINGS},
    }


def latent_density_histogram(density: Any) -> dict[str, Any] | None:
    """Histogram of per-latent firing densities on log10 bins of a quarter decade; zeros counted as dead."""
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
    return {"log10_edges": edges, "counts": counts, "dead": dead, "n_latents": len(values)}


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


def sae_entry(identity: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """An SAE's document entry from its subject or evaluation record (numbers only from an evaluation)."""
    evaluated = record.get("kind") == "evaluation"
    settings = record.get("settings") if isinstance(record.get("settings"), Mapping) else {}
    metrics: dict[str, float] = {}
    undefined: dict[str, str] = {}
    for name, reason in (record.get("undefined") or {}).items() if evaluated else ():
        undefined[str(name)] = str(reason)
    for name, value in (record.get("metrics") or {}).items() if evaluated else ():
        number = finite_or_none(value)
        if number is None:
            undefined.setdefault(str(name), f"not a finite number ({value!r})")
        else:
            metrics[str(name)] = number
    intervals = {}
    for name, value in (record.get("intervals") or {}).items() if evaluated else ():
        interval = _interval(value)
        if interval is not None:
            intervals[str(name)] = interval
    histogram = record.get("latent_density_histogram") if evaluated else None
    if not isinstance(histogram, Mapping):
        histogram = latent_density_histogram(record.get("latent_density")) if evaluated else None
    seq_len = int_or_none(record.get("seq_len"))
    dtype = record.get("model_dtype") or record.get("dtype") or settings.get("dtype")
    return {
        "id": _identity_id(identity),
        "label": str(record.get("label") or record.get("sae") or "(unnamed SAE)"),
        "status": "not run",
        "evaluated": evaluated,
        "model": {
            "spec": str_or_none(record.get("model")),
            "resolved": str_or_none(record.get("resolved_model")),
            "loading": json_safe(record.get("model_loading"))
            if isinstance(record.get("model_loading"), Mapping)
            else None,
        },
        "sae": {"spec": str_or_none(record.get("sae")), **json_safe(record.get("sae_info") or {})},
        "hook": {
            "name": str_or_none(record.get("hook_name")),
            "head_index": int_or_none(record.get("hook_head_index")),
            "name_out": str_or_none(record.get("hook_name_out")),
        },
        "dictionary": json_safe(record.get("dictionary"))
        if isinstance(record.get("dictionary"), Mapping)
        else None,
        "normalisation": json_safe(record.get("normalisation"))
        if isinstance(record.get("normalisation"), Mapping)
        else None,
        "model_hooks": [str(hook) for hook in record.get("model_hooks") or []],
        "warnings": [str(message) for message in record.get("warnings") or []],
        "members": json_safe(record.get("members")) if isinstance(record.get("members"), Mapping) else None,
        "compounding": json_safe(record.get("compounding"))
        if isinstance(record.get("compounding"), Mapping)
        else None,
        "tokens": {
            "spec": str_or_none(record.get("tokens")),
            "source": str_or_none(record.get("resolved_tokens") or record.get("tokens")),
            "n_tokens": int_or_none(record.get("n_tokens")) if evaluated else None,
            "n_sequences": int_or_none(record.get("n_sequences")),
            "seq_len": seq_len,
            "requested_n_tokens": int_or_none(settings.get("n_tokens")),
            "context_size": int_or_none(settings.get("context_size")) or seq_len,
            "seed": int_or_none(settings.get("seed")),
        },
        "token_policy": json_safe(record.get("token_policy"))
        if isinstance(record.get("token_policy"), Mapping)
        else None,
        "device": str_or_none(record.get("device")),
        "dtype": str_or_none(dtype),
        "batch_size": int_or_none(settings.get("batch_size") or record.get("batch_size")),
        "settings": json_safe(dict(settings)) if settings else None,
        "metrics": dict(sorted(metrics.items())),
        "intervals": dict(sorted(intervals.items())),
        "interval_level": finite_or_none(record.get("interval_level")) if intervals else None,
        "undefined": dict(sorted(undefined.items())),
        "scaling_law": _series(record.get("scaling_law")),
        "compute_law": json_safe(record.get("compute_law"))
        if evaluated and isinstance(record.get("compute_law"), Mapping)
        else None,
        "delta_ce_by_position": _series(record.get("delta_ce_by_position")) if evaluated else None,
        "delta_ce_by_position_interval": [
            _interval(value) for value in record["delta_ce_by_position_interval"]
        ]
        if evaluated and isinstance(record.get("delta_ce_by_position_interval"), list)
        else None,
        "kl_by_position": _series(record.get("kl_by_position")) if evaluated else None,
        "latent_density_histogram": json_safe(histogram) if histogram else None,
        "evaluation_duration_s": finite_or_none(record.get("duration_s")) if evaluated else None,
        "grouping": str_or_none(settings.get("token_groups")) if isinstance(settings, Mapping) else None,
        "groups": group_entries(record.get("groups")) if evaluated else None,
        "tasks": [],
        "baseline": None,
        "assertions": [],
        "tests": [],
        "outcomes": {},
    }


def assertion_entry(record: Mapping[str, Any], test_id: str, index: int) -> dict[str, Any]:
    passed = record.get("passed")
    message = record.get("message")
    return {
        "test_id": test_id,
        "index": index,
        "assertion": str(record.get("assertion") or "assertion"),
        "metric": str_or_none(record.get("metric")),
        "value": finite_or_none(record.get("value")),
        "interval": _interval(record.get("interval")),
        "interval_level": finite_or_none(record.get("interval_level")),
        "threshold": {
            "min": finite_or_none(record.get("min_score")),
            "max": finite_or_none(record.get("max_value")),
            "tol": finite_or_none(record.get("tol")),
        },
        "gate": str_or_none(record.get("gate")),
        "outcome": "passed" if passed is True else "failed",
        "message": None if message is None else str(message)[:MESSAGE_LIMIT],
        "details": json_safe({key: value for key, value in record.items() if key not in _ASSERTION_KNOWN}),
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


def _phase_outcome(when: str, outcome: str, wasxfail: bool) -> str | None:
    if when == "call":
        if wasxfail:
            return "xfailed" if outcome == "skipped" else "xpassed"
        return outcome
    if outcome == "failed":
        return "error" if when in _PHASES else "failed"  # '???': xdist's report of a crashed worker
    if outcome == "skipped":
        return "xfailed" if wasxfail else "skipped"
    return None


@dataclass
class _Phase:
    when: str
    outcome: str | None
    duration: float
    message: str | None
    records: list[dict[str, Any]]


@dataclass
class _Test:
    nodeid: str
    phases: list[_Phase] = field(default_factory=list)


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

    def add_report(self, report: Any) -> None:
        """Take a ``TestReport`` (any phase) or a failed ``CollectReport``."""
        nodeid = str(getattr(report, "nodeid", "") or "")
        if self.strip_xdist_group:
            nodeid = _XDIST_GROUP_SUFFIX.sub("", nodeid)
        when = getattr(report, "when", None)
        outcome = str(getattr(report, "outcome", "passed"))
        records = [dict(r) for r in getattr(report, RECORDS_ATTRIBUTE, None) or () if isinstance(r, Mapping)]
        if when is None or when == "collect":  # a CollectReport: only its failures are test results
            if outcome != "failed":
                return
            phase = _Phase("collect", "error", 0.0, _short_message(report), [])
        else:
            wasxfail = hasattr(report, "wasxfail")
            phase = _Phase(
                str(when),
                _phase_outcome(str(when), outcome, wasxfail),
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
        pending: list[tuple[str, dict[str, Any], dict[str, Any]]] = []  # tests that only used an SAE
        tests: list[dict[str, Any]] = []
        unattached: list[dict[str, Any]] = []
        for nodeid in sorted(self.tests):
            phases = sorted(self.tests[nodeid].phases, key=lambda phase: _PHASES.get(phase.when, 3))
            current: dict[str, str] = {}  # label -> SAE id, within this test
            subjects: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
            test_saes: set[str] = set()
            index = 0
            for record in (record for phase in phases for record in phase.records):
                kind, label = record.get("kind"), record.get("label")
                if kind == "subject":
                    coarse = _coarse(record)
                    subjects.setdefault(_identity_id(coarse), (coarse, record))
                elif kind == "evaluation":
                    identity = _fine(record)
                    sae_id = _identity_id(identity)
                    if sae_id not in saes:
                        saes[sae_id] = sae_entry(identity, record)
                        coarse_of[sae_id] = _identity_id(_coarse(record))
                    elif not saes[sae_id].get("groups") and group_entries(record.get("groups")):
                        # the same SAE evaluated again with a token grouping: its groups join the entry
                        saes[sae_id]["groups"] = group_entries(record.get("groups"))
                        saes[sae_id]["grouping"] = str_or_none(
                            (record.get("settings") or {}).get("token_groups")
                        )
                    current[str(label)] = sae_id
                    test_saes.add(sae_id)
                elif kind == "assertion":
                    entry = assertion_entry(record, nodeid, index)
                    index += 1
                    if label is None:  # e.g. reported metrics checked without an SAE under test
                        unattached.append(entry)
                        continue
                    sae_id = current.get(str(label))
                    if sae_id is None:  # an assertion on an Evaluation made outside the fixture
                        coarse = _coarse(record)
                        sae_id = _identity_id(coarse)
                        if sae_id not in saes:
                            saes[sae_id] = sae_entry(coarse, record)
                            coarse_of[sae_id] = sae_id
                        current[str(label)] = sae_id
                    saes[sae_id]["assertions"].append(entry)
                    if isinstance(record.get("baseline"), Mapping):
                        saes[sae_id]["baseline"] = merge_baseline(
                            saes[sae_id].get("baseline"), baseline_entry(record["baseline"])
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
