"""pytest plugin: ``--saecheck-json PATH`` and ``--saecheck-report PATH``, safe under pytest-xdist.

- Options ``--saecheck-json PATH`` / ``--saecheck-report PATH`` / ``--saecheck-saebench-json DIR`` and ini keys
  ``saecheck_json`` / ``saecheck_report`` / ``saecheck_saebench_json`` (a relative ini path is relative to the ini
  file's directory). The SAEBench directory gets one SAEBench core result per evaluated SAE
  (:mod:`pytest_saecheck.report.saebench`), written after the JSON and HTML.
- Results travel on the test reports as plain values (``report.saecheck_records``), so under xdist they reach
  the controller with the reports. Only the controller collects them (the run's one collector, on the plugin's
  session object :class:`~pytest_saecheck.plugin.session.SAECheckSession`) and writes the files
  (:class:`ReportFiles`), once, at ``pytest_sessionfinish``: also when tests fail or error, and when the run is interrupted (the document then
  says ``"interrupted": true``; beside a complete run's report it goes to ``NAME.partial.*``). The JSON and
  HTML are one commit with one run id (:func:`~pytest_saecheck.files.commit_files`), and a live run locks its
  report paths (:class:`~pytest_saecheck.files.RunLock`). A run that executes no test (``--collect-only``,
  ``-k`` matching nothing) writes nothing, so the last report stays. Guarantees: ``docs/reliability.md``.
- Extension hooks: :mod:`pytest_saecheck.report.hookspecs`.

The core plugin imports this module from its ``pytest_addhooks``; ``-p pytest_saecheck.report.plugin`` also
works, and registering it twice is harmless (pytest registers a module once per name). Imports no torch, and no jinja2 until a report is rendered.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_saecheck.files import RunLock, failed_exit_status, option_path
from pytest_saecheck.report import hookspecs

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
    group.addoption(
        "--saecheck-saebench-json",
        dest="saecheck_saebench_json",
        metavar="DIR",
        default=None,
        help="write each evaluated SAE's core numbers in SAEBench's core result format into DIR (one file each)",
    )
    parser.addini(
        "saecheck_json", help="default for --saecheck-json (relative to the ini file)", default=None
    )
    parser.addini(
        "saecheck_saebench_json",
        help="default for --saecheck-saebench-json (relative to the ini file)",
        default=None,
    )
    parser.addini(
        "saecheck_report", help="default for --saecheck-report (relative to the ini file)", default=None
    )


def report_files(config: pytest.Config) -> ReportFiles | None:
    """The report files of this run (None on an xdist worker, whose controller writes them, or when no
    ``--saecheck-json``/``--saecheck-report``/``--saecheck-saebench-json`` is given). Made by the plugin's session
    object (:class:`~pytest_saecheck.plugin.session.SAECheckSession`) at ``pytest_configure``."""
    if hasattr(config, "workerinput"):
        return None
    json_path, html_path = option_path(config, "saecheck_json"), option_path(config, "saecheck_report")
    saebench_dir = option_path(config, "saecheck_saebench_json")
    if json_path is None and html_path is None and saebench_dir is None:
        return None
    return ReportFiles(json_path, html_path, saebench_dir)


def partial_path(path: Path) -> Path:
    """Where an interrupted run's file goes when ``path`` holds a complete run's: ``r.json`` -> ``r.partial.json``."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _holds_complete_run(path: Path) -> bool:
    """Whether ``path`` is a report file of a run that finished (JSON: ``run.complete``; HTML: its meta)."""
    from pytest_saecheck.report.files import html_run_state, load_document

    try:
        if path.suffix.lower() == ".json":
            run = load_document(path)["run"]
            return bool(run.get("complete")) and not run.get("interrupted")
        with open(path, encoding="utf-8") as stream:
            return html_run_state(stream.read(4096)) == "complete"
    except (OSError, ValueError, UnicodeDecodeError):
        return False


