"""The one resolution rule of every loader: the ``pytest_saecheck_load_*`` hooks first, then the built-ins.

A hook implementation returns the loaded object, or None to pass; the first non-None answer wins (pluggy's
``firstresult``). When every hook passes, the built-in loader runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pytest_saecheck import extensions

T = TypeVar("T")


def hooks_then_builtin(ask_hook: Callable[[Any], T | None], builtin: Callable[[], T]) -> tuple[T, bool]:
    """``(object, from_hook)``: ``ask_hook(hook_relay)`` when a hook answers, else ``builtin()``.

    ``ask_hook`` receives the hook relay (:func:`pytest_saecheck.extensions.relay`: the pytest session's, or
    outside pytest the package's own, which holds the plug-ins advertised by entry point) and calls one
    ``pytest_saecheck_load_*`` hook on it.
    """
    answer = ask_hook(extensions.relay())
    if answer is not None:
        return answer, True
    return builtin(), False
