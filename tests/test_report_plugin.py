"""--saecheck-json and --saecheck-report end to end (pytester, tiny model served by a hook, local SAE files).

The report plugin is loaded with ``-p pytest_saecheck.report.plugin`` (harmless once the core plugin imports it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pytest_saecheck.report.files import load_document
from pytest_saecheck.report.schema import comparable

PLUGIN = ("-p", "pytest_saecheck.report.plugin")
GOOD = 'pytest.mark.saecheck(model="tiny", sae="sae_identity", tokens="tokens.npy", n_tokens=160)'
BAD = 'pytest.mark.saecheck(model="tiny", sae="sae_random", tokens="tokens.npy", n_tokens=160)'

SUITE = f"""
    import pytest
    from pytest_saecheck.assertions import assert_ce_recovery, assert_r2_matches_legacy

    @{GOOD}
    @pytest.mark.xdist_group("sae_identity")  # with --dist loadgroup, one SAE's tests share a worker
    class TestGood:
        def test_ce(self, saecheck):
            assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9)
            assert_ce_recovery(saecheck, metric="delta_ce", max_value=0.01, confidence=0.95)

        def test_r2(self, saecheck):
            assert_r2_matches_legacy(saecheck)

    @{BAD}
    @pytest.mark.xdist_group("sae_random")
    class TestBad:
        def test_ce(self, saecheck):
            assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9)

        def test_r2(self, saecheck):
            assert_r2_matches_legacy(saecheck, tol=100.0)
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(*PLUGIN, *args)


def sae(document: dict, name: str) -> dict:
    [entry] = [entry for entry in document["saes"] if entry["sae"]["spec"] == name]
    return entry


def test_json_and_html_after_failures_and_errors(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        test_suite=SUITE,
        test_broken=f"""
            import pytest

            @pytest.fixture
            def broken():
                raise RuntimeError("fixture broke")

            @{GOOD}
            def test_error(saecheck, broken):
                pass
        """,
        test_collect="import nonexistent_module_xyz",
    )
    result = run(
        tiny_pytester,
        "--continue-on-collection-errors",
        "--saecheck-json",
        "out/result.json",
        "--saecheck-report",
        "out/report.html",
    )
    result.assert_outcomes(passed=3, failed=1, errors=2)
    document = load_document(tiny_pytester.path / "out" / "result.json")
    good, bad = sae(document, "sae_identity"), sae(document, "sae_random")
    assert bad["status"] == "failed" and good["status"] == "error"  # test_error's fixture broke
    assert [(a["metric"], a["outcome"]) for a in bad["assertions"]] == [
        ("kl_div_score", "failed"),
        ("explained_variance", "passed"),
    ]
    assert len(good["assertions"]) == 3 and all(a["outcome"] == "passed" for a in good["assertions"])
    assert good["intervals"]["delta_ce"] is not None and good["metrics"]["explained_variance"] > 0.99
    assert good["tokens"]["n_tokens"] == 150 and good["hook"]["name"] == "blocks.1.hook_resid_pre"
    tests = {test["id"]: test for test in document["tests"]}
    assert tests["test_broken.py::test_error"]["outcome"] == "error"
    assert "fixture broke" in tests["test_broken.py::test_error"]["message"]
    assert tests["test_collect.py"]["outcome"] == "error"
    html = (tiny_pytester.path / "out" / "report.html").read_text(encoding="utf-8")
    assert "sae_random @ tiny" in html and "kl_div_score" in html
    result.stdout.fnmatch_lines(
        ["saecheck: JSON result written to *result.json", "saecheck: HTML report written to *"]
    )
    assert not list((tiny_pytester.path / "out").glob(".*.tmp"))


