"""The JSON and HTML of the main job (`make demo`: ``pytest examples``) are those it wrote before the evaluation's
fields got one definition (``tests/data/main_job``, made at main 0642c93; see :mod:`tests.main_job`).

The fast tests replay the main job's recorded test reports through the report collector and renderer and
compare the document and the page with the files that run wrote, byte for byte. The slow test runs the main job
itself, and compares what its records give, with the reference run's clock, with the same files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from main_job import ROOT, ROOT_MARK, read_capture, reference, replay, run_main_job

from pytest_saecheck.report.files import dumps
from pytest_saecheck.report.html import render_html
from pytest_saecheck.report.schema import validate


@pytest.fixture(scope="module")
def main_job() -> tuple[list[dict[str, Any]], dict[str, Any], str, str]:
    return reference()


def test_the_reference_is_the_main_job(
    main_job: tuple[list[dict[str, Any]], dict[str, Any], str, str],
) -> None:
    lines, document, _, _ = main_job
    validate(document)
    assert document["run"]["outcomes"] == {"passed": 24, "xfailed": 9}
    assert {sae["label"] for sae in document["saes"]} == {"demo/good", "demo/variance_only"}
    assert (
        sum(1 for line in lines for record in line["saecheck_records"] if record["kind"] == "evaluation") >= 6
    )


def test_the_main_jobs_records_give_its_json_unchanged(
    main_job: tuple[list[dict[str, Any]], dict[str, Any], str, str],
) -> None:
    lines, document, text, _ = main_job
    assert dumps(replay(lines, document)) == text


def test_the_main_jobs_records_give_its_html_unchanged(
    main_job: tuple[list[dict[str, Any]], dict[str, Any], str, str],
) -> None:
    lines, document, _, html = main_job
    assert render_html(replay(lines, document), markup_from_hooks=True) == html


def test_a_changed_number_is_seen(main_job: tuple[list[dict[str, Any]], dict[str, Any], str, str]) -> None:
    """The comparison can fail: one metric of one evaluation record changed changes the JSON and the page."""
    lines, document, text, html = main_job
    changed = copy.deepcopy(lines)
    record = next(r for line in changed for r in line["saecheck_records"] if r["kind"] == "evaluation")
    record["metrics"]["delta_ce"] += 0.5
    replayed = replay(changed, document)
    assert dumps(replayed) != text
    assert render_html(replayed, markup_from_hooks=True) != html


def _with_reference_clock(lines: list[dict[str, Any]], reference_lines: list[dict[str, Any]]) -> None:
    """Give ``lines`` (a new run's reports) the reference run's durations: each phase's, and each evaluation's."""
    durations = {(line["nodeid"], line["when"]): line["duration"] for line in reference_lines}
    evaluations = {
        (line["nodeid"], line["when"], index): record.get("duration_s")
        for line in reference_lines
        for index, record in enumerate(line["saecheck_records"])
        if record["kind"] == "evaluation"
    }
    for line in lines:
        line["duration"] = durations[(line["nodeid"], line["when"])]
        for index, record in enumerate(line["saecheck_records"]):
            if record["kind"] == "evaluation":
                record["duration_s"] = evaluations[(line["nodeid"], line["when"], index)]


@pytest.mark.slow  # the main job itself: every example test on the demo, about 1.5 min on a free 2-core CPU
def test_the_main_job_writes_the_reference_json_and_html(
    main_job: tuple[list[dict[str, Any]], dict[str, Any], str, str], tmp_path: Path
) -> None:
    reference_lines, document, text, html = main_job
    result = run_main_job(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = read_capture(tmp_path / "reports.jsonl")
    written = (tmp_path / "result.json").read_text(encoding="utf-8")
    assert dumps(replay(lines, json.loads(written))) == written.replace(str(ROOT), ROOT_MARK)
    _with_reference_clock(lines, reference_lines)
    replayed = replay(lines, document)
    assert dumps(replayed) == text
    assert render_html(replayed, markup_from_hooks=True) == html
