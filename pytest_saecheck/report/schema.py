"""The JSON document of a saecheck run: its schema, its version, its derived fields and its comparison form.

The document is the canonical result of a run (``--saecheck-json``); the HTML report is rendered from it alone,
and ``python -m pytest_saecheck.report merge`` merges the documents of sharded runs. ``SCHEMA.md`` next to
this module describes every field; :data:`JSON_SCHEMA` is the machine-readable form (JSON Schema 2020-12) and
:func:`validate` checks a document against it without third-party packages.

Versioning: ``schema_version`` is an integer that grows when a field is removed or changes meaning; new optional
fields do not change it. Readers accept documents whose version they know (:data:`SUPPORTED_VERSIONS`).
"""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_saecheck.defaults import INTERVAL_LEVEL as DEFAULT_INTERVAL_LEVEL

SCHEMA_ID = "pytest-saecheck/report"
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})


class Outcome(str, enum.Enum):
    """A test's outcome, as pytest judged it; members in order, worst first.

    ``error``: a setup/teardown failure, a collection error or a crashed worker. The one outcome vocabulary of the
    JSON document, the HTML page and the terminal table.
    """

    FAILED = "failed"
    ERROR = "error"
    XPASSED = "xpassed"
    PASSED = "passed"
    XFAILED = "xfailed"
    SKIPPED = "skipped"


#: Test outcomes (:class:`Outcome` values), worst first.
OUTCOMES: tuple[str, ...] = tuple(outcome.value for outcome in Outcome)
#: An SAE's status, worst first; ``not run``: it has no test with a result (e.g. the run was interrupted).
STATUSES = ("failed", "error", "passed", "skipped", "not run")

#: Fields that differ between equivalent runs (wall-clock times, durations, worker count, shard count).
TIMING_FIELDS = {
    "": ("created",),
    "run": ("id", "merged_from", "started", "finished", "duration_s", "workers", "shards"),
    "tests[]": ("duration_s",),
    "saes[]": ("evaluation_duration_s",),
}

_NUMBER = {"type": ["number", "null"]}
_INTERVAL = {"type": ["array", "null"], "items": _NUMBER, "minItems": 2, "maxItems": 2}
_STRING_OR_NULL = {"type": ["string", "null"]}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
_SERIES = {"type": ["array", "null"], "items": _NUMBER}

ASSERTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["test_id", "index", "assertion", "metric", "value", "interval", "threshold", "outcome"],
    "properties": {
        "test_id": {"type": "string"},
        "index": {"type": "integer", "minimum": 0},
        "assertion": {"type": "string"},
        "metric": _STRING_OR_NULL,
        "value": _NUMBER,
        "interval": _INTERVAL,
        "interval_level": _NUMBER,
        "threshold": {
            "type": "object",
            "properties": {"min": _NUMBER, "max": _NUMBER, "tol": _NUMBER},
        },
        "gate": _STRING_OR_NULL,
        "outcome": {"enum": ["passed", "failed"]},
        "test_outcome": {"enum": [*OUTCOMES, None]},
        "message": _STRING_OR_NULL,
        "details": {"type": "object"},
    },
}

