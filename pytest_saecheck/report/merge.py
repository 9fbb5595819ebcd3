"""Merge the result documents of sharded runs into one, as if it had been one run.

CI that shards SAEs (or tests) across machines runs ``pytest ... --saecheck-json shard-K.json`` on each and
then ``python -m pytest_saecheck.report merge shard-*.json --html report.html --json report.json``.

Rules: tests are united by node id (a test present in several shards keeps its worst outcome); SAEs are united
by id, their numbers taken from the first shard (in argument order) that evaluated them, their assertions and
tests united; derived fields are recomputed as for a single run (:func:`~pytest_saecheck.report.schema.finalise`).
The merged run started when the first shard started and finished when the last finished; it is interrupted if
any shard was, complete if every shard was. Extension fields are merged key by key (first shard wins). The
same document given twice is refused.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_saecheck.report.collect import merge_baseline, now_iso
from pytest_saecheck.report.schema import OUTCOMES, SCHEMA_ID, SCHEMA_VERSION, finalise, validate

_NO_TESTS = 5  # pytest.ExitCode.NO_TESTS_COLLECTED


def _exit_status(statuses: list[int | None]) -> int | None:
    known = [status for status in statuses if status is not None]
    if not known:
        return None
    meaningful = [status for status in known if status != _NO_TESTS]
    return max(meaningful) if meaningful else _NO_TESTS


def _merge_sae(target: dict[str, Any], other: Mapping[str, Any]) -> None:
    assertions = {(a["test_id"], a["index"]): a for a in target["assertions"]}
    for assertion in other.get("assertions", []):
        assertions.setdefault((assertion["test_id"], assertion["index"]), copy.deepcopy(assertion))
    tests = set(target["tests"]) | set(other.get("tests", []))
    baseline = target.get("baseline")
    if other.get("baseline"):  # assert_no_regression's comparisons: the first of each metric, as in one run
        baseline = merge_baseline(copy.deepcopy(baseline), copy.deepcopy(dict(other["baseline"])))
    if not target.get("evaluated") and other.get("evaluated"):  # the numbers come from an evaluated shard
        target.clear()
        target.update(copy.deepcopy(dict(other)))
    else:
        # intervals a shard found through its assertions
        for key, value in other.get("intervals", {}).items():
            if key in target.get("metrics", {}):
                target["intervals"].setdefault(key, copy.deepcopy(value))
    target["assertions"] = list(assertions.values())
    target["tests"] = sorted(tests)
    target["baseline"] = baseline


def _machine(environment: Mapping[str, Any]) -> dict[str, Any]:
    """An environment without the fields derived from the SAEs (recomputed after the merge)."""
    return {key: value for key, value in environment.items() if key not in ("devices", "dtypes", "shards")}


def _merge_extensions(target: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if key not in target:
            target[key] = copy.deepcopy(value)
        elif isinstance(target[key], dict) and isinstance(value, Mapping):
            _merge_extensions(target[key], value)


def merge_documents(documents: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One document from the documents of several shards (each validated first).

    Raises:
        ValueError: no document, an invalid one, or the same document twice (a shard given twice would count
            its run twice in ``run.shards`` and hide nothing else, so it is refused rather than ignored).
    """
    documents = list(documents)
    if not documents:
        raise ValueError("nothing to merge: give at least one result document")
    for number, document in enumerate(documents):
        validate(document)
        for earlier in range(number):
            if documents[earlier] == document:
                raise ValueError(
                    f"results {earlier + 1} and {number + 1} are the same document (one shard given twice?): "
                    "each shard can be merged once"
                )
    saes: dict[str, dict[str, Any]] = {}
    tests: dict[str, dict[str, Any]] = {}
    unattached: dict[tuple[str, int], dict[str, Any]] = {}
    extensions: dict[str, Any] = {}
    sections: list[dict[str, Any]] = []
    for document in documents:
        for sae in document["saes"]:
            if sae["id"] in saes:
                _merge_sae(saes[sae["id"]], sae)
            else:
                saes[sae["id"]] = copy.deepcopy(sae)
        for test in document["tests"]:
            known = tests.get(test["id"])
            if known is None:
                tests[test["id"]] = copy.deepcopy(test)
            else:
                known["saes"] = sorted(set(known["saes"]) | set(test["saes"]))
                if OUTCOMES.index(test["outcome"]) < OUTCOMES.index(known["outcome"]):
                    known.update(outcome=test["outcome"], message=test.get("message"))
        for assertion in document.get("unattached_assertions", []):
            unattached.setdefault((assertion["test_id"], assertion["index"]), copy.deepcopy(assertion))
        _merge_extensions(extensions, document.get("extensions", {}))
        for section in document.get("report_sections", []):
            if section not in sections:
                sections.append(copy.deepcopy(section))
    runs = [document["run"] for document in documents]
    started = [run["started"] for run in runs if run.get("started")]
    finished = [run["finished"] for run in runs if run.get("finished")]
    durations = [run["duration_s"] for run in runs if run.get("duration_s") is not None]
    environment = copy.deepcopy(documents[0]["environment"])
    if len({json.dumps(_machine(doc["environment"]), sort_keys=True) for doc in documents}) > 1:
        environment["shards"] = [copy.deepcopy(doc["environment"]) for doc in documents]
    # shards of one CI matrix share a profile; shards run under different ones say so
    profiles = " + ".join(dict.fromkeys(str(run["profile"]) for run in runs if run.get("profile")))
    merged = {
        "schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
        "generator": copy.deepcopy(documents[0].get("generator", {})),
        "created": now_iso(),
        "run": {
            "id": uuid.uuid4().hex,  # the merged files are one commit of their own
            "merged_from": [run.get("id") for run in runs],
            "started": min(started) if started else None,
            "finished": max(finished) if finished else None,
            "duration_s": max(durations) if durations else None,
            "exit_status": _exit_status([run.get("exit_status") for run in runs]),
            "interrupted": any(run.get("interrupted") for run in runs),
            "complete": all(run.get("complete", True) for run in runs),
            "workers": None,
            "shards": sum(run.get("shards", 1) for run in runs),
        },
        "environment": environment,
        "saes": list(saes.values()),
        "tests": list(tests.values()),
        "unattached_assertions": list(unattached.values()),
        "extensions": extensions,
        "report_sections": sections,
    }
    if profiles:
        merged["run"]["profile"] = profiles
    finalise(merged)
    validate(merged)
    return merged
