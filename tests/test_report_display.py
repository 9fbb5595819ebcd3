"""What the report and the terminal table show: pytest's verdict, counts, labels, number formats, charts, CLI.

No model runs here: the records are built by hand (``pytest_saecheck.report.sample``), shaped like the plugin's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_saecheck.messages import column_format
from pytest_saecheck.report import charts
from pytest_saecheck.report.__main__ import main
from pytest_saecheck.report.collect import build_document
from pytest_saecheck.report.display import outcome_counts, short_labels
from pytest_saecheck.report.files import dumps
from pytest_saecheck.report.html import baseline_note, render_html
from pytest_saecheck.report.sample import (
    FakeReport,
    ce_assertion,
    evaluation_record,
    sae_test_reports,
    subject,
)
from pytest_saecheck.report.schema import validate
from pytest_saecheck.report.terminal import summary_lines


def xfail_reports(label: str = "demo/variance_only") -> list[FakeReport]:
    """One passing test and one xfail test whose ΔCE gate fails as expected, on one SAE."""
    evaluation = evaluation_record(label, ce_sae=2.3)
    metrics = evaluation["metrics"]
    passing = [
        {"kind": "subject", **subject(label)},
        evaluation,
        ce_assertion(label, metrics["ce_loss_score"]),
    ]
    gate = ce_assertion(label, metrics["delta_ce"], metric="delta_ce", max_value=0.01)
    reports = []
    for name, records, outcome in (
        ("test_r2", passing, "passed"),
        ("test_gate", [*passing[:2], gate], "skipped"),
    ):
        nodeid = f"t.py::{name}"
        call = FakeReport(nodeid, "call", outcome, saecheck_records=records[1:])
        if outcome == "skipped":
            call.wasxfail = "the ΔCE gate fails"  # type: ignore[attr-defined]
        reports += [
            FakeReport(nodeid, "setup", saecheck_records=records[:1]),
            call,
            FakeReport(nodeid, "teardown"),
        ]
    return reports


def test_a_gate_failing_in_an_xfail_test_leaves_the_sae_and_the_banner_green() -> None:
    document = build_document(xfail_reports())
    validate(document)
    [sae] = document["saes"]
    assert sae["status"] == "passed" and sae["outcomes"] == {"passed": 1, "xfailed": 1}
    gate = next(a for a in sae["assertions"] if a["metric"] == "delta_ce")
    assert gate["outcome"] == "failed" and gate["test_outcome"] == "xfailed"
    html = render_html(document)
    assert "failed (xfail)" in html
    assert "Every SAE passed the tests that ran." in html and "failed or errored" not in html
    assert 'badge s-failed">failed' not in html


def test_the_overview_counts_tests_like_the_terminal() -> None:
    reports = xfail_reports()
    document = build_document(reports)
    html = render_html(document)
    row = html[html.index("<tbody>", html.index('id="overview-table"')) :]
    assert "1 passed, 1 xfailed" in row[: row.index("</tr>")]
    assert "1/2 assertions" in row[: row.index("</tr>")]
    assert summary_lines(document)[-1].endswith("1 passed, 1 xfailed")
    assert outcome_counts({"xfailed": 1, "failed": 2}) == "2 failed, 1 xfailed"


@pytest.mark.parametrize(("ce_mean", "word"), [(8.4, "laxer"), (4.0, "stricter")])
def test_the_mean_ablation_baseline_is_described_by_the_numbers(ce_mean: float, word: str) -> None:
    note = baseline_note({"ce_mean": ce_mean, "ce_zero": 6.5})
    assert note is not None and f"this baseline is the {word} one" in note
    assert baseline_note({"ce_zero": 6.5}) is None
    html = render_html(build_document(sae_test_reports("t.py", "demo/x", ce_mean=ce_mean, ce_zero=6.5)))
    assert f"this baseline is the {word} one" in html
    assert "a stricter baseline than zero ablation" not in html


def test_long_paths_are_shortened_in_tables_and_kept_in_the_detail() -> None:
    long = "/very/long/absolute/path/to/the/checkpoints/of/experiment-2024-05-17/run-42"
    reports = sae_test_reports("t.py", long)
    document = build_document(reports)
    html = render_html(document)
    overview = html[
        html.index('id="overview-table"') : html.index("</table>", html.index('id="overview-table"'))
    ]
    assert ">run-42</a>" in overview and f">{long}<" not in overview
    assert f'<dd class="mono">{long}' in html  # the SAE's section keeps the full spec
    lines = summary_lines(document)
    assert lines[-1].startswith("run-42 ") and max(map(len, lines)) < 120
    # two different SAEs that would share a short name keep their full labels
    assert short_labels([("/a/run-42", "/a/run-42", None), ("/b/run-42", "/b/run-42", None)]) == [
        "/a/run-42",
        "/b/run-42",
    ]


def test_one_number_format_per_column() -> None:
    show = column_format([0.001777, 0.99966, 5.19, None])
    cells = [show(value) for value in (0.001777, 0.99966, 5.19, None)]
    assert cells == ["0.001777", "0.999660", "5.190000", "n/a"]
    assert {len(cell.split(".")[1]) for cell in cells[:3]} == {6}
    assert [column_format([3e-5, 0.9])(v) for v in (3e-5, 0.9)] == ["3.000e-05", "9.000e-01"]
    assert column_format([16128, 160])(16128) == "16,128"
    html = render_html(build_document(sae_test_reports("t.py", "demo/x")))
    for table in re.findall(r"<table>.*?</table>", html, flags=re.S):
        for column in zip(
            *[re.findall(r'<td class="num">([^<]*)</td>', row) for row in table.split("<tr>")[2:]],
            strict=False,
        ):
            numbers = [cell for cell in column if re.fullmatch(r"-?\d[\d,]*\.?\d*(e[+-]\d+)?", cell)]
            assert len({"e" in cell for cell in numbers}) <= 1, column  # never fixed and scientific mixed


def test_the_density_histogram_labels_a_narrow_range() -> None:
    narrow = {"log10_edges": [-0.75, -0.5, -0.25, 0.0], "counts": [1, 31, 4], "dead": 0, "n_latents": 36}
    svg = str(charts.density_histogram(narrow))
    labels = re.findall(r'text-anchor="middle" fill="#555">([^<]+)</text>', svg)
    assert [label for label in labels if label[0].isdigit()] == ["0.18", "0.32", "0.56", "1"]
    wide = {"log10_edges": [x / 4 for x in range(-16, 1)], "counts": [1] * 16, "dead": 3, "n_latents": 19}
    assert [edge for _, edge in charts.density_ticks(wide["log10_edges"])] == [-4, -3, -2, -1, 0]


def test_the_delta_ce_line_is_drawn_over_the_kl_line() -> None:
    html = render_html(build_document(sae_test_reports("t.py", "demo/x")))
    chart = html[html.index("ΔCE and KL by token position") :]
    kl = chart.index(f'stroke="{charts.PALETTE["secondary"]}" stroke-width="4"')
    delta = chart.index(f'stroke="{charts.PALETTE["primary"]}" stroke-width="1.8"')
    assert kl < delta  # later in the SVG is on top


def test_the_command_line_help_render_and_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text and "merge shard-*.json" in text
    result = tmp_path / "r.json"
    result.write_text(dumps(build_document(sae_test_reports("t.py", "demo/x"))))
    with pytest.raises(SystemExit) as exit_info:
        main(["render", str(result)])  # without --html it used to echo the JSON
    assert exit_info.value.code == 2 and "--html" in capsys.readouterr().err
    copy = tmp_path / "copy.json"
    copy.write_text(result.read_text())
    for inputs in ([str(result), str(tmp_path / "." / "r.json")], [str(result), str(copy)]):
        assert main(["merge", *inputs, "--json", str(tmp_path / "m.json")]) == 2
        assert "each shard can be merged once" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_a_number_is_never_rounded_onto_the_value_it_is_compared_with() -> None:
    from pytest_saecheck.messages import fmt_significant

    assert fmt_significant(1.002, 3) == "1"  # plain: 3 significant digits
    assert fmt_significant(1.002, 3, apart_from=1.0) == "1.002"
    assert fmt_significant(0.99996, 3, apart_from=1.0) == "0.99996"
    assert fmt_significant(1.0, 3, apart_from=1.0) == "1"
    assert fmt_significant(0.734, 3, apart_from=1.0) == "0.734"
    assert fmt_significant(1 + 1e-12, 3, apart_from=1.0) == "1"  # at most 9 digits
