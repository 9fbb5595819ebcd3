"""The pytest plugin (entry point ``saecheck``; disable with ``-p no:saecheck``). Imports no torch at import time.

It registers the ``--saecheck-*`` options and ``saecheck_*`` ini keys, the ``saecheck`` marker, the loader
hookspecs, the fixtures and the run's session object (:class:`~pytest_saecheck.plugin.session.SAECheckSession`,
which carries the records onto the test reports and into pytest's own channels, and prints the end-of-run table
of every SAE checked); and prints a header line. It also warns when a marker shadows a command-line option, keeps each
SAE's tests (and one release group's) on one pytest-xdist worker under ``-n N`` (``--dist load``, with
``xdist_scheduling``) and ``--dist loadgroup``, and hides its
own frames from the tracebacks of the :class:`~pytest_saecheck.errors.SAECheckError` errors it raises.
"""

from __future__ import annotations

import importlib
import types
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import Any

import _pytest
import pluggy
import pytest

from pytest_saecheck import extensions, hookspecs, records, running
from pytest_saecheck.checks import baselines
from pytest_saecheck.errors import ConfigError, SAECheckError
from pytest_saecheck.plugin import profiles, rates, xdist_groups
from pytest_saecheck.plugin import settings as settings_config
from pytest_saecheck.plugin.fixtures import (
    CACHE_KEY,
    plan_release_groups,
    saecheck,
    saecheck_device,
    saecheck_model,
    saecheck_sae,
    saecheck_settings,
    saecheck_tokens,
)
from pytest_saecheck.plugin.session import SESSION_NAME, SAECheckSession
from pytest_saecheck.plugin.terminal import header_lines

__all__ = [
    "saecheck",
    "saecheck_device",
    "saecheck_model",
    "saecheck_sae",
    "saecheck_settings",
    "saecheck_tokens",
]


MARKER_HELP = (
    "saecheck("
    + ", ".join(f"{setting.name}=..." for setting in settings_config.SETTINGS)
    + "): configure the SAE under test for the saecheck fixtures; the closest marker wins per key, and markers "
    "override --saecheck-* options and saecheck_* ini keys (only --saecheck-override NAME=VALUE overrides markers)"
)
# frames hidden from an SAECheckError's traceback: this package's, and pytest's and pluggy's around them
HIDDEN_DIRS = (
    Path(__file__).resolve().parent.parent,
    *(Path(module.__file__).resolve().parent for module in (_pytest, pluggy) if module.__file__),
)


class SettingShadowedWarning(pytest.PytestWarning):
    """A ``--saecheck-*`` option has no effect on some tests because their ``saecheck`` markers set the key."""


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)
    extensions.load_plugins(
        pluginmanager
    )  # the plug-ins of the saecheck hooks (the bundled demo's among them)
    # The report plugin has its own options (pytest_addoption is historic, so they still register) and
    # hookspecs; registering it here keeps `-p no:saecheck` disabling everything. Registered, not imported by
    # pytest: this package imports it already, and pytest's import_plugin would then warn, in an installed copy,
    # that the module was imported before it could rewrite its asserts.
    for name in ("pytest_saecheck.report.plugin", "pytest_saecheck.plugin.gpu"):
        if pluginmanager.get_plugin(name) is None and not pluginmanager.is_blocked(name):
            pluginmanager.register(importlib.import_module(name), name)


def pytest_addoption(parser: pytest.Parser) -> None:
    settings_config.add_options(parser)
    profiles.add_option(parser)
    baselines.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[rates.STARTED_KEY] = rates.run_started()  # a recorded run's wall time counts from there
    config.addinivalue_line("markers", MARKER_HELP)
    with running.activated(
        running.HookOnly(config.hook)
    ):  # validating a setting may ask the plug-ins (named laws)
        settings_config.validate_command_line(config)
    baselines.check_options(config)
    if not config.pluginmanager.has_plugin(SESSION_NAME):
        run = SAECheckSession(config)
        run.start()  # locks the report paths and baseline directory: a usage error when another live run holds one
        config.pluginmanager.register(run, SESSION_NAME)
    if config.pluginmanager.hasplugin("xdist") and not config.pluginmanager.hasplugin("saecheck-xdist"):
        from pytest_saecheck.plugin import (
            xdist as xdist_scheduling,  # imports pytest-xdist, which is installed and active
        )

        config.pluginmanager.register(xdist_scheduling, "saecheck-xdist")
        if not hasattr(config, "workerinput"):
            config.pluginmanager.register(xdist_scheduling.CrashAfterTest(), "saecheck-xdist-crashes")
    from pytest_saecheck.loading.progress import set_quiet

    set_quiet(config.get_verbosity() < 0)  # no progress bars under -q


