"""The pytest run this code is called in: its hook relay and the test being run, or nothing outside pytest.

The plugin's session object (:class:`pytest_saecheck.plugin.session.SAECheckSession`) is the one holder of that
state: it is registered with pytest as a plugin, and made the active run (:func:`activated`) for the duration of
its ``pytest_configure`` … ``pytest_unconfigure``. Code that is called inside a test without a handle on pytest (a
loader asking the ``pytest_saecheck_load_*`` hooks, an assertion recording its outcome on the running test) asks
here. The active run is a :class:`contextvars.ContextVar`, so a pytest run inside a test (``pytester``) has its own
and gives the outer one back when it ends, as Hypothesis keeps its current pytest item.

Imports nothing of this package and no torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import Any, Protocol

import pytest


class Run(Protocol):
    """What a run offers the code it calls: pytest's hook relay (``config.hook``) and the running test (or None
    between tests)."""

    @property
    def hook(self) -> Any: ...

    @property
    def item(self) -> pytest.Item | None: ...


class HookOnly:
    """A run that is only a hook relay (no test running): what the plugin makes active while it validates the
    command line in ``pytest_configure``, before its session object exists (a setting may name a plug-in's law)."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        self.item: pytest.Item | None = None


_ACTIVE: ContextVar[Run | None] = ContextVar("pytest_saecheck_active_run", default=None)


def activate(run: Run) -> Token[Run | None]:
    """Make ``run`` the active run; give the returned token to :func:`deactivate` to restore the previous one."""
    return _ACTIVE.set(run)


def deactivate(token: Token[Run | None]) -> None:
    """Restore the run that was active before :func:`activate` returned ``token``."""
    _ACTIVE.reset(token)


@contextlib.contextmanager
def activated(run: Run) -> Iterator[Run]:
    """``with activated(run):`` ``run`` is the active run inside the block (tests give a stand-in run here)."""
    token = activate(run)
    try:
        yield run
    finally:
        deactivate(token)


def active() -> Run | None:
    """The active run, or None outside pytest (plain Python use of the engine and the assertions)."""
    return _ACTIVE.get()


def active_hook() -> Any:
    """The hook relay of the active run, or None outside pytest (the built-in loaders and adapters then run)."""
    run = _ACTIVE.get()
    return None if run is None else run.hook


def current_item() -> pytest.Item | None:
    """The test being run, or None outside a test."""
    run = _ACTIVE.get()
    return None if run is None else run.item
