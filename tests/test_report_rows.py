"""The terminal table and the report show the same rows: one collector, one label rule.

No model runs here: the records are built by hand (``pytest_saecheck.report.sample``), shaped like the plugin's.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from pytest_saecheck import records
from pytest_saecheck.records import AssertionRecord, EvaluationRecord, SubjectRecord, from_plain
from pytest_saecheck.report.collect import build_document
from pytest_saecheck.report.display import row_labels
from pytest_saecheck.report.html import render_html
from pytest_saecheck.report.sample import FakeReport, ce_assertion, evaluation_record
from pytest_saecheck.report.schema import comparable, validate
from pytest_saecheck.report.terminal import summary_lines

LABEL = "demo/good"


def one_test(nodeid: str, evaluation: dict[str, Any], *, outcome: str = "passed") -> list[FakeReport]:
    """A test's setup, call and teardown reports on ``evaluation``'s SAE, with one CE assertion."""
    label = evaluation["label"]
    fixture = {
        "kind": "subject",
        **{key: evaluation[key] for key in ("label", "model", "sae", "tokens", "device", "dtype")},
    }
    gate = ce_assertion(label, evaluation["metrics"]["ce_loss_score"], min_score=0.5)
    return [
        FakeReport(nodeid, "setup", saecheck_records=[fixture]),
        FakeReport(nodeid, "call", outcome, saecheck_records=[evaluation, gate]),
        FakeReport(nodeid, "teardown"),
    ]


def evaluation(*, ce_sae: float, n_tokens: int = 2048, **changes: Any) -> dict[str, Any]:
    """demo/good's evaluation record with ``n_tokens`` requested and ``changes`` to its settings and subject."""
    record = evaluation_record(LABEL, ce_sae=ce_sae)
    settings = {**record["settings"], "n_tokens": n_tokens}
    for key in ("exclude_bos", "dtype", "tokens"):
        if key in changes:
            settings[key] = changes[key]
    record["settings"] = settings
    record["n_tokens"] = n_tokens - n_tokens // record["seq_len"]
    if "exclude_bos" in changes:
        record["token_policy"] = {**record["token_policy"], "exclude_bos": changes["exclude_bos"]}
    if "dtype" in changes:
        record["dtype"] = record["model_dtype"] = changes["dtype"]
    if "tokens" in changes:
        record["tokens"] = changes["tokens"]
        record["resolved_tokens"] = f"/data/{changes['tokens']}"
    return record


def terminal_rows(document: dict[str, Any]) -> dict[str, list[str]]:
    """The terminal table's rows, ``label -> cells`` (the label is the first cell; cells are 2+ spaces apart)."""
    lines = summary_lines(document)
    assert lines[0].startswith("SAE") and set(lines[1]) <= {"-", " "}
    rows = [line for line in lines[2:] if not line.startswith("saecheck:") and not line.startswith("  ")]
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", row) for row in rows)}


def html_labels(html: str) -> list[str]:
    table = html[
        html.index('id="overview-table"') : html.index("</table>", html.index('id="overview-table"'))
    ]
    return re.findall(r'<a href="#sae-[0-9a-f]+" title="[^"]*">([^<]*)</a>', table)


def test_two_evaluations_of_one_sae_give_the_same_two_rows_in_any_arrival_order() -> None:
    """The divergence case once reported: demo/good at two n_tokens; xdist may deliver either test's reports first."""
    small = one_test("t.py::test_small", evaluation(ce_sae=3.9, n_tokens=2048), outcome="failed")
    large = one_test("t.py::test_large", evaluation(ce_sae=2.4, n_tokens=4096))
    documents = [build_document(small + large), build_document(large + small)]
    interleaved = [small[0], large[0], large[1], small[1], small[2], large[2]]
    documents.append(build_document(interleaved))
    for document in documents:
        validate(document)
    assert comparable(documents[1]) == comparable(documents[0]) == comparable(documents[2])
    tables = [summary_lines(document) for document in documents]
    assert tables[0] == tables[1] == tables[2]

    document = documents[0]
    rows = terminal_rows(document)
    assert sorted(rows) == [f"{LABEL} (n_tokens=2048)", f"{LABEL} (n_tokens=4096)"]
    # each row shows its own evaluation's numbers and its own test's outcome
    by_requested = {sae["tokens"]["requested_n_tokens"]: sae for sae in document["saes"]}
    for n_tokens, ce_sae, tests in ((2048, 3.9, "1 failed"), (4096, 2.4, "1 passed")):
        cells = rows[f"{LABEL} (n_tokens={n_tokens})"]
        sae = by_requested[n_tokens]
        assert sae["metrics"]["ce_sae"] == ce_sae
        assert cells[3] == str(sae["tokens"]["n_tokens"])
        assert cells[-1] == tests
    # the HTML shows the same rows, under the same labels
    assert sorted(html_labels(render_html(document))) == sorted(rows)
    assert row_labels(document["saes"]) == [summary_lines(document)[2 + i].split("  ")[0] for i in range(2)]