RECORD_KEY = pytest.StashKey[int]()
"""Set at the end of a whole run (its test count): record this machine's rates at unconfigure."""


def pytest_unconfigure(config: pytest.Config) -> None:
    run = SAECheckSession.of(config)
    if run is not None:
        run.stop()
        config.pluginmanager.unregister(run, SESSION_NAME)
    cache = config.stash.get(CACHE_KEY, None)
    if cache is not None:
        n_tests = config.stash.get(RECORD_KEY, None)
        if n_tests is not None:
            rates.record(config, cache.clock, n_tests)
        cache.clear()
        del config.stash[CACHE_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    return header_lines(config)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A malformed ``saecheck`` marker, a marker's device this machine has not got, or a misspelt ``saecheck``
    mark on a test that uses the saecheck fixtures, errors the test."""
    if set(__all__) & set(getattr(item, "fixturenames", ())):  # a test that reads the saecheck marker
        misspelt = settings_config.misspelt_marks(item)
        if misspelt:
            raise ConfigError(
                f"@pytest.mark.{misspelt[0]} is not a saecheck marker (did you mean @pytest.mark.saecheck?): its "
                "settings would be ignored and the test would check another SAE; rename it"
            )
    if item.get_closest_marker(settings_config.MARKER) is not None:
        settings = settings_config.resolve_for_item(item)
        if settings.sources.get("device") == "marker":
            settings_config.check_device("device", settings.device)


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, Any, Any]:
    worker = getattr(config, "workerinput", None)
    if worker is None or worker.get("workerid") == "gw0":  # every xdist worker collects: warn once
        _warn_shadowed_options(config, items)
    loadgroup = bool(getattr(config.option, "loadgroup", False))  # an xdist worker under --dist loadgroup
    if loadgroup:
        xdist_groups.group_by_sae(config, items)
    result = yield
    shard = settings_config.shard_option(config)
    if shard is not None:  # before any grouping: the shard's tests are the run's
        from pytest_saecheck.plugin import schedule

        schedule.select_shard(config, items, *shard)
    if loadgroup:
        xdist_groups.suffix_xdist_groups(items)
    elif worker is not None and worker.get(xdist_groups.XDIST_GROUPS_INPUT):
        # --dist load (what -n N implies): the groups travel in the ids of the collection message only
        for item, group in xdist_groups.sae_groups(config, items).items():
            item.stash[xdist_groups.XDIST_GROUP_KEY] = group
    # after deselection: SAEs whose tests differ only in the SAE are evaluated in one shared pass
    plan_release_groups(config, items)
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    """With ``--saecheck-plan``: print every release's schedule (from configs; no weights, no model run) and run
    no test. Otherwise print the plan's one-line summary before the first test (not under ``-q``, on an xdist
    worker or with ``--collect-only``) and let pytest run the tests."""
    config = session.config
    planning = bool(config.getoption("saecheck_plan", default=False))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    from pytest_saecheck.plugin.fixtures import session_cache

    cache = session_cache(config)
    if not planning:
        # the start line: the schedule in one sentence, timed at this machine's recorded rate
        if (
            cache.release_plan
            and reporter is not None
            and config.get_verbosity() >= 0
            and not config.getoption("collectonly", default=False)
            and not hasattr(config, "workerinput")  # a worker's terminal is not shown
        ):
            for line in _plan(config, session, calibrate=False, whole=False):
                reporter.write_line(line)
        return None
    for line in _plan(config, session, calibrate=True, whole=True):
        if reporter is not None:
            reporter.write_line(line)
    return True


def _plan(config: pytest.Config, session: pytest.Session, *, calibrate: bool, whole: bool) -> list[str]:
    """The plan's lines (``whole``: every release and pass, else one summary line) and its time estimate from
    this machine's recorded rates (``plugin.rates``), measuring a matrix-product rate when none is recorded and
    ``calibrate`` is set. Keeps the recorded rate on the session cache for the first pass's estimate."""
    from pytest_saecheck.devices import auto_device
    from pytest_saecheck.plugin import schedule
    from pytest_saecheck.plugin.fixtures import session_cache

    cache = session_cache(config)
    plan = schedule.plan_releases(
        cache.release_plan, lambda settings: settings.device or auto_device(), cache.max_evaluations // 2
    )
    device = plan.product[4] if plan.product is not None else auto_device()
    measured = rates.read(config, device)
    cache.recorded_rate = measured.flops_per_second if measured is not None else None
    if (measured is None or measured.flops_per_second is None) and calibrate and plan.product is not None:
        rows, d_in, d_out, dtype, _ = plan.product
        measured = rates.Rates(
            flops_per_second=rates.calibrate(device, rows, d_in, d_out, dtype),
            other_seconds=None,
            n_tests=0,
            recorded="now",
            measured="calibrated",
        )
    estimate = rates.estimate_line(plan.flops, measured, rates.cache_state(config, device))
    summary = (
        f"saecheck plan: {counted(len(session.items), 'test')}, {counted(plan.n_saes, 'SAE')} of "
        f"{counted(len(cache.release_plan), 'release')} in {counted(plan.n_passes, 'pass', 'passes')}"
        + (f" ({plan.n_refused} refused: too big for the memory budget)" if plan.n_refused else "")
        + f"; time: {estimate}"
    )
    if not whole:
        return [summary]
    outside = schedule.tests_outside_releases(session.items, cache.release_plan)
    tail = (
        f"saecheck plan: {counted(outside, 'test')} outside these releases (a joint splice, a cross-layer "
        "transcoder, an SAE with settings of its own, release_group_mib=0): each SAE a pass of its own, not "
        "costed here. No test was run."
        if outside
        else "saecheck plan: no test was run."
    )
    return [*plan.lines, summary, tail]


