"""Reports and baselines never lie about the run: one commit per run, locks, write failures, Ctrl-C,
the errors a report keeps, and HTML from a file shown as text.

pytester runs with the tiny model of ``tests/factories.py``; SIGINT cases run in a subprocess (an in-process
KeyboardInterrupt would reach the outer run).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from factories import make_identity_sae

from pytest_saecheck import files
from pytest_saecheck.files import RunLock, commit_files
from pytest_saecheck.report.__main__ import main as report_main
from pytest_saecheck.report.collect import build_document
from pytest_saecheck.report.files import check_pair, dumps, html_run_id, load_document
from pytest_saecheck.report.markup import sanitise_html
from pytest_saecheck.report.sample import sample_reports

PLUGIN = ("-p", "pytest_saecheck.report.plugin")
GOOD = 'pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="tokens.npy", n_tokens=160)'
PASSING = f"""
    import pytest
    from pytest_saecheck.assertions import assert_ce_recovery

    @{GOOD}
    def test_ce(saecheck):
        assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9)
"""
HOSTILE_HTML = (
    "<style>.banner.bad{display:none}</style>"
    '<meta http-equiv="refresh" content="0; url=https://example.invalid/">'
    '<link rel="stylesheet" href="https://example.invalid/x.css"><base href="https://example.invalid/">'
    '<div class="banner good" style="position:fixed;inset:0">Every SAE passed</div>'
    "<p>release <b>notes</b></p>"
)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(*PLUGIN, *args)


def failing_document() -> dict:
    document = build_document(sample_reports())
    assert any(sae["status"] == "failed" for sae in document["saes"])
    document["report_sections"].append(
        {"title": "Shard notes", "text": None, "html": HOSTILE_HTML, "sae": None}
    )
    return document


# -- item 2: HTML from a file is text; in-process markup is sanitised ---------------------------------


def test_sanitiser_removes_what_restyles_hides_or_redirects() -> None:
    clean = sanitise_html(HOSTILE_HTML + '<a href="javascript:alert(1)">x</a><script>alert(1)</script>')
    for forbidden in (
        "<style",
        "<meta",
        "<link",
        "<base",
        "class=",
        "style=",
        "javascript:",
        "<script",
        "alert",
    ):
        assert forbidden not in clean, (forbidden, clean)
    assert "<p>release <b>notes</b></p>" in clean and "Every SAE passed" in clean  # text kept, as text
    assert sanitise_html(clean) == clean


@pytest.mark.parametrize("command", ["render", "merge"])
def test_sections_from_a_json_file_are_shown_as_text(tmp_path: Path, command: str) -> None:
    source = tmp_path / "shard.json"
    source.write_text(dumps(failing_document()), encoding="utf-8")
    assert report_main([command, str(source), "--html", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<style>.banner.bad" not in html and 'http-equiv="refresh"' not in html
    assert "<link" not in html and "<base" not in html and '<div class="banner good"' not in html
    assert html.count("<style>") == 1  # the report's own
    assert "&lt;style&gt;.banner.bad{display:none}&lt;/style&gt;" in html  # shown, escaped
    assert "shown as text" in html
    assert '<div class="banner bad" id="verdict">' in html


def test_in_process_section_markup_is_sanitised_in_json_and_html(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makeconftest(
        (tiny_pytester.path / "conftest.py").read_text()
        + f"\ndef pytest_saecheck_report_sections(document, config):\n"
        f"    return [{{'title': 'Notes', 'html': {HOSTILE_HTML!r}}}]\n"
    )
    tiny_pytester.makepyfile("def test_a():\n    assert False\n")
    run(tiny_pytester, "--saecheck-json", "r.json", "--saecheck-report", "r.html").assert_outcomes(failed=1)
    [section] = load_document(tiny_pytester.path / "r.json")["report_sections"]
    assert section["html"] == sanitise_html(HOSTILE_HTML)
    html = (tiny_pytester.path / "r.html").read_text(encoding="utf-8")
    assert "<p>release <b>notes</b></p>" in html  # in-process markup stays markup
    assert html.count("<style>") == 1 and 'http-equiv="refresh"' not in html and "<link" not in html


# -- item 17: a failed write is one line; the rest is still written; exit non-zero ----------------------


def record_baselines(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run one regression test of the identity SAE, recording its baseline in ``baselines``."""
    pytester.makepyfile(
        f"""
        from pytest_saecheck import assert_no_regression
        import pytest

        @{GOOD}
        def test_no_regression(saecheck):
            assert_no_regression(saecheck)
        """
    )
    return run(pytester, *args, "--saecheck-baseline-dir", "baselines", "--saecheck-update-baselines=all")


