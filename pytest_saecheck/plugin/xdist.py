"""Under pytest-xdist's default ``load`` mode, one SAE's tests (and one release group's) go to one worker.

Imported and registered by the plugin only when pytest-xdist is installed and active; imports no torch.

How: the controller tells each worker (``workerinput``) that it schedules by group; each worker computes every
saecheck test's group (:func:`pytest_saecheck.plugin.xdist_groups.group_name`) at collection, and the node ids it sends
to the controller in its collection message carry the group as an ``@saecheck-...`` suffix, as ``--dist
loadgroup`` does; the items themselves keep their node ids, so reports, ``--lf`` and the terminal show the ids
of a serial run. The controller's scheduler (:class:`SAEGroupScheduling`, returned by
``pytest_xdist_make_scheduler`` only under ``--dist load``, the mode ``-n N`` implies) sends each group to one
worker as one unit of work and every other test as a unit of its own (xdist's ``LoadScopeScheduling`` with
saecheck groups as scopes, as ``loadgroup`` does); a collection without saecheck groups is scheduled by xdist's
``LoadScheduling``, unchanged. Every other ``--dist`` mode is left to xdist (``loadgroup`` groups by the
``xdist_group`` marks the plugin adds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from xdist.scheduler import LoadScheduling, LoadScopeScheduling  # type: ignore[import-untyped]

from pytest_saecheck.plugin.xdist_groups import XDIST_GROUPS_INPUT

GROUP_PREFIX = "@saecheck-"
"""Separates a node id from its saecheck group in the ids a worker sends the controller."""


def group_of(nodeid: str) -> str | None:
    """The saecheck group in a node id sent by a worker (``...@saecheck-<slug>-<hash>``), or None."""
    at = nodeid.rfind(GROUP_PREFIX)
    if at < 0 or at < nodeid.rfind("]"):  # an '@saecheck-' inside a parameter id is not a suffix
        return None
    return nodeid[at + 1 :]


def without_group(nodeid: str) -> str:
    """``nodeid`` without its saecheck group suffix."""
    group = group_of(nodeid)
    return nodeid if group is None else nodeid[: -len(group) - 1]


class _GroupScopes(LoadScopeScheduling):
    """xdist's scope scheduling with saecheck groups as the scopes; every other test is its own scope."""

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid) or nodeid


class SAEGroupScheduling:
    """xdist's ``Scheduling`` protocol: saecheck groups on one worker each when the collection has any, else
    xdist's ``LoadScheduling`` unchanged.

    The choice is made on the first collection a worker reports (all workers collect the same tests); until
    then, nodes are registered with both schedulers and questions are answered by ``LoadScheduling``.
    """

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        self._load = LoadScheduling(config, log)
        self._groups = _GroupScopes(config, log)
        self._chosen: Any = None

    @property
    def _active(self) -> Any:
        return self._chosen if self._chosen is not None else self._load

    @property
    def nodes(self) -> list[Any]:
        return list(self._active.nodes)

    @property
    def collection_is_completed(self) -> bool:
        return bool(self._active.collection_is_completed)

    @property
    def tests_finished(self) -> bool:
        return bool(self._active.tests_finished)

    @property
    def has_pending(self) -> bool:
        return bool(self._active.has_pending)

    def add_node(self, node: Any) -> None:
        if self._chosen is not None:
            self._chosen.add_node(node)
            return
        self._load.add_node(node)
        self._groups.add_node(node)

    def add_node_collection(self, node: Any, collection: Sequence[str]) -> None:
        if self._chosen is None:
            self._chosen = self._groups if any(group_of(nodeid) for nodeid in collection) else self._load
        self._chosen.add_node_collection(node, collection)

    def mark_test_complete(self, node: Any, item_index: int, duration: float = 0) -> None:
        self._active.mark_test_complete(node, item_index, duration)

    def mark_test_pending(self, item: str) -> None:
        self._active.mark_test_pending(item)

    def remove_pending_tests_from_node(self, node: Any, indices: Sequence[int]) -> None:
        self._active.remove_pending_tests_from_node(node, indices)

    def remove_node(self, node: Any) -> str | None:
        if self._chosen is None:
            self._groups.remove_node(node)
        crashed: str | None = self._active.remove_node(node)
        # the worker's item has the id of a serial run: report the crash under that id
        return None if crashed is None else without_group(crashed)

    def schedule(self) -> None:
        self._active.schedule()


def pytest_configure_node(node: Any) -> None:
    """Tell each worker to send its saecheck groups in its collection (a worker's own ``dist`` option is
    always ``no``, so it cannot tell the mode itself)."""
    if uses_groups(node.config):
        node.workerinput[XDIST_GROUPS_INPUT] = True


def uses_groups(config: pytest.Config) -> bool:
    """Whether the controller schedules by saecheck group: under ``--dist load``, what ``-n N`` implies."""
    return config.getoption("dist", None) == "load"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> SAEGroupScheduling | None:
    """Our scheduler under ``--dist load`` (what ``-n N`` implies); None (xdist's own) under any other mode."""
    return SAEGroupScheduling(config, log) if uses_groups(config) else None


class CrashAfterTest:
    """On the controller: a worker that dies after a test's call phase had finished (in its teardown, or at a
    later kill) is reported as that test's teardown error, once, not as a second, failed run of the test.

    pytest-xdist reports every crash as a failure of the test the worker was running (phase ``???``), so a
    test whose call had passed was counted passed and failed, and the result document kept only the failure.
    With its phase set to ``teardown`` the crash is what pytest calls a teardown error ("1 passed, 1 error"),
    and the test's own outcome stands beside it. A crash during the call phase stays xdist's failure. xdist does
    not re-run a crashed test.
    """

    def __init__(self) -> None:
        self.finished: dict[str, str] = {}  # node id -> outcome of its call phase

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.finished[report.nodeid] = report.outcome

    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport, sched: Any) -> None:
        outcome = self.finished.get(crashitem)
        if outcome is None or report.outcome != "failed":
            return
        report.when = "teardown"
        report.longrepr = (
            f"{report.longrepr}, after the test itself had {outcome} (during its teardown): counted as a "
            "teardown error; the test's own result stands"
        )