def counted(n: int, word: str, plural: str | None = None) -> str:
    """``"1 test"``, ``"3 tests"`` (``plural`` where adding an s is wrong)."""
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


@pytest.hookimpl(wrapper=True)
def pytest_collection_finish(session: pytest.Session) -> Generator[None, Any, Any]:
    """On an xdist worker under ``--dist load``, the collection it reports carries each saecheck test's group
    (``xdist_scheduling``): the ids are suffixed while xdist sends them, then restored."""
    with xdist_groups.ids_with_groups(session.items):
        return (yield)


def _warn_shadowed_options(config: pytest.Config, items: list[pytest.Item]) -> None:
    """One warning per command-line option that markers shadow, located at the first test it misses."""
    shadowed: dict[str, list[tuple[pytest.Item, Any, Any]]] = {}
    for item in items:
        try:
            found = settings_config.shadowed_options(config, item.iter_markers(settings_config.MARKER))
        except ConfigError:
            continue  # the test errors at setup with the marker's problem
        for name, (option, marked) in found.items():
            shadowed.setdefault(name, []).append((item, option, marked))
    for name, cases in shadowed.items():
        option = settings_config.SETTINGS_BY_NAME[name].option
        item, given, marked = cases[0]
        others = f" and {len(cases) - 1} more" if len(cases) > 1 else ""
        warning = SettingShadowedWarning(
            f"{option}={given} has no effect on {len(cases)} test{'' if len(cases) == 1 else 's'} whose "
            f"@pytest.mark.saecheck sets {name} (e.g. {item.nodeid}: {name}={marked!r}{others}): markers take "
            f"precedence over options. To force it on every test: {settings_config.OVERRIDE_OPTION} {name}={given}"
        )
        line = item.location[1]
        warnings.warn_explicit(warning, SettingShadowedWarning, str(item.path), (line or 0) + 1)


def _outside_plugin(frame: types.FrameType) -> bool:
    try:
        parents = Path(frame.f_code.co_filename).resolve().parents
    except (TypeError, ValueError, OSError):
        return True
    return not any(directory in parents for directory in HIDDEN_DIRS)


def _without_plugin_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """A copy of the traceback chain ``tb`` without the frames of this package, pytest and pluggy."""
    kept = []
    while tb is not None:
        if _outside_plugin(tb.tb_frame):
            kept.append(tb)
        tb = tb.tb_next
    chain = None
    for entry in reversed(kept):  # a new chain: pytest re-reads tb_next when it cuts at the test function
        chain = types.TracebackType(chain, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return chain


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    excinfo = call.excinfo
    own_error = excinfo is not None and isinstance(excinfo.value, SAECheckError)
    if own_error and excinfo is not None and not item.config.getoption("fulltrace", False):
        # its message names the problem and the fix: show the user's frames only, as the assertions do
        chain = _without_plugin_frames(excinfo.tb)
        excinfo.traceback = type(excinfo.traceback)(chain if chain is not None else [])
    report = yield
    if (
        own_error and excinfo is not None
    ):  # the report keeps the message, not "All traceback entries are hidden"
        setattr(report, records.ERROR_ATTRIBUTE, f"{type(excinfo.value).__name__}: {excinfo.value}")
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Mark a whole run (not ``--collect-only``, the plan, an interrupted or ``-x``-stopped run) for the record of
    this machine's rates at unconfigure; free the last model, before pytest prints its summary."""
    cache = session.config.stash.get(CACHE_KEY, None)
    if cache is None:
        return
    config = session.config
    whole = (
        exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
        and not session.shouldfail
        and not session.shouldstop
        and not config.getoption("collectonly", default=False)
        and not config.getoption("saecheck_plan", default=False)
    )
    if whole:  # written at unconfigure, so that the summary and the report files count in the run's time
        config.stash[RECORD_KEY] = len(session.items)
    cache.clear()
