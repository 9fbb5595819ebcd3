"""The numbers in pytest's own channels: a ``saecheck`` report section, JUnit XML properties, pytest-html extras.

End to end with pytester (tiny model served by a hook, local SAE files); each channel's numbers are checked
against the run's JSON document, the canonical result.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from pytest_saecheck import records
from pytest_saecheck.messages import fmt
from pytest_saecheck.report import channels
from pytest_saecheck.report.files import load_document
from pytest_saecheck.report.terminal import HEADLINE

GOOD = 'pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="tokens.npy", n_tokens=160)'
BAD = 'pytest.mark.saecheck(model="tiny", sae="sae_random", tokens="tokens.npy", n_tokens=160)'
SUITE = f"""
    import pytest
    from pytest_saecheck import assert_ce_recovery

    @{GOOD}
    def test_good(saecheck):
        assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9, confidence=0.95)

    @{BAD}
    def test_bad(saecheck):
        assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9)
"""
PREFIX = "saecheck.assert_ce_recovery.kl_div_score"


def assertion_of(document: dict[str, Any], test_id: str) -> dict[str, Any]:
    [found] = [a for sae in document["saes"] for a in sae["assertions"] if a["test_id"].endswith(test_id)]
    return found


def sae_of(document: dict[str, Any], spec: str) -> dict[str, Any]:
    [found] = [sae for sae in document["saes"] if sae["sae"]["spec"] == spec]
    return found


def junit(path: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """(test name -> its properties, the testsuite's properties) of a JUnit XML file."""
    root = ET.parse(path).getroot()
    cases = {
        case.attrib["name"]: {p.attrib["name"]: p.attrib["value"] for p in case.iter("property")}
        for case in root.iter("testcase")
    }
    suite = root.find("testsuite")
    assert suite is not None
    own = suite.find("properties")
    globals_ = {} if own is None else {p.attrib["name"]: p.attrib["value"] for p in own.iter("property")}
    return cases, globals_


def call_report(reprec: Any, name: str) -> Any:
    [found] = [
        report
        for report in reprec.getreports("pytest_runtest_logreport")
        if report.when == "call" and report.nodeid.endswith(name)
    ]
    return found


def test_junit_xml_and_report_sections_carry_the_gate_numbers(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(test_gates=SUITE)
    reprec = tiny_pytester.inline_run("--junitxml", "j.xml", "--saecheck-json", "r.json")
    reprec.assertoutcome(passed=1, failed=1)
    document = load_document(tiny_pytester.path / "r.json")
    cases, suite = junit(tiny_pytester.path / "j.xml")

    good, bad = assertion_of(document, "test_good"), assertion_of(document, "test_bad")
    assert cases["test_good"][PREFIX] == repr(good["value"])
    assert cases["test_good"][f"{PREFIX}.passed"] == "true"
    assert cases["test_good"][f"{PREFIX}.min_score"] == "0.9"
    assert cases["test_good"][f"{PREFIX}.interval"] == ",".join(repr(b) for b in good["interval"])
    assert (
        cases["test_bad"][PREFIX] == repr(bad["value"]) and cases["test_bad"][f"{PREFIX}.passed"] == "false"
    )
    # the evaluation's headline numbers, as in the JSON
    identity = sae_of(document, "sae_identity")
    assert cases["test_good"]["saecheck.sae"] == "sae_identity"
    headline = {name for name, _ in HEADLINE}
    expected = {
        name: value for name, value in identity["metrics"].items() if name in headline and value is not None
    }
    shown = {
        name: float(value)
        for key, value in cases["test_good"].items()
        if (name := key.removeprefix("saecheck.")) in headline
    }
    assert shown == expected and {"delta_ce", "kl_div_score", "explained_variance", "l0"} <= set(shown)
    assert float(cases["test_good"]["saecheck.n_tokens"]) == identity["tokens"]["n_tokens"]
    # run-wide facts: testsuite properties
    assert suite["saecheck.version.pytest-saecheck"]
    assert suite["saecheck.device"] == "auto"

    # the report section: pytest shows it under the failure
    [(_, text)] = [s for s in call_report(reprec, "test_bad").sections if s[0] == channels.SECTION_TITLE]
    assert f"kl_div_score = {fmt(bad['value'])}" in text and "min 0.9000: failed" in text
    assert text.startswith("sae_random @ tiny on 150 tokens: delta_ce ")
    [(_, good_text)] = [s for s in call_report(reprec, "test_good").sections if s[0] == "saecheck"]
    low, high = good["interval"]
    assert f"[{fmt(low)}, {fmt(high)}] (95%)" in good_text and good_text.endswith(": passed")
    assert getattr(call_report(reprec, "test_good"), "extras", []) == []  # no --html in this run


def test_the_section_is_shown_under_a_failure(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(test_gates=SUITE)
    result = tiny_pytester.runpytest_inprocess("-k", "test_bad")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*- saecheck -*", "sae_random @ tiny on * tokens: *", "assert_ce_recovery kl_div_score = *"]
    )


def test_pytest_html_gets_the_numbers_as_extras(tiny_pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_html")
    tiny_pytester.makepyfile(test_gates=SUITE)
    reprec = tiny_pytester.inline_run("--html", "h.html", "--saecheck-json", "r.json")
    reprec.assertoutcome(passed=1, failed=1)
    bad = assertion_of(load_document(tiny_pytester.path / "r.json"), "test_bad")
    [extra] = call_report(reprec, "test_bad").extras
    assert extra["format_type"] == "html"
    assert f"kl_div_score = {fmt(bad['value'])}" in extra["content"]
    assert "<script" not in extra["content"]
    page = (tiny_pytester.path / "h.html").read_text(encoding="utf-8")
    assert "assert_ce_recovery kl_div_score" in page


@pytest.mark.slow  # two xdist workers, each importing torch, TransformerLens and SAE Lens
def test_junit_properties_and_sections_under_xdist(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(test_gates=SUITE)
    result = tiny_pytester.runpytest_inprocess("-n", "2", "--junitxml", "j.xml", "--saecheck-json", "r.json")
    result.assert_outcomes(passed=1, failed=1)
    document = load_document(tiny_pytester.path / "r.json")
    cases, suite = junit(tiny_pytester.path / "j.xml")
    assert cases["test_bad"][PREFIX] == repr(assertion_of(document, "test_bad")["value"])
    assert cases["test_good"][f"{PREFIX}.passed"] == "true"
    assert "saecheck.version.pytest-saecheck" in suite
    result.stdout.fnmatch_lines(["*- saecheck -*", "assert_ce_recovery kl_div_score = *: failed"])


# --------------------------------------------------------------------------------------------------------
# the renderers, on records


def _assertion(**fields: Any) -> dict[str, Any]:
    base = {"assertion": "assert_ce_recovery", "metric": "delta_ce", "label": "x", "passed": True}
    return records.AssertionRecord.from_plain({**base, **fields}).to_plain()


def test_undefined_values_are_left_out_of_the_properties() -> None:
    found = dict(channels.junit_properties([_assertion(value=float("nan"), interval=[float("nan"), 1.0])]))
    assert found == {"saecheck.assert_ce_recovery.delta_ce.passed": "true"}
    text = channels.section_text([_assertion(value=float("nan"), max_value=0.1)])
    assert text == "assert_ce_recovery delta_ce = —, max 0.1000: passed"


def test_nothing_to_show_is_no_section() -> None:
    subject = records.SubjectRecord(label="x", sae="s").to_plain()
    assert channels.section_text([subject]) is None and channels.junit_properties([subject]) == []
    assert channels.html_extra([]) is None


def test_the_html_extra_is_escaped() -> None:
    table = channels.html_extra([_assertion(assertion="<script>alert(1)</script>", value=0.5)])
    assert table is not None and "<script>" not in table and "&lt;script&gt;" in table
