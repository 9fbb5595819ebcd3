"""The plugin's terminal output: the header lines (device, versions, defaults) and the per-run reporter that
prints the end-of-run table (rendered by :func:`pytest_saecheck.report.terminal.summary_lines`). Imports no
torch."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Any

import pytest

from pytest_saecheck.files import failed_exit_status
from pytest_saecheck.plugin import profiles
from pytest_saecheck.plugin.settings import SETTINGS, resolve
from pytest_saecheck.report.collect import Collector
from pytest_saecheck.report.display import verdict
from pytest_saecheck.report.terminal import summary_lines

#: The environment variable CI services set; when it is set (and not "0"/"false"/"no"/"off"), a run in which
#: no SAE was checked exits non-zero.
CI_VARIABLE = "CI"


def in_ci() -> bool:
    """Whether this run is under CI (:data:`CI_VARIABLE` set to anything but an empty or false value)."""
    return os.environ.get(CI_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def header_lines(config: pytest.Config) -> list[str]:
    """``saecheck: device=..., versions, defaults``, resolved from the command line and ini (markers excluded)."""
    settings = resolve(config)
    if settings.device is not None:
        device = f"{settings.device} ({settings.sources.get('device')})"
    elif "torch" in sys.modules:
        torch = sys.modules["torch"]
        device = ("cuda" if torch.cuda.is_available() else "cpu") + " (auto)"
    else:
        device = "auto: cuda when available, else cpu"
    versions = ", ".join(
        f"{name} {_version(name)}" for name in ("pytest-saecheck", "torch", "transformer-lens", "sae-lens")
    )
    defaults = ", ".join(
        f"{setting.name}={_show(getattr(settings, setting.name), setting.name)}"
        for setting in SETTINGS
        if setting.name != "device"
    )
    lines = [f"saecheck: device={device}; {versions}", f"saecheck defaults: {defaults}"]
    chosen = profiles.selected(config)
    if chosen is not None:
        values = ", ".join(f"{key}={value}" for key, value in chosen[1].items())
        lines.insert(1, f"saecheck profile: {chosen[0]} ({values or 'no settings'})")
    return lines


def _show(value: Any, name: str) -> str:
    if value is None:
        return {
            "context_size": "from SAE",
            "dtype": "float32",
            "tokens": "SAE's dataset",
            "scaling_law": "none",
            "activation_scaler": "auto",
            "release_group_mib": "auto",
        }.get(name, "-")
    if isinstance(value, bool):
        return str(value).lower()
    if name == "scaling_law":
        return value.spec + ("" if value.fitted else " (not fitted)")
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


class SummaryReporter:
    """Per-run plugin object: collects the reports (on the xdist controller) and prints the table at the end.

    It holds a :class:`~pytest_saecheck.report.collect.Collector`, the one collector of the run's records, and
    renders the table from its finalised document (:func:`summary_lines`).
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.collector = Collector.for_config(config)
        self.failed_in_ci = False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.collector.add_report(report)

    def lines(self) -> list[str]:
        return summary_lines(self.collector.document(environment_info={}))

    def verdict(self) -> tuple[str, str] | None:
        return verdict(self.collector.document(environment_info={})["saes"])

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Under CI, a run in which no SAE was checked (all skipped) is not a pass: exit 1."""
        if hasattr(self.config, "workerinput") or not in_ci():
            return
        found = self.verdict()
        if found is not None and found[0] == "unchecked":
            self.failed_in_ci = True
            session.exitstatus = failed_exit_status(session.exitstatus)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput"):  # xdist worker: the controller prints the table
            return
        lines = self.lines()
        if not lines:
            return
        terminalreporter.write_sep("=", "saecheck summary")
        for line in lines:
            terminalreporter.write_line(line)
        found = self.verdict()
        if found is not None and found[0] == "unchecked":
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
