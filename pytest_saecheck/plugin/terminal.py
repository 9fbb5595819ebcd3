"""The plugin's terminal output: the header lines (device, versions, defaults) and the per-run reporter that
prints the end-of-run table (rendered by :func:`pytest_saecheck.report.terminal.summary_lines`). Imports no
torch."""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

import pytest

from pytest_saecheck.plugin.settings import SETTINGS, resolve
from pytest_saecheck.report.collect import Collector
from pytest_saecheck.report.terminal import summary_lines


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
    return [f"saecheck: device={device}; {versions}", f"saecheck defaults: {defaults}"]


def _show(value: Any, name: str) -> str:
    if value is None:
        return {
            "context_size": "from SAE",
            "dtype": "float32",
            "tokens": "SAE's dataset",
            "scaling_law": "none",
            "activation_scaler": "auto",
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

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.collector.add_report(report)

    def lines(self) -> list[str]:
        return summary_lines(self.collector.document(environment_info={}))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput"):  # xdist worker: the controller prints the table
            return
        lines = self.lines()
        if not lines:
            return
        terminalreporter.write_sep("=", "saecheck summary")
        for line in lines:
            terminalreporter.write_line(line)
