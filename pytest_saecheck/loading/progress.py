"""Progress displays: one rule for when a bar is shown, used by token loading and the evaluation pass.

A bar is shown only on a terminal (``tqdm(disable=None)``: no carriage-return spam in CI logs), never when the
run is quiet (``pytest -q`` sets :func:`set_quiet`), and only after :data:`DELAY_S` seconds, so fast work
prints nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

DELAY_S = 2.0
"""Seconds before a bar appears."""

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence every progress bar of this process (the plugin calls it under ``-q``)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def loading_bar(total: int, desc: str, *, unit: str = "tok", shown: bool | None = None) -> Iterator[Any]:
    """A bar over ``total`` units; ``shown=False`` hides it, ``True`` shows it at once (on a terminal)."""
    from tqdm.auto import tqdm

    disable: bool | None = True if (shown is False or _quiet) else None
    bar = tqdm(
        total=total,
        unit=unit,
        unit_scale=True,
        desc=desc,
        disable=disable,
        delay=0.0 if shown else DELAY_S,
        leave=False,
    )
    try:
        yield bar
    finally:
        bar.close()