SAE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "id",
        "label",
        "status",
        "evaluated",
        "model",
        "sae",
        "hook",
        "tokens",
        "metrics",
        "intervals",
        "undefined",
        "assertions",
        "tests",
        "outcomes",
    ],
    "properties": {
        "id": {"type": "string"},
        "label": {"type": "string"},
        "status": {"enum": list(STATUSES)},
        "evaluated": {"type": "boolean"},
        "model": {
            "type": "object",
            "properties": {
                "spec": _STRING_OR_NULL,
                "resolved": _STRING_OR_NULL,
                "loading": {
                    "type": ["object", "null"],
                    "properties": {"loader": {"type": "string"}, "kwargs": {"type": "object"}},
                },
            },
        },
        "sae": {"type": "object", "properties": {"spec": _STRING_OR_NULL}},
        "hook": {
            "type": "object",
            "properties": {
                "name": _STRING_OR_NULL,
                "head_index": {"type": ["integer", "null"]},
                "name_out": _STRING_OR_NULL,
            },
        },
        "dictionary": {"type": ["object", "null"]},
        "normalisation": {"type": ["object", "null"]},
        "model_hooks": {"type": "array", "items": {"type": "string"}},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "members": {"type": ["object", "null"]},
        "compounding": {"type": ["object", "null"]},
        "tokens": {
            "type": "object",
            "properties": {
                "spec": _STRING_OR_NULL,
                "source": _STRING_OR_NULL,
                "n_tokens": {"type": ["integer", "null"]},
                "n_sequences": {"type": ["integer", "null"]},
                "seq_len": {"type": ["integer", "null"]},
                "requested_n_tokens": {"type": ["integer", "null"]},
                "context_size": {"type": ["integer", "null"]},
                "seed": {"type": ["integer", "null"]},
            },
        },
        "token_policy": {"type": ["object", "null"]},
        "device": _STRING_OR_NULL,
        "dtype": _STRING_OR_NULL,
        "sae_dtype": _STRING_OR_NULL,
        "backend": _STRING_OR_NULL,
        "batch_size": {"type": ["integer", "null"]},
        "settings": {"type": ["object", "null"]},
        "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
        "intervals": {"type": "object", "additionalProperties": _INTERVAL},
        "interval_level": _NUMBER,
        "undefined": {"type": "object", "additionalProperties": {"type": "string"}},
        "scaling_law": _SERIES,
        "compute_law": {"type": ["object", "null"]},
        "delta_ce_by_position": _SERIES,
        "delta_ce_by_position_interval": {"type": ["array", "null"], "items": _INTERVAL},
        "kl_by_position": _SERIES,
        "latent_density_histogram": {
            "type": ["object", "null"],
            "required": ["log10_edges", "counts", "dead", "n_latents"],
            "properties": {
                "log10_edges": {"type": "array", "items": {"type": "number"}},
                "counts": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "dead": {"type": "integer", "minimum": 0},
                "n_latents": {"type": "integer", "minimum": 0},
            },
        },
        "evaluation_duration_s": _NUMBER,
        "sequential": {
            "type": ["object", "null"],
            "properties": {
                "looks": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "ceiling": {"type": ["integer", "null"]},
                "look": {"type": ["integer", "null"]},
                "sequences_evaluated": {"type": ["integer", "null"]},
                "tokens_evaluated": {"type": ["integer", "null"]},
                "gates": {"type": "array", "items": {"type": "object"}},
            },
        },
        "grouping": _STRING_OR_NULL,
        "groups": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["name", "n_tokens", "n_predictions", "metrics", "intervals", "undefined"],
                "properties": {
                    "name": {"type": "string"},
                    "n_tokens": {"type": ["integer", "null"]},
                    "n_predictions": {"type": ["integer", "null"]},
                    "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
                    "intervals": {"type": "object", "additionalProperties": _INTERVAL},
                    "interval_level": _NUMBER,
                    "undefined": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
        },
        "tasks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "kind", "n_prompts", "accuracy_orig", "accuracy_sae", "accuracy_drop"],
                "properties": {
                    "name": {"type": "string"},
                    "kind": {"enum": ["next_token", "multiple_choice"]},
                    "source": _STRING_OR_NULL,
                    "n_prompts": {"type": "integer", "minimum": 1},
                    "accuracy_orig": _NUMBER,
                    "accuracy_sae": _NUMBER,
                    "accuracy_drop": _NUMBER,
                    "logit_diff_orig": _NUMBER,
                    "logit_diff_sae": _NUMBER,
                    "logit_diff_drop": _NUMBER,
                    "intervals": {"type": "object", "additionalProperties": _INTERVAL},
                    "interval_level": _NUMBER,
                    "outcome": {"enum": ["passed", "failed"]},
                },
            },
        },
        "baseline": {
            "type": ["object", "null"],
            "properties": {
                "path": _STRING_OR_NULL,
                "state": {"enum": ["compared", "missing", "recording", None]},
                "level": _NUMBER,
                "comparisons": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["metric", "current", "baseline", "difference", "interval", "status"],
                        "properties": {
                            "metric": {"type": "string"},
                            "current": _NUMBER,
                            "baseline": _NUMBER,
                            "difference": _NUMBER,
                            "interval": _INTERVAL,
                            "status": {"enum": ["regressed", "improved", "unchanged", "undefined"]},
                        },
                    },
                },
                "regressed": {"type": "array", "items": {"type": "string"}},
                "improved": {"type": "array", "items": {"type": "string"}},
            },
        },
        "assertions": {"type": "array", "items": ASSERTION_SCHEMA},
        "tests": {"type": "array", "items": {"type": "string"}},
        "outcomes": _COUNTS,
    },
}

JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "pytest-saecheck run result",
    "type": "object",
    "required": ["schema", "schema_version", "run", "environment", "saes", "tests"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "schema_version": {"type": "integer", "minimum": 1},
        "generator": {"type": "object"},
        "created": _STRING_OR_NULL,
        "run": {
            "type": "object",
            "required": ["exit_status", "interrupted", "complete", "outcomes", "n_tests"],
            "properties": {
                "id": _STRING_OR_NULL,
                "merged_from": {"type": "array", "items": _STRING_OR_NULL},
                "started": _STRING_OR_NULL,
                "finished": _STRING_OR_NULL,
                "duration_s": _NUMBER,
                "exit_status": {"type": ["integer", "null"]},
                "interrupted": {"type": "boolean"},
                "complete": {"type": "boolean"},
                "workers": {"type": ["integer", "null"]},
                "shards": {"type": "integer", "minimum": 1},
                "profile": _STRING_OR_NULL,
                "n_tests": {"type": "integer", "minimum": 0},
                "outcomes": _COUNTS,
            },
        },
        "environment": {
            "type": "object",
            "properties": {
                "python": _STRING_OR_NULL,
                "platform": _STRING_OR_NULL,
                "packages": {"type": "object", "additionalProperties": _STRING_OR_NULL},
                "devices": {"type": "array", "items": {"type": "string"}},
                "dtypes": {"type": "array", "items": {"type": "string"}},
            },
        },
        "saes": {"type": "array", "items": SAE_SCHEMA},
        "tests": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "outcome", "saes"],
                "properties": {
                    "id": {"type": "string"},
                    "outcome": {"enum": list(OUTCOMES)},
                    "duration_s": _NUMBER,
                    "saes": {"type": "array", "items": {"type": "string"}},
                    "message": _STRING_OR_NULL,
                },
            },
        },
        "unattached_assertions": {"type": "array", "items": ASSERTION_SCHEMA},
        "extensions": {"type": "object"},
        "report_sections": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["title"],
                "properties": {
                    "title": {"type": "string"},
                    "text": _STRING_OR_NULL,
                    "html": _STRING_OR_NULL,
                    "sae": _STRING_OR_NULL,
                },
            },
        },
    },
}


class SchemaError(ValueError):
    """A document does not follow :data:`JSON_SCHEMA` (the message gives the JSON path)."""


_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _check(value: Any, schema: Mapping[str, Any], path: str, errors: list[str]) -> None:
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[name](value) for name in types):
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.80}")
            return
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "minimum" in schema:
        if value < schema["minimum"]:
            errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{path}: missing required field {key!r}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                _check(item, properties[key], f"{path}.{key}", errors)
            elif isinstance(schema.get("additionalProperties"), Mapping):
                _check(item, schema["additionalProperties"], f"{path}.{key}", errors)
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for number, item in enumerate(value):
                _check(item, schema["items"], f"{path}[{number}]", errors)


def validate(document: Any) -> None:
    """Raise :class:`SchemaError` listing every place where ``document`` breaks :data:`JSON_SCHEMA`."""
    if isinstance(document, dict) and document.get("schema_version") not in SUPPORTED_VERSIONS | {None}:
        raise SchemaError(
            f"schema_version {document.get('schema_version')!r} is not supported by this version of "
            f"pytest-saecheck (supported: {sorted(SUPPORTED_VERSIONS)}); upgrade pytest-saecheck"
        )
    errors: list[str] = []
    _check(document, JSON_SCHEMA, "$", errors)
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise SchemaError(f"not a valid saecheck result document:\n  {shown}{more}")


# ---------------------------------------------------------------------------------------------------------
# plain values


