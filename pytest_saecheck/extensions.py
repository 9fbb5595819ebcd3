"""Plug-ins of pytest-saecheck: where every extension point (:mod:`pytest_saecheck.hookspecs`) is asked.

A plug-in is a module of hook implementations. In a ``conftest.py`` or a pytest plugin it works inside pytest;
a package that wants its plug-in to work outside pytest too (``pytest_saecheck.load_model(...)`` in plain
Python) advertises it under the entry-point group :data:`ENTRY_POINT_GROUP` in its metadata, as this package does
for its bundled demo::

    [project.entry-points.pytest_saecheck]
    saecheck-demo = "pytest_saecheck.demo.plugin"

The saecheck pytest plugin loads those into pytest's plugin manager (``-p no:saecheck-demo`` leaves one out);
outside pytest, :func:`relay` answers from a plugin manager of this package holding them. Mark default
implementations ``trylast``, so that a ``conftest.py``'s implementation of a ``firstresult`` hook answers first.

Importing this module imports no torch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import pluggy

from pytest_saecheck import hookspecs, running

ENTRY_POINT_GROUP = "pytest_saecheck"
"""The entry-point group of plug-ins that work in and outside pytest."""
PROJECT = "pytest"
"""pluggy's project name of the hook markers (the hookspecs are pytest hookspecs)."""

T = TypeVar("T")


DISTRIBUTION = "pytest-saecheck"
"""This package's distribution name (its metadata advertises the bundled plug-ins)."""


def load_plugins(manager: pluggy.PluginManager) -> None:
    """Register in ``manager`` every plug-in advertised under :data:`ENTRY_POINT_GROUP` (blocked names skipped).

    Warns (:class:`~pytest_saecheck.errors.SAECheckWarning`) when this package's installed metadata advertises
    none: an install older than its ``pyproject.toml``, whose bundled demo would otherwise be missing without a
    word.
    """
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    if not _advertised_by_this_package():
        import warnings

        from pytest_saecheck.errors import SAECheckWarning

        warnings.warn(
            f"the installed metadata of {DISTRIBUTION} advertises no plug-in under the {ENTRY_POINT_GROUP!r} "
            "entry points, so the bundled demo ('demo', 'demo/<name>') is not registered: the install is older "
            "than pyproject.toml; reinstall it (pip install -e . or make setup)",
            SAECheckWarning,
            stacklevel=2,
        )


@functools.lru_cache(maxsize=1)
def _advertised_by_this_package() -> bool:
    import importlib.metadata

    try:
        entry_points = importlib.metadata.distribution(DISTRIBUTION).entry_points
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(entry.group == ENTRY_POINT_GROUP for entry in entry_points)


@functools.lru_cache(maxsize=1)
def _standalone() -> pluggy.PluginManager:
    """The plugin manager used outside a pytest session: the hookspecs and the advertised plug-ins."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    load_plugins(manager)
    return manager


def relay() -> Any:
    """The hook relay to ask: the running pytest session's, else this package's own (:func:`_standalone`)."""
    hook = running.active_hook()
    return hook if hook is not None else _standalone().hook


def named(answers: Iterable[Mapping[str, T] | None], what: str) -> dict[str, T]:
    """One mapping of the named things (scaling laws, groupings) that plug-ins answered with.

    ``answers``: a non-``firstresult`` hook's results. Raises :class:`~pytest_saecheck.errors.ConfigError` when
    two plug-ins give one name (``what`` names the kind in the message).
    """
    from pytest_saecheck.errors import ConfigError

    merged: dict[str, T] = {}
    for answer in answers:
        for name, value in (answer or {}).items():
            if name in merged and merged[name] is not value:
                raise ConfigError(f"two plug-ins register the {what} {name!r}; uninstall or rename one")
            merged[name] = value
    return merged


__all__ = ["ENTRY_POINT_GROUP", "load_plugins", "named", "relay"]
