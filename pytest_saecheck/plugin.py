"""The pytest plugin (entry point ``saecheck``). Imports no torch at import time."""

from __future__ import annotations

import pytest

from pytest_saecheck import hookspecs


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "saecheck(model=..., sae=..., tokens=..., n_tokens=..., context_size=..., ...): "
        "configure the SAE under test for the saecheck fixtures",
    )
    hookspecs.set_active_hook(config.hook)


def pytest_unconfigure(config: pytest.Config) -> None:
    hookspecs.set_active_hook(None)