def test_a_report_that_cannot_be_written_costs_nothing_else(tiny_pytester: pytest.Pytester) -> None:
    (tiny_pytester.path / "blocker").write_text("a file where a directory should be")
    result = record_baselines(
        tiny_pytester, "--saecheck-json", "blocker/r.json", "--saecheck-report", "r.html"
    )
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == 1, text
    assert "Traceback" not in text and "OSError" not in text
    assert len([line for line in result.outlines if "JSON result not written" in line]) == 1
    for line in (
        "*saecheck summary*",
        "saecheck: baseline written to *baselines*",
        "saecheck: HTML report written to *r.html",
        "saecheck: JSON result not written: *blocker*",
        "*1 passed*",
    ):
        result.stdout.fnmatch_lines([line])
    assert len(list((tiny_pytester.path / "baselines").glob("*.json"))) == 1
    assert html_run_id((tiny_pytester.path / "r.html").read_text(encoding="utf-8"))


def test_a_baseline_that_cannot_be_written_is_one_line(tiny_pytester: pytest.Pytester) -> None:
    (tiny_pytester.path / "baselines").write_text("a file, not a directory")
    result = record_baselines(tiny_pytester, "--saecheck-json", "r.json")
    assert result.ret == 1 and "Traceback" not in result.stdout.str()
    assert len([line for line in result.outlines if "saecheck: baseline not written:" in line]) == 1
    assert load_document(tiny_pytester.path / "r.json")["run"]["outcomes"] == {"passed": 1}


# -- item 18: the JSON and HTML of a run are one commit, and a live run holds its paths -----------------


