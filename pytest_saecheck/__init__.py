"""pytest-saecheck: acceptance tests for sparse autoencoders.

The public API is re-exported here lazily: importing ``pytest_saecheck`` (which pytest does for every run
through the plugin entry point) must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pytest_saecheck.errors import (
    ConfigError,
    DegenerateActivationsError,
    EmptyTokenSetError,
    HookNotFoundError,
    LoadError,
    NonFiniteError,
    SAECheckError,
    ShapeMismatchError,
    TrainingCheckError,
)

__version__ = "0.1.0.dev0"

_LAZY: dict[str, str] = {
    "evaluate": "pytest_saecheck.engine",
    "Evaluation": "pytest_saecheck.engine",
    "TokenPolicy": "pytest_saecheck.engine",
}

if TYPE_CHECKING:
    from pytest_saecheck.engine import Evaluation, TokenPolicy, evaluate


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pytest_saecheck' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ConfigError",
    "DegenerateActivationsError",
    "EmptyTokenSetError",
    "Evaluation",
    "HookNotFoundError",
    "LoadError",
    "NonFiniteError",
    "SAECheckError",
    "ShapeMismatchError",
    "TokenPolicy",
    "TrainingCheckError",
    "__version__",
    "evaluate",
]
