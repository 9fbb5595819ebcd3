"""The one home of assertion message formatting: numbers, tables, failure headers and the tokens line.

Every assertion's failure message reads the same way::

    <assertion> failed for <label>: <failure>; <failure>
      <table>
      <context lines>

Numbers are shown with :func:`fmt` (4 decimals; 4 significant digits from 1000 on; ``nan``; ``—`` for a
missing value) unless a check needs full precision (:func:`fmt_exact`, 9 significant digits, for
implementation-vs-reference comparisons).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

INDENT = "  "


def fmt(value: float | None) -> str:
    """``value`` for a message: ``—`` when missing, ``nan``, 4 decimals, or 4 significant digits from 1000 on."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def fmt_exact(value: float | None) -> str:
    """``value`` with 9 significant digits (implementation-vs-reference comparisons), ``—`` when missing."""
    if value is None:
        return "—"
    return f"{value:.9g}"


def fmt_interval(interval: Sequence[float] | None) -> str:
    """``[low, high]`` formatted with :func:`fmt`, or ``—`` when there is no interval."""
    if interval is None:
        return "—"
    low, high = interval
    return f"[{fmt(low)}, {fmt(high)}]"


def table(rows: Sequence[Sequence[str]], indent: str = INDENT, *, rule: bool = False) -> list[str]:
    """Left-aligned columns, two spaces apart, each line indented; trailing spaces removed.

    ``rows`` is a header row followed by data rows, all of the same length. ``rule`` underlines the header
    with dashes (the terminal summary's table).
    """
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if rule:
        lines.insert(1, indent + "  ".join("-" * width for width in widths))
    return lines


def failure_header(assertion: str, label: str | None, failures: Sequence[str]) -> str:
    """``"<assertion> failed for <label>: <failure>; <failure>"`` (``label`` omitted when unknown)."""
    subject = f" for {label}" if label else ""
    return f"{assertion} failed{subject}: " + "; ".join(failures)


def tokens_line(
    n_tokens: int | None, n_sequences: int | None, seq_len: int | None, exclude_bos: bool | None
) -> str:
    """How many tokens were evaluated, their shape and whether position 0 was excluded."""
    if n_tokens is None:
        return "tokens: unknown"
    bos = {True: ", position 0 (BOS) excluded", False: ", position 0 included", None: ""}[exclude_bos]
    shape = f" ({n_sequences} sequences × {seq_len})" if n_sequences is not None else ""
    return f"tokens: {n_tokens:,} evaluated{shape}{bos}"
