"""The plugin's session object: one per pytest run, registered as a plugin, the holder of the run's state.

Built in ``pytest_configure`` and registered as ``saecheck-session`` (as pytest-benchmark builds its
``BenchmarkSession``), it is:

- the active run (:mod:`pytest_saecheck.running`) from ``pytest_configure`` to ``pytest_unconfigure``: the hook
  relay the loaders ask, and the test being run, which assertions record their outcome on;
- the carrier of each test's records onto its reports (``report.saecheck_records``), with the numbers in pytest's
  own channels (:mod:`pytest_saecheck.report.channels`): a ``saecheck`` report section, JUnit properties
  (``item.user_properties``; run-wide facts as ``--junitxml`` testsuite properties) and pytest-html extras;
- on the controller (the main process of a serial run, never an xdist worker): the run's one
  :class:`~pytest_saecheck.report.collect.Collector`. At ``pytest_sessionfinish`` it builds the run's document
  once, and that one document feeds the end-of-run terminal table, the JSON and the HTML
  (:class:`~pytest_saecheck.report.plugin.ReportFiles`), and the check for baseline files no test read; in a run
  that updates baselines it feeds the reports to the
  :class:`~pytest_saecheck.checks.baselines.BaselineWriter`, which writes them first.

Imports no torch.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator
from contextvars import Token
from pathlib import Path
from typing import Any

import pytest

from pytest_saecheck import records, running
from pytest_saecheck.checks import baselines
from pytest_saecheck.files import failed_exit_status
from pytest_saecheck.plugin.terminal import CI_VARIABLE, in_ci, junit_suite_properties
from pytest_saecheck.report import channels
from pytest_saecheck.report.plugin import ReportFiles, profile, report_files, workers

#: The name the session object is registered under (``config.pluginmanager.get_plugin(SESSION_NAME)``).
SESSION_NAME = "saecheck-session"


class SAECheckSession:
    """The state of one pytest run (see the module docstring); ``hook`` and ``item`` make it a
    :class:`pytest_saecheck.running.Run`."""

    def __init__(self, config: pytest.Config) -> None:
        from pytest_saecheck.report.collect import Collector, now_iso

        self.config = config
        self.hook = config.hook
        self.item: pytest.Item | None = None
        self.controller = not hasattr(config, "workerinput")
        self.collector = Collector.for_config(config)
        self.files: ReportFiles | None = report_files(config)
        self.baseline_writer: baselines.BaselineWriter | None = None
        self.started = now_iso()
        self.started_clock = time.perf_counter()
        self.run_id = uuid.uuid4().hex
        self.interrupted = False
        self.ctrl_c = False
        self.failed_in_ci = False
        #: the run's finalised result document, built once at ``pytest_sessionfinish``
        self.document: dict[str, Any] | None = None
        #: the baseline files the run's ``assert_no_regression`` calls read or recorded
        self.baselines_read: set[Path] = set()
        self.unused_baselines: list[Path] = []
        self._token: Token[running.Run | None] | None = None

    @classmethod
    def of(cls, config: pytest.Config) -> SAECheckSession | None:
        """The session object of ``config``'s run (None when the plugin is not configured)."""
        found = config.pluginmanager.get_plugin(SESSION_NAME)
        return found if isinstance(found, cls) else None

    # -- lifetime ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Lock the report paths and, in an updating run, the baseline directory (a second live run on one is a
        usage error), then become the active run."""
        if self.files is not None:
            self.files.lock()
        try:
            self.baseline_writer = baselines.writer_for(self.config)
        except pytest.UsageError:
            self.stop()
            raise
        self._token = running.activate(self)

    def stop(self) -> None:
        """Give the report paths, the baseline directory and the active run back (the outer run's, under
        ``pytester``)."""
        if self.files is not None:
            self.files.unlock()
        if self.baseline_writer is not None:
            self.baseline_writer.release()
        if self._token is not None:
            running.deactivate(self._token)
            self._token = None

    # -- every process: the running test, and its records on its reports --------------------------------

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Run-wide facts as testsuite properties of ``--junitxml`` (what ``record_testsuite_property`` adds)."""
        from _pytest.junitxml import xml_key

        xml = self.config.stash.get(xml_key, None)
        if xml is not None:
            for name, value in junit_suite_properties(self.config):
                xml.add_global_property(name, value)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, Any, Any]:
        previous, self.item = self.item, item
        try:
            return (yield)
        finally:
            self.item = previous

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, Any]:
        """Move the records the phase gathered onto its report, and its numbers into pytest's channels."""
        report = yield
        gathered = records.take(item)
        if gathered:
            setattr(report, records.REPORT_ATTRIBUTE, gathered)
            self._channels(item, report, gathered)
        return report

    def _channels(self, item: pytest.Item, report: pytest.TestReport, gathered: list[dict[str, Any]]) -> None:
        text = channels.section_text(gathered)
        if text is None:
            return
        report.sections.append((channels.SECTION_TITLE, text))
        # the teardown report copies item.user_properties, and --junitxml writes them from it
        item.user_properties.extend(channels.junit_properties(gathered))
        if self._html_report():
            import pytest_html  # type: ignore[import-untyped]  # active, so installed

            table = channels.html_extra(gathered)
            report.extras = [*getattr(report, "extras", []), pytest_html.extras.html(table)]  # type: ignore[attr-defined]

    def _html_report(self) -> bool:
        """Whether pytest-html is active and writes a report in this run (``--html PATH``)."""
        try:
            return self.config.pluginmanager.hasplugin("html") and bool(
                self.config.getoption("htmlpath", None)
            )
        except ValueError:
            return False

    # -- the controller: one collector, one document ------------------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.controller:
            return
        self.collector.add_report(report)
        if self.baseline_writer is not None:
            self.baseline_writer.add_report(report)
        self.baselines_read.update(baselines.paths_read(getattr(report, records.REPORT_ATTRIBUTE, None)))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if self.controller and report.failed:
            self.collector.add_report(report)

    def pytest_keyboard_interrupt(self, excinfo: Any) -> None:
        self.interrupted = True
        # Ctrl-C (or SIGINT), not pytest stopping on a collection error (Session.Interrupted)
        self.ctrl_c = self.ctrl_c or type(excinfo.value) is KeyboardInterrupt

    def ran_tests(self) -> bool:
        """Whether the run produced a result: a test ran (even only its setup) or a collection error."""
        return not self.config.getoption("collectonly", False) and bool(self.collector.tests)

    def _run(self, session: pytest.Session) -> dict[str, Any]:
        """The document's ``run`` section at this moment of ``pytest_sessionfinish``."""
        from pytest_saecheck.report.collect import now_iso

        status = int(session.exitstatus)
        interrupted = self.interrupted or status == int(pytest.ExitCode.INTERRUPTED)
        stopped = bool(session.shouldstop or session.shouldfail)
        run: dict[str, Any] = {
            "id": self.run_id,
            "started": self.started,
            "finished": now_iso(),
            "duration_s": round(time.perf_counter() - self.started_clock, 3),
            "exit_status": status,
            "interrupted": interrupted,
            "complete": not interrupted and not stopped and status in (0, 1, 5),
            "workers": workers(self.config),
            "shards": 1,
        }
        chosen = profile(self.config)
        if chosen is not None:  # only then, as in a merge of shards
            run["profile"] = chosen
        return run

    def _finish_document(self, session: pytest.Session) -> dict[str, Any]:
        """The run's document, built and finalised once (the terminal table, the JSON and the HTML read it)."""
        from pytest_saecheck.report.collect import environment

        if self.document is None:
            self.document = self.collector.document(run=self._run(session), environment_info=environment())
        return self.document

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Write the baselines of an updating run; build the document once; under CI a run that checked no SAE
        exits 1; list (and, with the option, fail on) baseline files no test read; write the report files."""
        if not self.controller:
            return
        if self.baseline_writer is not None:
            self.baseline_writer.write(session)
        if not self.ran_tests():
            return  # --collect-only, or -k matching nothing: the files keep the last real report
        document = self._finish_document(session)
        found = _verdict(document)
        if in_ci() and found is not None and found[0] == "unchecked":
            self.failed_in_ci = True
            session.exitstatus = failed_exit_status(session.exitstatus)
        self._check_unused_baselines(session, document)
        document["run"].update(self._run(session))  # the exit status the checks above settled
        if self.files is not None:
            self.files.write(session, document, ctrl_c=self.ctrl_c)

    def _check_unused_baselines(self, session: pytest.Session, document: dict[str, Any]) -> None:
        directory = baselines.baseline_dir(self.config)
        if directory is None or not self.baselines_read or not document["run"].get("complete", True):
            return  # no assert_no_regression ran, or the run stopped early: every file would look unused
        self.unused_baselines = baselines.unused(directory, self.baselines_read)
        if self.unused_baselines and baselines.fail_unused(self.config):
            session.exitstatus = failed_exit_status(session.exitstatus)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.controller:  # xdist worker: the controller prints the table
            return
        if self.document is not None:
            self._table(terminalreporter, self.document)
        if self.baseline_writer is not None:
            self.baseline_writer.summary(terminalreporter)
        for line, problem in baselines.unused_lines(
            self.unused_baselines, fail=baselines.fail_unused(self.config)
        ):
            terminalreporter.write_line(line, red=problem, yellow=not problem)
        if self.files is not None:
            self.files.summary(
                terminalreporter,
                ran_tests=self.ran_tests(),
                collect_only=bool(self.config.getoption("collectonly", False)),
            )

    def _table(self, terminalreporter: Any, document: dict[str, Any]) -> None:
        from pytest_saecheck.report.terminal import summary_lines

        lines = summary_lines(document)
        if not lines:
            return
        terminalreporter.write_sep("=", "saecheck summary")
        for line in lines:
            terminalreporter.write_line(line)
        found = _verdict(document)
        if found is None or found[0] != "unchecked":
            return
        terminalreporter.write_line(f"saecheck: {found[1]}", red=True)
        if self.failed_in_ci:
            terminalreporter.write_line(
                f"saecheck: exit status 1: {CI_VARIABLE} is set and a CI run that checked no SAE must not "
                "pass. Make the data and models available to this job, or deselect these tests here",
                red=True,
            )
        else:
            terminalreporter.write_line(
                f"saecheck: (under CI, with {CI_VARIABLE} set, such a run exits 1)", yellow=True
            )


def _verdict(document: dict[str, Any]) -> tuple[str, str] | None:
    from pytest_saecheck.report.display import verdict

    return verdict(document["saes"])
