"""Where a dictionary reads and writes: TransformerLens hook sites, module points (:mod:`.sites`), the layouts of
module trees (:mod:`.layouts`), and the resolver from a dictionary's own record to one point on the chosen
backend (:mod:`pytest_saecheck.hookpoints.resolve`)."""

from __future__ import annotations

from pytest_saecheck.hookpoints.layouts import LAYOUTS, Layout, Site
from pytest_saecheck.hookpoints.resolve import (
    BackendChoice,
    HookRecord,
    ResolvedPoint,
    ResolvedPoints,
    choose_backend,
    resolve_points,
)
from pytest_saecheck.hookpoints.sites import HookSite, ModulePoint, required_flags, resolve_hook

__all__ = [
    "LAYOUTS",
    "BackendChoice",
    "HookRecord",
    "HookSite",
    "Layout",
    "ModulePoint",
    "ResolvedPoint",
    "ResolvedPoints",
    "Site",
    "choose_backend",
    "required_flags",
    "resolve_hook",
    "resolve_points",
]