def test_a_new_users_three_evaluations_of_one_sae_are_three_distinct_rows() -> None:
    """One SAE in bf16, with exclude_bos=False and on another token file: three rows, three labels."""
    reports = [
        *one_test("t.py::test_bf16", evaluation(ce_sae=2.5, dtype="bfloat16")),
        *one_test("t.py::test_bos", evaluation(ce_sae=2.6, exclude_bos=False), outcome="failed"),
        *one_test("t.py::test_other_tokens", evaluation(ce_sae=2.7, tokens="other.npy")),
    ]
    document = build_document(reports)
    validate(document)
    rows = terminal_rows(document)
    assert len(document["saes"]) == len(rows) == 3
    labels = sorted(rows)
    assert len(set(labels)) == 3 and all(label.startswith(f"{LABEL} (") for label in labels)
    assert any("dtype=bfloat16" in label for label in labels)
    assert any("exclude_bos=false" in label for label in labels)
    assert any("tokens=other.npy" in label for label in labels)
    # no row mixes one run's numbers with every run's test counts
    assert sorted(cells[-1] for cells in rows.values()) == ["1 failed", "1 passed", "1 passed"]
    html = render_html(document)
    assert sorted(html_labels(html)) == labels
    for label in labels:  # each SAE's section is headed by its own label
        assert html.count(f"</span> {label}</h2>") == 1


def test_the_label_rule_names_what_differs_and_falls_back_to_the_id() -> None:
    base = build_document(one_test("t.py::test_a", evaluation(ce_sae=2.5)))["saes"][0]
    twin = {**base, "id": "sae-000000000001", "settings": {**base["settings"], "splice": "joint"}}
    assert row_labels([base, twin]) == [f"{LABEL} (splice=none)", f"{LABEL} (splice=joint)"]
    same = {**base, "id": "sae-000000000002"}
    assert row_labels([base, same]) == [f"{LABEL} [{base['id']}]", f"{LABEL} [sae-000000000002]"]
    assert row_labels([base]) == [LABEL]


def test_records_are_typed_and_round_trip_through_their_plain_form() -> None:
    fixture = SubjectRecord(label=LABEL, sae=LABEL, device="cpu")
    assert fixture.to_plain()["kind"] == "subject" and from_plain(fixture.to_plain()) == fixture
    plain = evaluation(ce_sae=2.5)
    typed = from_plain(plain)
    assert (
        isinstance(typed, EvaluationRecord) and typed.metrics is not None and typed.metrics["ce_sae"] == 2.5
    )
    assert from_plain(typed.to_plain()) == typed
    gate = ce_assertion(LABEL, 0.9, min_score=0.5)
    assertion = from_plain({**gate, "rtol": 1e-3})
    assert isinstance(assertion, AssertionRecord) and assertion.details == {"rtol": 1e-3}
    assert assertion.to_plain()["rtol"] == 1e-3 and assertion.min_score == 0.5
    assert from_plain({"kind": "unknown"}) is None and from_plain("text") is None


def test_subject_and_assertions_of_the_terminal_come_from_the_document() -> None:
    """An assertion on an Evaluation made outside the fixture is an SAE of the document, and so a row."""
    record = AssertionRecord(
        assertion="assert_ce_recovery", label="SAE at blocks.0.hook_resid_pre", passed=True
    )
    reports = [FakeReport("t.py::test_bare", "call", saecheck_records=[record.to_plain()])]
    document = build_document(reports)
    assert [sae["label"] for sae in document["saes"]] == list(terminal_rows(document))


def test_a_record_of_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="'kind' among subject, evaluation, assertion"):
        records.record({"kind": "evalution", "label": LABEL})