@pytest.mark.slow  # a subprocess: imports torch, TransformerLens and SAE Lens afresh
def test_interrupted_run_still_writes_a_valid_report(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(
        f"""
        import pytest
        from pytest_saecheck.assertions import assert_ce_recovery

        @{GOOD}
        def test_first(saecheck):
            assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9)

        def test_interrupt():
            raise KeyboardInterrupt

        @{BAD}
        def test_never(saecheck):
            assert_ce_recovery(saecheck, metric="kl_div_score", min_score=0.9)
        """
    )
    (tiny_pytester.path / "result.json").write_text("previous run")
    # in a subprocess: pytester passes an in-process KeyboardInterrupt on to the outer run
    result = tiny_pytester.runpytest_subprocess(
        *PLUGIN, "--saecheck-json", "result.json", "--saecheck-report", "report.html"
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    document = load_document(tiny_pytester.path / "result.json")
    assert document["run"]["interrupted"] is True and document["run"]["complete"] is False
    assert [test["id"] for test in document["tests"]] == [
        "test_interrupted_run_still_writes_a_valid_report.py::test_first"
    ]
    assert [entry["label"] for entry in document["saes"]] == ["sae_identity @ tiny"]
    assert "The run was interrupted" in (tiny_pytester.path / "report.html").read_text(encoding="utf-8")


def test_exitfirst_marks_the_run_incomplete(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile("def test_a():\n    assert False\n\ndef test_b():\n    pass\n")
    run(tiny_pytester, "-x", "--saecheck-json", "r.json")
    document = load_document(tiny_pytester.path / "r.json")
    assert document["run"]["complete"] is False and document["run"]["interrupted"] is False
    assert document["run"]["outcomes"] == {"failed": 1}


def test_no_option_no_file_and_ini_keys(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile("def test_a():\n    pass\n")
    run(tiny_pytester).assert_outcomes(passed=1)
    assert not list(tiny_pytester.path.glob("*.json")) and not list(tiny_pytester.path.glob("*.html"))
    sub = tiny_pytester.mkdir("cfg")
    (sub / "pytest.ini").write_text(
        "[pytest]\nsaecheck_json = results/r.json\nsaecheck_report = results/r.html\n"
    )
    run(tiny_pytester, "-c", str(sub / "pytest.ini"), "--rootdir", str(tiny_pytester.path)).assert_outcomes(
        passed=1
    )
    assert load_document(sub / "results" / "r.json")["run"]["outcomes"] == {"passed": 1}
    assert (sub / "results" / "r.html").is_file()
    # the command line wins over the ini key, relative to where pytest was started
    run(
        tiny_pytester,
        "-c",
        str(sub / "pytest.ini"),
        "--rootdir",
        str(tiny_pytester.path),
        "--saecheck-json",
        "cli.json",
    )
    assert (tiny_pytester.path / "cli.json").is_file()


def test_registering_the_plugin_twice_is_harmless(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makeconftest(
        (tiny_pytester.path / "conftest.py").read_text()
        + '\npytest_plugins = ["pytest_saecheck.report.plugin"]\n'
    )
    tiny_pytester.makepyfile("def test_a():\n    pass\n")
    result = run(tiny_pytester, *PLUGIN, "--saecheck-json", "r.json")
    result.assert_outcomes(passed=1)
    assert len([line for line in result.outlines if "JSON result written" in line]) == 1


def test_extension_hooks(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makeconftest(
        (tiny_pytester.path / "conftest.py").read_text()
        + """
def pytest_saecheck_json_fields(document, config):
    return {"team": {"n_tests": document["run"]["n_tests"]}}

def pytest_saecheck_report_sections(document, config):
    return [{"title": "Release <notes>", "text": "retrained & checked"}]
"""
    )
    tiny_pytester.makepyfile("def test_a():\n    pass\n")
    run(tiny_pytester, "--saecheck-json", "r.json", "--saecheck-report", "r.html").assert_outcomes(passed=1)
    document = load_document(tiny_pytester.path / "r.json")
    assert document["extensions"] == {"team": {"n_tests": 1}}
    assert document["report_sections"] == [
        {"title": "Release <notes>", "text": "retrained & checked", "html": None, "sae": None}
    ]
    html = (tiny_pytester.path / "r.html").read_text(encoding="utf-8")
    assert "Release &lt;notes&gt;" in html and "retrained &amp; checked" in html


def test_a_failing_extension_does_not_cost_the_report(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makeconftest(
        (tiny_pytester.path / "conftest.py").read_text()
        + "\ndef pytest_saecheck_report_sections(document, config):\n    raise ValueError('oops')\n"
    )
    tiny_pytester.makepyfile("def test_a():\n    pass\n")
    result = run(tiny_pytester, "--saecheck-json", "r.json")
    result.stdout.fnmatch_lines(["*pytest_saecheck_report_sections failed: ValueError('oops')*"])
    assert load_document(tiny_pytester.path / "r.json")["run"]["outcomes"] == {"passed": 1}


@pytest.mark.slow  # two xdist workers, each importing torch, TransformerLens and SAE Lens
@pytest.mark.parametrize("workers", ["2"])
def test_xdist_gives_the_serial_document_and_pins_gpus(
    tiny_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    pytest.importorskip("xdist")
    tiny_pytester.makepyfile(
        test_suite=SUITE,
        test_pin="""
            import os

            def test_where(worker_id, tmp_path_factory):
                root = tmp_path_factory.getbasetemp().parent
                (root / f"pin-{worker_id}.txt").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
        """,
    )
    serial = run(tiny_pytester, "--saecheck-json", "serial.json")
    serial.assert_outcomes(passed=4, failed=1)
    monkeypatch.setenv(
        "CUDA_VISIBLE_DEVICES", "5,6"
    )  # two "GPUs": each worker gets one, CUDA is never touched
    parallel = run(tiny_pytester, "-n", workers, "--dist", "loadgroup", "--saecheck-json", "parallel.json")
    parallel.assert_outcomes(passed=4, failed=1)
    one, two = (
        load_document(tiny_pytester.path / "serial.json"),
        load_document(tiny_pytester.path / "parallel.json"),
    )
    assert two["run"]["workers"] == 2
    assert comparable(one) == comparable(two)
    pins = {path.read_text() for path in tiny_pytester.path.parent.rglob("pin-gw*.txt")}
    assert pins <= {"5", "6"} and pins, pins


def test_a_crashed_worker_loses_only_its_unfinished_test(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    tiny_pytester = pytester  # no model needed: plain tests, so the workers start fast
    tiny_pytester.makepyfile(
        test_crash="""
            import os

            def test_crash():
                os._exit(3)
        """,
        test_fine="\n".join(f"def test_{n}():\n    pass\n" for n in range(4)),
    )
    result = run(tiny_pytester, "-n", "2", "--saecheck-json", "r.json")
    document = load_document(tiny_pytester.path / "r.json")
    outcomes = {test["id"]: test["outcome"] for test in document["tests"]}
    assert outcomes.pop("test_crash.py::test_crash") == "failed", result.stdout.str()
    assert outcomes == {f"test_fine.py::test_{n}": "passed" for n in range(4)}
    crash = next(test for test in document["tests"] if test["id"] == "test_crash.py::test_crash")
    assert "crashed" in (crash["message"] or "")
    # every test names its worker, the crash too (xdist may start a replacement worker, gw2, for the rest)
    assert all(re.fullmatch(r"gw\d+", test["worker"]) for test in document["tests"]), document["tests"]
    assert crash["worker"] in result.stdout.str()  # the worker the terminal says crashed
    json.dumps(document)
    assert Path(tiny_pytester.path / "r.json").stat().st_size > 0


def test_a_run_that_executes_no_test_keeps_the_last_report(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile("def test_a():\n    pass\n")
    run(tiny_pytester, "--saecheck-json", "r.json", "--saecheck-report", "r.html").assert_outcomes(passed=1)
    json_before = (tiny_pytester.path / "r.json").read_bytes()
    html_before = (tiny_pytester.path / "r.html").read_bytes()
    for args in (["--collect-only"], ["--co", "-q"], ["-k", "nothing_matches_this"]):
        result = run(tiny_pytester, *args, "--saecheck-json", "r.json", "--saecheck-report", "r.html")
        assert (tiny_pytester.path / "r.json").read_bytes() == json_before, args
        assert (tiny_pytester.path / "r.html").read_bytes() == html_before, args
        assert "written to" not in result.stdout.str()
    result.stdout.fnmatch_lines(["saecheck: no test ran, so *r.json and *r.html was left as it was"])
    # a collection error is a result: it is written
    tiny_pytester.makepyfile(test_broken="import nonexistent_module_xyz")
    run(tiny_pytester, "test_broken.py", "--saecheck-json", "r.json")
    assert load_document(tiny_pytester.path / "r.json")["run"]["outcomes"] == {"error": 1}


def test_xdist_keeps_each_saes_tests_on_one_worker(tiny_pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    tiny_pytester.makepyfile(
        test_spread=f"""
            import os
            import pytest

            def record(worker_id, saecheck):
                with open(f"placed-{{os.getpid()}}-{{os.urandom(4).hex()}}.txt", "w") as out:
                    out.write(f"{{os.path.basename(saecheck.settings.sae)}} {{worker_id}}")

            @{GOOD}
            @pytest.mark.parametrize("n", range(4))
            def test_good(saecheck, worker_id, n):
                record(worker_id, saecheck)

            @{BAD}
            @pytest.mark.parametrize("n", range(4))
            def test_bad(saecheck, worker_id, n):
                record(worker_id, saecheck)

            def test_plain():
                pass
        """
    )
    result = run(
        tiny_pytester, "-n", "2", "--dist", "loadgroup", "--saecheck-json", "r.json"
    )  # no marks needed
    result.assert_outcomes(passed=9)
    workers: dict[str, set[str]] = {}
    for path in tiny_pytester.path.glob("placed-*.txt"):
        sae, worker = path.read_text().split()
        workers.setdefault(sae, set()).add(worker)
    # one worker per SAE; the two share every other setting, so they are one release group, and a run that is one
    # release is cut to balance the workers: both workers busy, each SAE on one of them
    assert {sae: len(used) for sae, used in workers.items()} == {"sae_identity": 1, "sae_random": 1}, workers
    assert len(set.union(*workers.values())) == 2, workers
    # the report names the tests as a serial run does (xdist's @group suffix removed)
    ids = [test["id"] for test in load_document(tiny_pytester.path / "r.json")["tests"]]
    assert "test_spread.py::test_good[0]" in ids and not any("@" in test_id for test_id in ids)
    # an explicit --dist is kept
    explicit = run(tiny_pytester, "-n", "2", "--dist", "load", "-v")
    explicit.assert_outcomes(passed=9)
    assert "@saecheck-" not in explicit.stdout.str()


def test_terminal_json_and_html_show_the_same_rows(tiny_pytester: pytest.Pytester) -> None:
    """One SAE evaluated at two n_tokens: two rows with distinct labels in the terminal, the JSON and the HTML."""
    tiny_pytester.makepyfile(
        """
        import pytest

        BASE = dict(model="tiny", sae="sae_identity", tokens="tokens.npy")

        @pytest.mark.saecheck(**BASE, n_tokens=64)
        def test_small(saecheck):
            assert saecheck.metrics["explained_variance"] > 0.99

        @pytest.mark.saecheck(**BASE, n_tokens=128)
        def test_large(saecheck):
            assert saecheck.metrics["explained_variance"] > 0.99
        """
    )
    result = run(tiny_pytester, "--saecheck-json=out.json", "--saecheck-report=out.html")
    result.assert_outcomes(passed=2)
    labels = ["sae_identity @ tiny (n_tokens=128)", "sae_identity @ tiny (n_tokens=64)"]
    for label in labels:
        result.stdout.fnmatch_lines([f"{label} *tiny*tokens.npy*1 passed"])
    document = load_document(tiny_pytester.path / "out.json")
    assert sorted(entry["tokens"]["requested_n_tokens"] for entry in document["saes"]) == [64, 128]
    html = (tiny_pytester.path / "out.html").read_text(encoding="utf-8")
    for label in labels:
        assert f"</span> {label}</h2>" in html
