"""The one progress display of a pass over tokens."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, desc: str, progress: bool | None) -> Any:
    """A tqdm bar over ``total`` tokens: shown at once with ``progress=True``, never with ``False``; with ``None``
    tqdm's own rule (no bar unless stderr is a terminal, so none leaks into captured output), after two seconds."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=None if progress is None else not progress,
        delay=0.0 if progress else 2.0,
        leave=False,
    )