def test_json_and_html_carry_one_run_id_and_a_mismatch_is_detected(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile("def test_a():\n    pass\n")
    for name in ("one", "two"):
        run(tiny_pytester, "--saecheck-json", f"{name}.json", "--saecheck-report", f"{name}.html")
    path = tiny_pytester.path
    first = check_pair(path / "one.json", path / "one.html")
    assert (
        first
        == load_document(path / "one.json")["run"]["id"]
        != check_pair(path / "two.json", path / "two.html")
    )
    with pytest.raises(ValueError, match="come from different runs"):
        check_pair(path / "one.json", path / "two.html")
    assert report_main(["check", str(path / "one.json"), str(path / "two.html")]) == 1
    assert report_main(["check", str(path / "one.json"), str(path / "one.html")]) == 0


def test_a_file_whose_temporary_cannot_be_written_replaces_nothing_and_removes_its_stale_twin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    json_path, html_path = tmp_path / "r.json", tmp_path / "r.html"
    json_path.write_text("old json")
    html_path.write_text("old html")
    real = files._temporary_beside

    def full_disk(target: Path, text: str) -> Path:
        if target.suffix == ".html":
            raise OSError(28, "No space left on device", str(target))
        return real(target, text)

    monkeypatch.setattr(files, "_temporary_beside", full_disk)
    written, failed = commit_files([(json_path, "new json"), (html_path, "new html")])
    assert written.error is None and json_path.read_text() == "new json"
    assert failed.error == f"No space left on device: {html_path}" and failed.removed_stale
    assert not html_path.exists()  # no old HTML beside the new JSON
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_signal_during_the_replacements_lands_after_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [tmp_path / "r.json", tmp_path / "r.html"]
    for path in paths:
        path.write_text("old")
    real_replace = os.replace
    calls: list[str] = []

    def replace_then_interrupt(source: str, target: str) -> None:
        real_replace(source, target)
        calls.append(str(target))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the two replacements

    monkeypatch.setattr(files.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        commit_files([(path, "new") for path in paths])
    assert len(calls) == 2 and [path.read_text() for path in paths] == ["new", "new"]


def test_a_second_live_run_on_the_same_report_path_is_refused(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile("def test_a():\n    pass\n")
    (tiny_pytester.path / "r.json").write_text("the other run's")
    other = RunLock(tiny_pytester.path / "r.json")  # what a live run on r.json holds
    assert other.acquire()
    try:
        result = run(tiny_pytester, "--saecheck-json", "r.json", "--saecheck-report", "r.html")
    finally:
        other.release()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*another pytest run (process *) is writing *r.json right now*"])
    assert (tiny_pytester.path / "r.json").read_text() == "the other run's"
    assert not (tiny_pytester.path / "r.html").exists()
    # once it is released (the other run ended, however it ended), the path is free
    run(tiny_pytester, "--saecheck-json", "r.json").assert_outcomes(passed=1)


def test_a_second_live_run_recording_the_same_baselines_is_refused(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile("def test_a():\n    pass\n")
    other = RunLock(tiny_pytester.path / "baselines")
    assert other.acquire()
    try:
        result = run(tiny_pytester, "--saecheck-baseline-dir", "baselines", "--saecheck-update-baselines")
    finally:
        other.release()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*another pytest run (process *) is recording baselines in *baselines*"])


# -- item 19: the report keeps an SAECheckError's own message ------------------------------------------


def test_an_saecheck_error_at_setup_keeps_its_message(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="tokens.npy", n_tokens="no_such_count")
        def test_missing(saecheck):
            pass
        """
    )
    run(tiny_pytester, "--saecheck-json", "r.json", "--saecheck-report", "r.html").assert_outcomes(errors=1)
    [test] = load_document(tiny_pytester.path / "r.json")["tests"]
    assert test["outcome"] == "error"
    assert "ConfigError" in test["message"] and "no_such_count" in test["message"], test["message"]
    assert "traceback entries are hidden" not in test["message"]
    assert "no_such_count" in (tiny_pytester.path / "r.html").read_text(encoding="utf-8")


# -- item 21: Ctrl-C while writing, and an interrupted run beside the last complete report -------------


@pytest.mark.slow  # a subprocess: imports torch, TransformerLens and SAE Lens afresh
def test_ctrl_c_while_the_report_is_written_exits_2_without_a_traceback(
    tiny_pytester: pytest.Pytester,
) -> None:
    tiny_pytester.makeconftest(
        (tiny_pytester.path / "conftest.py").read_text()
        + "\nimport os, signal\n\ndef pytest_saecheck_report_sections(document, config):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n    return []\n"
    )
    tiny_pytester.makepyfile("def test_a():\n    pass\n")
    result = tiny_pytester.runpytest_subprocess(
        *PLUGIN, "--saecheck-json", "r.json", "--saecheck-report", "r.html"
    )
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.INTERRUPTED, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    result.stdout.fnmatch_lines(
        ["saecheck: interrupted while writing the report; it was written in full first"]
    )
    run_id = check_pair(tiny_pytester.path / "r.json", tiny_pytester.path / "r.html")
    assert load_document(tiny_pytester.path / "r.json")["run"]["id"] == run_id


@pytest.mark.slow  # a subprocess, as above
def test_an_interrupted_run_keeps_the_last_complete_report(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(test_suite=PASSING)
    args = ("--saecheck-json", "r.json", "--saecheck-report", "r.html")
    run(tiny_pytester, *args).assert_outcomes(passed=1)
    complete = {name: (tiny_pytester.path / name).read_bytes() for name in ("r.json", "r.html")}
    tiny_pytester.makepyfile(test_zz_interrupt="def test_interrupt():\n    raise KeyboardInterrupt\n")
    result = tiny_pytester.runpytest_subprocess(*PLUGIN, *args)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert {name: (tiny_pytester.path / name).read_bytes() for name in complete} == complete
    result.stdout.fnmatch_lines(
        ["saecheck: the run was interrupted, so its partial results were written beside the last complete*"]
    )
    partial = load_document(tiny_pytester.path / "r.partial.json")
    assert partial["run"]["interrupted"] is True
    assert check_pair(tiny_pytester.path / "r.partial.json", tiny_pytester.path / "r.partial.html")
    json.dumps(partial)


# -- item 15: names derive from what is evaluated, not from where pytest starts ------------------------


def test_test_ids_and_baseline_names_do_not_depend_on_the_starting_directory(
    tiny_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tiny_pytester.path
    (root / "pytest.ini").write_text("[pytest]\nsaecheck_baseline_dir = baselines\n")
    tests = root / "tests"
    make_identity_sae().save_model(tests / "saes" / "sae_l2")
    (tests / "test_release.py").write_text(
        "import pytest\n"
        "from pytest_saecheck import assert_no_regression\n"
        "from pytest_saecheck.plugin.settings import saecheck_param\n\n"
        '@pytest.mark.parametrize("sae", [saecheck_param("saes/sae_l2", model="tiny", tokens="../tokens.npy", '
        "n_tokens=160)])\n"
        "def test_no_regression(saecheck, sae):\n"
        "    assert_no_regression(saecheck)\n"
    )
    recorded = tiny_pytester.runpytest_inprocess("--saecheck-update-baselines=all", "tests")
    recorded.assert_outcomes(passed=1)
    [baseline] = (root / "baselines").glob("*.json")
    ids = {}
    for start in (root, tests):
        monkeypatch.chdir(start)
        collected = tiny_pytester.runpytest_inprocess("--collect-only", "-q", str(tests))
        ids[start] = [line for line in collected.outlines if "::" in line]
        result = tiny_pytester.runpytest_inprocess(str(tests))
        result.assert_outcomes(passed=1)  # the baseline recorded from the root is found
    assert ids[root] == ids[tests] and ids[root] == ["tests/test_release.py::test_no_regression[saes/sae_l2]"]
    assert baseline.name.startswith("saes_sae_l2-")


# -- items 7 and 10: a run whose gates were all skipped is never green ---------------------------------

UNAVAILABLE = """
    import pytest
    from pytest_saecheck.assertions import assert_ce_recovery

    @pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="{tokens}", n_tokens=160)
    def test_impossible_gate(saecheck):
        assert_ce_recovery(saecheck, metric="delta_ce", max_value=1e-12)
"""


@pytest.mark.parametrize("ci", [None, "true"])
def test_a_run_that_checked_no_sae_is_never_green(
    tiny_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if ci is not None:
        monkeypatch.setenv("CI", ci)
    tiny_pytester.makepyfile(UNAVAILABLE.format(tokens="hf:saecheck-nobody/not-cached-anywhere"))
    result = run(tiny_pytester, "--saecheck-report", "r.html")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["saecheck: No SAE was checked: the tests of all 1 SAE were skipped*"])
    assert result.ret == (pytest.ExitCode.TESTS_FAILED if ci else pytest.ExitCode.OK)
    if ci:
        result.stdout.fnmatch_lines(["saecheck: exit status 1: CI is set and a CI run that checked no SAE*"])
    html = (tiny_pytester.path / "r.html").read_text(encoding="utf-8")
    assert '<div class="banner bad" id="verdict">No SAE was checked' in html
    assert "banner good" not in html.split("</header>")[0].split("<header>")[1]


def test_a_misspelt_split_offline_is_a_load_error_not_a_skip(
    tiny_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tiny_pytester.mkdir("localdata")
    (data / "train.jsonl").write_text('{"text": "the cat sat"}\n{"text": "on the mat"}\n')
    tiny_pytester.makepyfile(
        test_split=UNAVAILABLE.format(tokens="hf:./localdata?split=tran"),
        test_config=UNAVAILABLE.format(tokens="hf:./localdata?split=train&name=no_such_config"),
        test_folder=UNAVAILABLE.format(tokens="hf:./no_such_folder?split=train"),
    )
    result = run(tiny_pytester)
    result.assert_outcomes(failed=3)  # the tokens load in the test body: failed, not skipped
    result.stdout.fnmatch_lines(
        [
            "*LoadError: token source 'hf:./localdata?split=train&name=no_such_config' could not be loaded*",
            "*LoadError: token source 'hf:./no_such_folder?split=train' could not be loaded*",
            "*LoadError: token source 'hf:./localdata?split=tran' could not be loaded: *Bad split: tran*",
        ],  # in file order: test_config, test_folder, test_split
        consecutive=False,
    )


# -- item 20: a worker killed after its test finished is one teardown error, not a second run ----------


def test_a_worker_killed_after_its_test_passed_is_one_teardown_error(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_crash="""
            import os
            import pytest

            @pytest.fixture
            def dies_after():
                yield
                os._exit(3)

            def test_killed_in_teardown(dies_after):
                pass
        """,
        test_fine="def test_a():\n    pass\n",
    )
    result = run(pytester, "-n", "2", "--saecheck-json", "r.json")
    result.assert_outcomes(passed=2, errors=1)  # pytest's count for a passed test whose teardown failed
    tests = {test["id"]: test for test in load_document(pytester.path / "r.json")["tests"]}
    killed = tests["test_crash.py::test_killed_in_teardown"]
    assert killed["outcome"] == "error" and tests["test_fine.py::test_a"]["outcome"] == "passed"
    assert "crashed" in killed["message"] and "after the test itself had passed" in killed["message"]