def int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def json_safe(value: Any) -> Any:
    """Plain JSON values: non-finite floats become ``None``, tuples become lists, keys become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# derived fields


def combine_outcomes(outcomes: Iterable[str]) -> str | None:
    """The worst of several outcomes (``None`` for none)."""
    ranked = [outcome for outcome in outcomes if outcome in OUTCOMES]
    return min(ranked, key=OUTCOMES.index) if ranked else None


def count(outcomes: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return {name: counts[name] for name in OUTCOMES if name in counts}


def sae_status(sae: Mapping[str, Any], test_outcomes: Mapping[str, str]) -> str:
    """An SAE's status, as pytest judged its tests.

    A failed assertion counts only through its test's outcome: inside an ``xfail`` test (``xfailed``) or caught
    by the test (``passed``) it does not fail the SAE, as it does not fail the run. An assertion of a test that
    never finished (an interrupted run) still fails it. A strict ``xfail`` test that passed is ``failed`` for
    pytest, and so here; a non-strict one (``xpassed``) passes the run, and counts as passed.
    """
    outcomes = [test_outcomes[test] for test in sae.get("tests", ()) if test in test_outcomes]
    unfinished_failure = any(
        a.get("outcome") == "failed" and a.get("test_id") not in test_outcomes
        for a in sae.get("assertions", ())
    )
    if unfinished_failure or "failed" in outcomes:
        return "failed"
    if "error" in outcomes:
        return "error"
    if any(outcome in ("passed", "xfailed", "xpassed") for outcome in outcomes):
        return "passed"
    if "skipped" in outcomes:
        return "skipped"
    return "not run"


#: The level of the intervals shown for every metric (the assertions' display level).


def _intervals_from_assertions(sae: dict[str, Any]) -> None:
    """Fill an SAE's missing metric intervals from its assertions' intervals at the same level.

    An assertion's interval is the evaluation's own bootstrap interval (same sequences, same seed), so it is
    the interval of the metric; this keeps the report useful when an evaluation record carries no intervals.
    """
    level = sae.get("interval_level") or DEFAULT_INTERVAL_LEVEL
    intervals = sae.setdefault("intervals", {})
    for assertion in sae.get("assertions", []):
        metric, interval = assertion.get("metric"), assertion.get("interval")
        if (
            metric in sae.get("metrics", {})
            and metric not in intervals
            and interval is not None
            and assertion.get("interval_level") is not None
            and math.isclose(assertion["interval_level"], level)
        ):
            intervals[metric] = list(interval)
            sae["interval_level"] = level
    sae["intervals"] = dict(sorted(intervals.items()))


def _tasks_from_assertions(sae: dict[str, Any]) -> list[dict[str, Any]]:
    """An SAE's downstream tasks: the first ``assert_task_preserved`` measurement of each task, in canonical
    assertion order (so a merge of shards gives the same list as one run)."""
    tasks: dict[str, dict[str, Any]] = {}
    for assertion in sae.get("assertions", []):
        task = (assertion.get("details") or {}).get("task")
        if assertion.get("assertion") == "assert_task_preserved" and isinstance(task, Mapping):
            tasks.setdefault(
                str(task.get("name")), {**copy.deepcopy(dict(task)), "outcome": assertion["outcome"]}
            )
    return list(tasks.values())


def finalise(document: dict[str, Any]) -> dict[str, Any]:
    """Recompute the derived fields (outcome counts, statuses) and put every list in its canonical order.

    Both a run and a merge end here, so a merge of shards gives the same document as one run over all of them.
    """
    tests = sorted(document.get("tests", []), key=lambda test: test["id"])
    for test in tests:
        test["saes"] = sorted(set(test.get("saes", [])))
    document["tests"] = tests
    outcomes = {test["id"]: test["outcome"] for test in tests}
    for sae in document.get("saes", []):
        sae["tests"] = sorted(set(sae.get("tests", [])))
        sae["assertions"] = sorted(sae.get("assertions", []), key=lambda a: (a["test_id"], a["index"]))
        for assertion in sae["assertions"]:
            assertion["test_outcome"] = outcomes.get(assertion["test_id"])
        _intervals_from_assertions(sae)
        sae["tasks"] = _tasks_from_assertions(sae)
        sae["outcomes"] = count(outcomes[test] for test in sae["tests"] if test in outcomes)
        sae["status"] = sae_status(sae, outcomes)
    document["saes"] = sorted(document.get("saes", []), key=lambda sae: (sae["label"], sae["id"]))
    document["unattached_assertions"] = sorted(
        document.get("unattached_assertions", []), key=lambda a: (a["test_id"], a["index"])
    )
    for assertion in document["unattached_assertions"]:
        assertion["test_outcome"] = outcomes.get(assertion["test_id"])
    environment = document.setdefault("environment", {})
    environment["devices"] = sorted({sae["device"] for sae in document["saes"] if sae.get("device")})
    environment["dtypes"] = sorted({sae["dtype"] for sae in document["saes"] if sae.get("dtype")})
    run = document.setdefault("run", {})
    run["outcomes"] = count(outcomes.values())
    run["n_tests"] = len(tests)
    return document


def comparable(document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` without the fields that differ between equivalent runs (:data:`TIMING_FIELDS`).

    Two runs over the same tests and SAEs (serial or ``-n N``, one run or merged shards) give equal
    ``comparable`` documents. Lists are already in canonical order (see :func:`finalise`).
    """
    copied = copy.deepcopy(dict(document))
    for key in TIMING_FIELDS[""]:
        copied.pop(key, None)
    for key in TIMING_FIELDS["run"]:
        copied.get("run", {}).pop(key, None)
    for test in copied.get("tests", []):
        for key in TIMING_FIELDS["tests[]"]:
            test.pop(key, None)
    for sae in copied.get("saes", []):
        for key in TIMING_FIELDS["saes[]"]:
            sae.pop(key, None)
    return copied
