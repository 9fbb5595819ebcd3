"""The one resolution rule of every loader: the ``pytest_saecheck_load_*`` hooks first, then the built-ins.

A hook implementation returns the loaded object, or None to pass; the first non-None answer wins (pluggy's
``firstresult``). When every hook passes, the built-in loader runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pytest_saecheck import running

T = TypeVar("T")


def hooks_then_builtin(ask_hook: Callable[[Any], T | None], builtin: Callable[[], T]) -> tuple[T, bool]:
    """``(object, from_hook)``: ``ask_hook(hook_relay)`` when a hook answers, else ``builtin()``.

    ``ask_hook`` receives the active plugin manager's hook relay (``running.active_hook()``) and calls one
    ``pytest_saecheck_load_*`` hook on it; outside a pytest session there is no relay and the built-in runs.
    """
    hook = running.active_hook()
    if hook is not None:
        answer = ask_hook(hook)
        if answer is not None:
            return answer, True
    return builtin(), False