@contextlib.contextmanager
def _ctrl_c_noted(noted: list[int]) -> Iterator[None]:
    """While the report is written, a first Ctrl-C is noted (``noted`` grows) instead of raised, so the files
    are finished; a second raises ``KeyboardInterrupt`` (the caller abandons the write). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        noted.append(signum)
        if len(noted) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ReportFiles:
    """The JSON, HTML and SAEBench files of a run: locked at start-up, written once from the run's finalised
    document at the end, and their lines in the terminal summary."""

    def __init__(
        self, json_path: Path | None, html_path: Path | None, saebench_dir: Path | None = None
    ) -> None:
        self.json_path = json_path
        self.html_path = html_path
        self.saebench_dir = saebench_dir
        self.written: list[tuple[str, Path]] = []
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.locks: list[RunLock] = []

    def lock(self) -> None:
        """Hold each report path for this run: a second live run on one of them is a usage error."""
        for path in dict.fromkeys(p for p in (self.json_path, self.html_path) if p is not None):
            lock = RunLock(path)
            if not lock.acquire():
                self.unlock()
                raise pytest.UsageError(
                    f"saecheck: another pytest run (process {lock.holder()}) is writing {path} right now "
                    f"(lock {lock.lock_path}); two runs on one report path would mix their results. Wait for it "
                    "to finish, or give this run another --saecheck-json / --saecheck-report path"
                )
            self.locks.append(lock)

    def unlock(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []

    def extend(self, document: dict[str, Any], config: pytest.Config) -> dict[str, Any]:
        """``document`` with the extension hooks' fields and sections (:mod:`pytest_saecheck.report.hookspecs`);
        a failing hook is one line at the end, not the loss of the report."""
        from pytest_saecheck.report.schema import json_safe, validate

        hook = config.hook
        try:
            for fields in hook.pytest_saecheck_json_fields(document=document, config=config):
                if fields:
                    document["extensions"].update(json_safe(dict(fields)))
        except Exception as error:  # an extension must not cost the run its report
            self.problems.append(f"pytest_saecheck_json_fields failed: {error!r}")
        try:
            for sections in hook.pytest_saecheck_report_sections(document=document, config=config):
                for section in sections or ():
                    document["report_sections"].append(_section(section))
        except KeyboardInterrupt:
            raise
        except Exception as error:
            self.problems.append(f"pytest_saecheck_report_sections failed: {error!r}")
        validate(document)
        return document

    def _targets(self, document: dict[str, Any], ctrl_c: bool) -> list[tuple[str, Path, str]]:
        """(what, path, text) of each file to write. An interrupted run's files go beside a complete run's
        report (``r.partial.json``), which stays where it is."""
        from pytest_saecheck.report.files import dumps
        from pytest_saecheck.report.html import render_html

        json_path, html_path = self.json_path, self.html_path
        given = [path for path in (json_path, html_path) if path is not None]
        if ctrl_c and any(_holds_complete_run(path) for path in given):
            json_path = None if json_path is None else partial_path(json_path)
            html_path = None if html_path is None else partial_path(html_path)
            self.notes.append(
                "saecheck: the run was interrupted, so its partial results were written beside the last "
                f"complete report, which is kept: {' and '.join(map(str, given))}"
            )
        targets = []
        if json_path is not None:
            targets.append(("JSON result", json_path, dumps(document)))
        if html_path is not None:
            targets.append(("HTML report", html_path, render_html(document, markup_from_hooks=True)))
        return targets

    def write(self, session: pytest.Session, document: dict[str, Any], *, ctrl_c: bool = False) -> None:
        """Write the JSON and HTML of ``document`` (the run's finalised document) as one commit (:func:`~pytest_saecheck.files.commit_files`), then the SAEBench results.

        A file that cannot be written is one line at the end and a non-zero exit; the other file is still
        written. Ctrl-C while writing: the first is held until the files are written (exit 2), a second abandons
        the write (see ``docs/reliability.md``).
        """
        from pytest_saecheck.files import commit_files

        noted: list[int] = []
        try:
            with _ctrl_c_noted(noted):
                extended = self.extend(document, session.config)
                targets = self._targets(extended, ctrl_c)
                results = commit_files([(path, text) for _, path, text in targets])
                self._write_saebench(extended)
        except KeyboardInterrupt:
            self.problems.append(
                "interrupted twice while writing the report: the write was abandoned (the files are the previous "
                "pair, or the new pair if the replacements had begun)"
            )
            session.exitstatus = pytest.ExitCode.INTERRUPTED
            return
        for (what, _, _), result in zip(targets, results, strict=True):
            if result.error is None:
                self.written.append((what, result.path))
                continue
            removed = "; the previous file there was removed" if result.removed_stale else ""
            self.problems.append(f"{what} not written: {result.error}{removed}")
            session.exitstatus = failed_exit_status(session.exitstatus)
        if noted:
            self.notes.append("saecheck: interrupted while writing the report; it was written in full first")
            session.exitstatus = pytest.ExitCode.INTERRUPTED

    def _write_saebench(self, document: dict[str, Any]) -> None:
        """One SAEBench core result per evaluated SAE into ``--saecheck-saebench-json DIR``; a failure is one line."""
        if self.saebench_dir is None:
            return
        from pytest_saecheck.report.saebench import write_core_results

        try:
            for path in write_core_results(document, self.saebench_dir):
                self.written.append(("SAEBench core result", path))
        except OSError as error:
            self.problems.append(f"SAEBench core results not written to {self.saebench_dir}: {error}")

    def summary(self, terminalreporter: Any, *, ran_tests: bool, collect_only: bool) -> None:
        """The files' lines at the end of the terminal summary."""
        if not ran_tests and not collect_only:
            paths = (self.json_path, self.html_path, self.saebench_dir)
            kept = " and ".join(str(path) for path in paths if path is not None)
            terminalreporter.write_line(f"saecheck: no test ran, so {kept} was left as it was")
        for what, path in self.written:
            terminalreporter.write_line(f"saecheck: {what} written to {path}")
        for note in self.notes:
            terminalreporter.write_line(note, yellow=True)
        for problem in self.problems:
            terminalreporter.write_line(f"saecheck: {problem}", red=True)


def workers(config: pytest.Config) -> int | None:
    """The number of xdist workers of this run (None in a serial run)."""
    try:
        value = config.getoption("numprocesses", default=None)
    except ValueError:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value or None
    tx = getattr(config.option, "tx", None)
    return len(tx) if isinstance(tx, list) and tx else None


def profile(config: pytest.Config) -> str | None:
    """The ``--saecheck-profile`` in use (None without one, or when the core plugin is not loaded)."""
    from pytest_saecheck.plugin.profiles import profile_name

    try:
        return profile_name(config)
    except ValueError:
        return None


def _section(section: Any) -> dict[str, Any]:
    """A section from an in-process hook, its markup sanitised (:mod:`pytest_saecheck.report.markup`)."""
    from pytest_saecheck.report.markup import sanitise_html

    if not isinstance(section, dict) or not isinstance(section.get("title"), str):
        raise TypeError(f"a report section must be a dict with a 'title' string, got {section!r:.200}")
    return {
        "title": section["title"],
        "text": None if section.get("text") is None else str(section["text"]),
        "html": None if section.get("html") is None else sanitise_html(str(section["html"])),
        "sae": None if section.get("sae") is None else str(section["sae"]),
    }
