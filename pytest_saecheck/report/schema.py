"""The JSON document of a saecheck run: its schema, its version, its derived fields and its comparison form.

The document is the canonical result of a run (``--saecheck-json``); the HTML report is rendered from it alone,
and ``python -m pytest_saecheck.report merge`` merges the documents of sharded runs. ``SCHEMA.md`` next to
this module describes every field; :data:`JSON_SCHEMA` is the machine-readable form (JSON Schema 2020-12; an SAE entry's evaluation fields come
from :data:`pytest_saecheck.evaluation_fields.EVALUATION_FIELDS`) and :func:`validate` checks a document against it
with ``jsonschema``.

Versioning: ``schema_version`` is an integer that grows when a field is removed or changes meaning; new optional
fields do not change it. Readers accept documents whose version they know (:data:`SUPPORTED_VERSIONS`).
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_saecheck.defaults import INTERVAL_LEVEL as DEFAULT_INTERVAL_LEVEL
from pytest_saecheck.evaluation_fields import EVALUATION_FIELDS, INTEGER, INTERVAL, NUMBER, STRING

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
    "tests[]": ("duration_s", "worker"),
    "saes[]": ("evaluation_duration_s",),
}

_NUMBER = NUMBER
_INTERVAL = INTERVAL
_STRING_OR_NULL = STRING
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}

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


def _described(description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {**schema, "description": description}


#: The SAE entry's own fields: what names the SAE, and what its tests and assertions add. The evaluation's
#: recorded fields join them at their places (:func:`sae_schema`).
_SAE_OWN: dict[str, Any] = {
    "id": _described(
        "`sae-` + 12 hex digits: a hash of label, model/SAE/token specs, device, dtype and evaluation settings; "
        "stable across runs, workers and shards",
        {"type": "string"},
    ),
    "label": _described(
        'the readable name (`"<sae spec>"` or `"<sae spec> @ <model spec>"`); two entries share it when one '
        "SAE was evaluated with different settings (`id` tells them apart; the terminal table and the HTML report "
        'show them as `"<label> (n_tokens=2048)"`, naming what differs: '
        "`pytest_saecheck.report.display.row_labels`)",
        {"type": "string"},
    ),
    "status": _described(
        "worst over its tests' outcomes, as pytest judged them: a failed assertion in an `xfail` test (or caught "
        "by its test) does not fail the SAE; a non-strict `xpassed` test counts as passed; a failed assertion of a "
        "test that never finished (interrupted run) does",
        {"enum": list(STATUSES)},
    ),
    "evaluated": _described(
        "whether an evaluation ran in this run (false: only skipped/errored tests used it)",
        {"type": "boolean"},
    ),
    "model": _described(
        "the model as given (marker/option) and as loaded",
        {"type": "object", "properties": {"spec": _described("the model spec as given", STRING)}},
    ),
    "sae": _described(
        "the SAE as given; more identity fields when the records carry them",
        {"type": "object", "properties": {"spec": _described("the SAE spec as given", STRING)}},
    ),
    "hook": _described("the hook the SAE reads, and the one it writes", {"type": "object", "properties": {}}),
    "tokens": _described(
        "the tokens evaluated",
        {
            "type": "object",
            "properties": {
                "spec": _described("the token spec as given", STRING),
                "requested_n_tokens": _described("the `n_tokens` setting", INTEGER),
                "context_size": _described("the `context_size` setting (else `seq_len`)", INTEGER),
                "seed": _described("the `seed` setting", INTEGER),
            },
        },
    ),
    "device": _described("the device it was evaluated on", STRING),
    "grouping": _described(
        "the `token_groups` setting the groups come from (`token_class`, `position`, `demo_constructs`, "
        "`module:attribute`)",
        STRING,
    ),
    "tasks": _described(
        "downstream tasks measured by `assert_task_preserved` (the first measurement of each task, in assertion "
        "order): `{name, kind, source, n_prompts, accuracy_orig, accuracy_sae, accuracy_drop, logit_diff_orig, "
        "logit_diff_sae, logit_diff_drop, intervals, interval_level, notes, outcome}`; `kind` is `next_token` or "
        "`multiple_choice`; accuracy is a share in [0, 1]; the logit difference is logit(right) − the largest "
        "wrong logit; `intervals` are paired bootstrap intervals over prompts; `outcome` is the assertion's",
        {
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
    ),
    "baseline": _described(
        "the comparison with the SAE's regression baseline (`assert_no_regression`; null when no test called it): "
        "`path` and `key` of the baseline file, `state` (`compared`; `missing`: no baseline yet; `recording`: this "
        "run records it), `paired` (true: the same tokens, one set of resampled sequences for both sides; false: "
        "`unpaired=True` on other tokens), `level` (e.g. `0.95`), `versions` (library versions the baseline was "
        "recorded with), `comparisons[]` (`{metric, current, baseline, difference, interval, higher_is_better, "
        "tol, status, reason}`: difference = current − baseline in the metric's units, its bootstrap interval at "
        "`level`, status `regressed`, `improved`, `unchanged` or `undefined`), `regressed` and `improved` (metric "
        "names)",
        {
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
    ),
    "assertions": _described("in (test id, call order)", {"type": "array", "items": ASSERTION_SCHEMA}),
    "tests": _described("tests that used this SAE", {"type": "array", "items": {"type": "string"}}),
    "outcomes": _described("`{outcome: count}` over those tests", _COUNTS),
}


def sae_schema() -> dict[str, Any]:
    """The JSON Schema of an SAE entry: its own fields, and every recorded field of the evaluation at its place
    (:data:`~pytest_saecheck.evaluation_fields.EVALUATION_FIELDS`)."""
    properties = copy.deepcopy(_SAE_OWN)
    for recorded in EVALUATION_FIELDS:
        if recorded.path is None:
            continue
        *parents, name = recorded.path
        target = properties
        for parent in parents:
            target = target[parent].setdefault("properties", {})
        target[name] = recorded.documented()
    return {
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
        "properties": properties,
    }


SAE_SCHEMA: dict[str, Any] = sae_schema()

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
                    "worker": {"type": "string"},
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


def _type_text(schema: Mapping[str, Any]) -> str:
    """A schema's type in words (``number or null``, ``[string]``, ``{name: number}``, an enum's values)."""
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return ", ".join("null" if value is None else f"`{value}`" for value in schema["enum"])
    types = schema.get("type", [])
    types = types if isinstance(types, list) else [types]
    words = []
    for name in types:
        if name == "array" and schema.get("maxItems") == 2:
            words.append("[low, high]")
        elif name == "array" and isinstance(schema.get("items"), Mapping) and schema["items"].get("type"):
            words.append(f"[{_type_text(schema['items'])}]")
        elif name == "object" and isinstance(schema.get("additionalProperties"), Mapping):
            words.append(f"{{name: {_type_text(schema['additionalProperties'])}}}")
        else:
            words.append({"integer": "int", "boolean": "bool"}.get(str(name), str(name)))
    return " or ".join(words)


def _rows(properties: Mapping[str, Any], prefix: str = "") -> list[str]:
    rows = []
    for name, schema in properties.items():
        if "description" not in schema:
            continue
        text = str(schema["description"]).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {_type_text(schema)} | {text} |")
        rows += _rows(schema.get("properties", {}), f"{prefix}{name}.")
    return rows


def sae_table() -> str:
    """SCHEMA.md's table of an SAE entry's fields, written from :data:`SAE_SCHEMA` (each described field, nested
    ones as ``parent.child``)."""
    return "\n".join(["| field | type | meaning |", "| --- | --- | --- |", *_rows(SAE_SCHEMA["properties"])])


class SchemaError(ValueError):
    """A document does not follow :data:`JSON_SCHEMA` (the message gives the JSON path)."""


def _finite_number(checker: Any, value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    """A JSON Schema 2020-12 validator of :data:`JSON_SCHEMA` (``jsonschema``), whose numbers are finite: the
    document writes a non-finite number as null."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("number", _finite_number)
    validator = jsonschema.validators.extend(base, type_checker=checker)
    validator.check_schema(JSON_SCHEMA)
    return validator(JSON_SCHEMA)


def validate(document: Any) -> None:
    """Raise :class:`SchemaError` listing every place where ``document`` breaks :data:`JSON_SCHEMA` (checked by
    ``jsonschema``, JSON Schema 2020-12), each with its JSON path."""
    if isinstance(document, dict) and document.get("schema_version") not in SUPPORTED_VERSIONS | {None}:
        raise SchemaError(
            f"schema_version {document.get('schema_version')!r} is not supported by this version of "
            f"pytest-saecheck (supported: {sorted(SUPPORTED_VERSIONS)}); upgrade pytest-saecheck"
        )
    found = sorted(_validator().iter_errors(document), key=lambda error: list(map(str, error.absolute_path)))
    errors = [f"{error.json_path}: {error.message:.200}" for error in found]
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
