"""The pytest plugin (entry point ``saecheck``; disable with ``-p no:saecheck``). Imports no torch at import time.

It registers the ``--saecheck-*`` options and ``saecheck_*`` ini keys, the ``saecheck`` marker, the loader
hookspecs and the fixtures; carries assertion records onto test reports; and prints a header line and an
end-of-run table of every SAE checked.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from pytest_saecheck import config as settings_config
from pytest_saecheck import hookspecs, records
from pytest_saecheck.fixtures import (
    CACHE_KEY,
    plan_release_groups,
    saecheck,
    saecheck_device,
    saecheck_model,
    saecheck_sae,
    saecheck_settings,
    saecheck_tokens,
)
from pytest_saecheck.terminal import Summary, header_lines

__all__ = [
    "saecheck",
    "saecheck_device",
    "saecheck_model",
    "saecheck_sae",
    "saecheck_settings",
    "saecheck_tokens",
]

PREVIOUS_HOOK_KEY = pytest.StashKey[Any]()

MARKER_HELP = (
    "saecheck(model=..., sae=..., tokens=..., n_tokens=..., context_size=..., batch_size=..., device=..., "
    "dtype=..., exclude_bos=..., seed=..., unavailable=...): configure the SAE under test for the saecheck "
    "fixtures; the closest marker wins per key, and markers override --saecheck-* options and saecheck_* ini keys"
)


class SummaryReporter:
    """Per-run plugin object: gathers records from reports and prints the table (on the xdist controller)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.summary = Summary()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.summary.add_report(report)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput"):  # xdist worker: the controller prints the table
            return
        lines = self.summary.lines()
        if not lines:
            return
        terminalreporter.write_sep("=", "saecheck summary")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)
    # The report plugin has its own options (pytest_addoption is historic, so they still register) and
    # hookspecs; importing it here keeps `-p no:saecheck` disabling everything.
    pluginmanager.import_plugin("pytest_saecheck.report.plugin")


def pytest_addoption(parser: pytest.Parser) -> None:
    settings_config.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    settings_config.validate_command_line(config)
    config.stash[PREVIOUS_HOOK_KEY] = hookspecs.active_hook()  # restored at unconfigure (nested runs)
    hookspecs.set_active_hook(config.hook)
    config.pluginmanager.register(SummaryReporter(config), "saecheck-summary")


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = config.stash.get(CACHE_KEY, None)
    if cache is not None:
        cache.clear()
        del config.stash[CACHE_KEY]
    hookspecs.set_active_hook(config.stash.get(PREVIOUS_HOOK_KEY, None))


def pytest_report_header(config: pytest.Config) -> list[str]:
    return header_lines(config)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Plan the release groups: SAEs whose tests differ only in the SAE are evaluated in one shared pass."""
    plan_release_groups(config, items)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A malformed ``saecheck`` marker errors the test, whatever fixtures it uses."""
    if item.get_closest_marker(settings_config.MARKER) is not None:
        settings_config.resolve_for_item(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    previous = records.current_item()
    records.set_current_item(item)
    try:
        return (yield)
    finally:
        records.set_current_item(previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    gathered = records.take(item)
    if gathered:
        setattr(report, records.REPORT_ATTRIBUTE, gathered)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Free the last model at the end of the run, before pytest prints its summary."""
    cache = session.config.stash.get(CACHE_KEY, None)
    if cache is not None:
        cache.clear()
