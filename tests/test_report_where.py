"""The report's "where it hurts" views: token groups, downstream tasks, the per-position band and context mark."""

from __future__ import annotations

import copy
import re

from pytest_saecheck.report import charts
from pytest_saecheck.report.collect import build_document
from pytest_saecheck.report.html import render_html
from pytest_saecheck.report.merge import merge_documents
from pytest_saecheck.report.sample import FakeReport, evaluation_record
from pytest_saecheck.report.schema import comparable, validate


def group(name: str, n: int, delta: float) -> dict:
    return {
        "name": name,
        "n_tokens": n,
        "n_predictions": n - 1,
        "metrics": {"delta_ce": delta, "kl_sae": delta / 2, "explained_variance": 0.9},
        "undefined": {},
        "intervals": {"delta_ce": [delta - 0.01, delta + 0.01]},
        "interval_level": 0.95,
    }


def task_record(label: str, name: str, drop: float, passed: bool) -> dict:
    task = {
        "name": name,
        "kind": "multiple_choice",
        "source": f"demo:{name}",
        "n_prompts": 64,
        "accuracy_orig": 1.0,
        "accuracy_sae": 1.0 - drop,
        "accuracy_drop": drop,
        "logit_diff_orig": 6.0,
        "logit_diff_sae": 5.0,
        "logit_diff_drop": 1.0,
        "intervals": {"accuracy_drop": [0.0, drop + 0.05], "logit_diff_drop": [0.8, 1.2]},
        "interval_level": 0.95,
        "notes": [],
    }
    return {
        "kind": "assertion",
        "assertion": "assert_task_preserved",
        "label": label,
        "metric": "accuracy_drop",
        "value": drop,
        "interval": [0.0, drop + 0.05],
        "interval_level": 0.95,
        "max_value": 0.05,
        "passed": passed,
        "message": None if passed else "assert_task_preserved failed",
        "task": task,
    }


def reports(module: str, label: str, with_groups: bool = True) -> list[FakeReport]:
    evaluation = evaluation_record(
        label,
        groups={"agreement": group("agreement", 400, 0.02), "arithmetic": group("arithmetic", 300, 0.5)}
        if with_groups
        else {},
        delta_ce_by_position_interval=[None] + [[0.0, 0.2]] * 31,
        dictionary={"kind": "sae", "context_size": 16},
        settings={"token_groups": "demo_constructs" if with_groups else None},
    )
    return [
        FakeReport(f"{module}::test_tasks", "setup"),
        FakeReport(
            f"{module}::test_tasks",
            "call",
            "failed",
            saecheck_records=[
                evaluation,
                task_record(label, "copying", 0.3, False),
                task_record(label, "agreement", 0.0, True),
                task_record(label, "copying", 0.0, True),  # a second measurement of a task: the first is kept
            ],
        ),
        FakeReport(f"{module}::test_tasks", "teardown"),
    ]


def test_groups_and_tasks_in_the_document_and_the_page() -> None:
    document = build_document(reports("t.py", "demo/x"))
    validate(document)
    [sae] = document["saes"]
    assert sae["grouping"] == "demo_constructs"
    assert [g["name"] for g in sae["groups"]] == ["agreement", "arithmetic"]
    assert sae["groups"][1]["metrics"]["delta_ce"] == 0.5 and sae["groups"][1]["n_tokens"] == 300
    assert [(t["name"], t["outcome"]) for t in sae["tasks"]] == [
        ("copying", "failed"),
        ("agreement", "passed"),
    ]
    assert sae["delta_ce_by_position_interval"][0] is None
    html = render_html(document)
    table = html[html.index("Where it hurts") : html.index("Downstream tasks")]
    # worst ΔCE first, with each group's share of the added loss (token-weighted)
    assert table.index("arithmetic") < table.index("agreement")
    share = 299 * 0.5 / (299 * 0.5 + 399 * 0.02)
    assert f"{share:.4f}" in table
    tasks = html[html.index("Downstream tasks") :]
    assert "copying" in tasks and "multiple choice" in tasks and "[0.0000, 0.3500]" in tasks
    assert "SAE training context (16)" in html and "ΔCE 95% interval" in html


def test_a_grouped_evaluation_is_its_own_entry_and_shards_merge_the_same() -> None:
    """The token grouping distinguishes two evaluations of one SAE (found by a new user: one row took the groups
    of whichever evaluation had them, and a group assertion landed on a row without that group)."""
    first = reports("a.py", "demo/x", with_groups=False)
    second = reports("b.py", "demo/x")
    whole = build_document(first + second)
    validate(whole)
    by_grouping = {sae["grouping"]: sae for sae in whole["saes"]}
    assert set(by_grouping) == {None, "demo_constructs"}
    assert by_grouping[None]["groups"] is None
    assert [g["name"] for g in by_grouping["demo_constructs"]["groups"]] == ["agreement", "arithmetic"]
    merged = merge_documents([build_document(first), build_document(second)])
    validate(merged)
    assert comparable(merged)["saes"] == comparable(whole)["saes"]


def test_the_position_chart_draws_the_band_and_marks_the_training_context() -> None:
    values = [None, 0.1, 0.2, 0.15, 0.3]
    band = ("ΔCE 95% interval", [None, [0.0, 0.2], [0.1, 0.3], None, [0.2, 0.9]], "#123456")
    svg = str(
        charts.line_chart(
            [("ΔCE", values, "#000")],
            title="t",
            x_label="x",
            y_label="y",
            band=band,
            markers=[(2.5, "SAE training context (3)")],
        )
    )
    assert svg.count("<polygon") == 1  # positions 1-2 as an area; the lone position 4 as a bar
    assert 'stroke="#123456" stroke-opacity="0.35"' in svg
    assert "SAE training context (3)" in svg
    # the band widens the y axis to its upper bound (0.9): a tick at or above it is drawn
    ticks = [float(t) for t in re.findall(r'text-anchor="end" fill="#555">([-0-9.e]+)<', svg)]
    assert max(ticks) >= 0.9
    outside = str(
        charts.line_chart(
            [("ΔCE", values, "#000")], title="t", x_label="x", y_label="y", markers=[(7.5, "beyond")]
        )
    )
    assert "beyond" not in outside


def test_a_document_without_the_new_fields_still_renders() -> None:
    document = build_document(reports("t.py", "demo/x"))
    old = copy.deepcopy(document)
    for sae in old["saes"]:
        for key in ("groups", "grouping", "tasks", "delta_ce_by_position_interval"):
            sae.pop(key)
    validate(old)
    assert "Where it hurts" not in render_html(old)
