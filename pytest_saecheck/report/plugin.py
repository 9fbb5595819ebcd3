"""pytest plugin: ``--saecheck-json PATH`` and ``--saecheck-report PATH``, safe under pytest-xdist.

- Options ``--saecheck-json PATH`` / ``--saecheck-report PATH`` and ini keys ``saecheck_json`` /
  ``saecheck_report`` (a relative ini path is relative to the ini file's directory).
- Results travel on the test reports as plain values (``report.saecheck_records``), so under xdist they reach
  the controller with the reports. Only the controller collects them and writes the files, once, at
  ``pytest_sessionfinish``: also when tests fail or error, and when the run is interrupted (the document then
  says ``"interrupted": true``). Each file is written atomically (temporary file + ``os.replace``). A run that
  executes no test (``--collect-only``, ``-k`` matching nothing) writes nothing, so the last report stays.
- Extension hooks: :mod:`pytest_saecheck.report.hookspecs`.

The core plugin imports this module from its ``pytest_addhooks``; ``-p pytest_saecheck.report.plugin`` also
works, and registering it twice is harmless (pytest registers a module once per name; the writer object is
registered once per run). Imports no torch, and no jinja2 until a report is rendered.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pytest_saecheck.files import option_path
from pytest_saecheck.report import hookspecs

WRITER_NAME = "saecheck-report-writer"
_HOOK_NAMES = ("pytest_saecheck_json_fields", "pytest_saecheck_report_sections")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    caller = getattr(pluginmanager.hook, _HOOK_NAMES[0], None)
    if caller is None or not caller.has_spec():
        pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("saecheck", "sparse autoencoder acceptance tests (pytest-saecheck)")
    group.addoption(
        "--saecheck-json",
        dest="saecheck_json",
        metavar="PATH",
        default=None,
        help="write the run's result (every SAE, metric, interval and assertion) as JSON to PATH",
    )
    group.addoption(
        "--saecheck-report",
        dest="saecheck_report",
        metavar="PATH",
        default=None,
        help="write a self-contained HTML report of every SAE checked to PATH",
    )
    parser.addini(
        "saecheck_json", help="default for --saecheck-json (relative to the ini file)", default=None
    )
    parser.addini(
        "saecheck_report", help="default for --saecheck-report (relative to the ini file)", default=None
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller writes the files
        return
    json_path, html_path = option_path(config, "saecheck_json"), option_path(config, "saecheck_report")
    if json_path is None and html_path is None:
        return
    if not config.pluginmanager.has_plugin(WRITER_NAME):
        config.pluginmanager.register(ReportWriter(config, json_path, html_path), WRITER_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    writer = config.pluginmanager.get_plugin(WRITER_NAME)
    if writer is not None:
        config.pluginmanager.unregister(writer, WRITER_NAME)


def _workers(config: pytest.Config) -> int | None:
    try:
        value = config.getoption("numprocesses", default=None)
    except ValueError:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value or None
    tx = getattr(config.option, "tx", None)
    return len(tx) if isinstance(tx, list) and tx else None


class ReportWriter:
    """Collects results from reports on the controller and writes the JSON and HTML files at the end."""

    def __init__(self, config: pytest.Config, json_path: Path | None, html_path: Path | None) -> None:
        from pytest_saecheck.report.collect import Collector, now_iso

        self.config = config
        self.json_path = json_path
        self.html_path = html_path
        self.collector = Collector.for_config(config)
        self.started = now_iso()
        self.started_clock = time.perf_counter()
        self.interrupted = False
        self.written: list[tuple[str, Path]] = []
        self.problems: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.collector.add_report(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collector.add_report(report)

    def pytest_keyboard_interrupt(self, excinfo: Any) -> None:
        self.interrupted = True

    def document(self, session: pytest.Session, exitstatus: int) -> dict[str, Any]:
        from pytest_saecheck.report.collect import environment, now_iso
        from pytest_saecheck.report.schema import finalise, json_safe, validate

        status = int(exitstatus)
        interrupted = self.interrupted or status == int(pytest.ExitCode.INTERRUPTED)
        stopped = bool(session.shouldstop or session.shouldfail)
        run = {
            "started": self.started,
            "finished": now_iso(),
            "duration_s": round(time.perf_counter() - self.started_clock, 3),
            "exit_status": status,
            "interrupted": interrupted,
            "complete": not interrupted and not stopped and status in (0, 1, 5),
            "workers": _workers(self.config),
            "shards": 1,
        }
        document = self.collector.document(run=run, environment_info=environment())
        hook = self.config.hook
        try:
            for fields in hook.pytest_saecheck_json_fields(document=document, config=self.config):
                if fields:
                    document["extensions"].update(json_safe(dict(fields)))
        except Exception as error:  # an extension must not cost the run its report
            self.problems.append(f"pytest_saecheck_json_fields failed: {error!r}")
        try:
            for sections in hook.pytest_saecheck_report_sections(document=document, config=self.config):
                for section in sections or ():
                    document["report_sections"].append(_section(section))
        except Exception as error:
            self.problems.append(f"pytest_saecheck_report_sections failed: {error!r}")
        finalise(document)
        validate(document)
        return document

    def ran_tests(self) -> bool:
        """Whether the run produced a result: a test ran (even only its setup) or a collection error."""
        return not self.config.getoption("collectonly", False) and bool(self.collector.tests)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        from pytest_saecheck.files import write_atomic
        from pytest_saecheck.report.files import dumps

        if not self.ran_tests():  # --collect-only, or -k matching nothing: keep the last real report
            return
        document = self.document(session, exitstatus)
        if self.json_path is not None:
            self.written.append(("JSON result", write_atomic(self.json_path, dumps(document))))
        if self.html_path is not None:
            from pytest_saecheck.report.html import render_html

            self.written.append(("HTML report", write_atomic(self.html_path, render_html(document))))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.ran_tests() and not self.config.getoption("collectonly", False):
            kept = " and ".join(str(path) for path in (self.json_path, self.html_path) if path is not None)
            terminalreporter.write_line(f"saecheck: no test ran, so {kept} was left as it was")
        for what, path in self.written:
            terminalreporter.write_line(f"saecheck: {what} written to {path}")
        for problem in self.problems:
            terminalreporter.write_line(f"saecheck: {problem}", red=True)


def _section(section: Any) -> dict[str, Any]:
    if not isinstance(section, dict) or not isinstance(section.get("title"), str):
        raise TypeError(f"a report section must be a dict with a 'title' string, got {section!r:.200}")
    return {
        "title": section["title"],
        "text": None if section.get("text") is None else str(section["text"]),
        "html": None if section.get("html") is None else str(section["html"]),
        "sae": None if section.get("sae") is None else str(section["sae"]),
    }
