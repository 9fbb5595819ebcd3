"""The plugin's run-wide facts: the header lines (device, versions, defaults), the same facts as JUnit testsuite
properties, and whether the run is under CI. The end-of-run table is printed by the session object
(:mod:`pytest_saecheck.plugin.session`). Imports no torch."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Any

import pytest

from pytest_saecheck.plugin import profiles
from pytest_saecheck.plugin.settings import SETTINGS, resolve

#: The environment variable CI services set; when it is set (and not "0"/"false"/"no"/"off"), a run in which
#: no SAE was checked exits non-zero.
CI_VARIABLE = "CI"
#: The distributions whose versions the header line and the JUnit testsuite properties give.
VERSIONED = ("pytest-saecheck", "torch", "transformer-lens", "sae-lens")


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
    versions = ", ".join(f"{name} {_version(name)}" for name in VERSIONED)
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


def junit_suite_properties(config: pytest.Config) -> list[tuple[str, str]]:
    """The run-wide facts written as testsuite properties of ``--junitxml``: the library versions of the header
    line, the device setting and the profile (``saecheck.<name>``)."""
    settings = resolve(config)
    found = [(f"saecheck.version.{name}", _version(name)) for name in VERSIONED]
    found.append(("saecheck.device", settings.device or "auto"))
    chosen = profiles.selected(config)
    if chosen is not None:
        found.append(("saecheck.profile", chosen[0]))
    return found
