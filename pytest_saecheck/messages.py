"""The one home of assertion message formatting: numbers, tables, failure headers and the tokens line.

Every assertion's failure message reads the same way::

    <assertion> failed for <label>: <failure>; <failure>
      <table>
      <context lines>

Numbers are shown with :func:`fmt` (4 decimals; 4 significant digits from 1000 on; ``nan``; ``—`` for a
missing value) unless a check needs full precision (:func:`fmt_exact`, 9 significant digits, for
implementation-vs-reference comparisons) or a few significant digits (:func:`fmt_significant`, tolerances).

The report's tables (terminal and HTML) format numbers here too: :func:`fmt_readable` for a single cell,
:func:`column_format` for a column (one format for every cell of it), :func:`fmt_interval` and
:func:`fmt_threshold` with either. Pure Python: imports neither numpy, torch nor jinja2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

INDENT = "  "
#: A missing number in an assertion message.
MISSING = "—"
#: A missing number in the report (terminal and HTML tables).
NOT_AVAILABLE = "n/a"
#: Most decimals a fixed-point column gets; a column that needs more is written in scientific notation.
MAX_DECIMALS = 6


def finite_or_none(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (missing, a bool, not a number, NaN or infinite)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def fmt(value: float | None) -> str:
    """``value`` for a message: ``—`` when missing, ``nan``, 4 decimals, or 4 significant digits from 1000 on."""
    if value is None:
        return MISSING
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def fmt_exact(value: float | None) -> str:
    """``value`` with 9 significant digits (implementation-vs-reference comparisons), ``—`` when missing."""
    if value is None:
        return MISSING
    return f"{value:.9g}"


def fmt_significant(value: float | None, digits: int = 2, *, apart_from: float | None = None) -> str:
    """``value`` with ``digits`` significant digits (tolerances, notes: ``0.0024``, ``1e-05``), ``—`` when missing.

    ``apart_from``: a value that is not it is never shown as it (more digits, up to 9, are given as needed):
    a compute_fraction of 1.002 reads ``1.002``, not ``1``, next to "above 1".
    """
    if value is None:
        return MISSING
    text = f"{value:.{digits}g}"
    while apart_from is not None and value != apart_from and float(text) == apart_from and digits < 9:
        digits += 1
        text = f"{value:.{digits}g}"
    return text


def fmt_readable(value: Any, digits: int = 4) -> str:
    """A number for a report cell: ``n/a`` when missing or not finite, an int with thousands separators,
    scientific notation below 1e-3 and from 1e5, else ``digits`` decimals (``digits − 2`` from 10 on)."""
    if value is None or isinstance(value, bool):
        return NOT_AVAILABLE
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return NOT_AVAILABLE
    if number == int(number) and abs(number) < 1e15 and isinstance(value, int):
        return f"{int(number):,}"
    magnitude = abs(number)
    if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
        return f"{number:.{digits - 1}e}"
    return f"{number:.{digits}f}" if magnitude < 10 else f"{number:.{max(1, digits - 2)}f}"


def fmt_tick(value: float) -> str:
    """A chart's axis label or annotation: ``0``, 3 significant digits, whole numbers from 10 on, scientific
    notation from 1000 and below 0.001."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000 or magnitude < 0.001:
        return f"{value:.1e}"
    if magnitude >= 10:
        return f"{value:.0f}" if value == round(value) else f"{value:.1f}"
    return f"{value:.3g}"


def fmt_interval(interval: Any, show: Callable[[Any], str] = fmt, missing: str = MISSING) -> str:
    """``[low, high]`` with each bound formatted by ``show``, or ``missing`` when there is no interval."""
    if not interval or not isinstance(interval, (list, tuple)) or len(interval) != 2:
        return missing
    low, high = interval
    return f"[{show(low)}, {show(high)}]"


def fmt_threshold(threshold: Mapping[str, Any] | None, show: Callable[[Any], str] = fmt_readable) -> str:
    """A report's threshold ``{"min", "max", "tol"}`` as ``≥ a and ≤ b`` (``n/a`` when it has none)."""
    if not threshold:
        return NOT_AVAILABLE
    parts = []
    if threshold.get("min") is not None:
        parts.append(f"≥ {show(threshold['min'])}")
    if threshold.get("max") is not None:
        parts.append(f"≤ {show(threshold['max'])}")
    if threshold.get("tol") is not None:
        parts.append(f"|difference| ≤ {show(threshold['tol'])}")
    return " and ".join(parts) or NOT_AVAILABLE


def column_format(
    values: Iterable[Any], *, significant: int = 4, missing: str = NOT_AVAILABLE
) -> Callable[[Any], str]:
    """One number format for every cell of a table column, chosen from all of the column's values.

    Fixed point, with enough decimals that the smallest nonzero magnitude keeps ``significant`` significant
    digits (``0.001777`` beside ``0.99966`` gives ``0.001777`` and ``0.999660``); scientific notation for the whole
    column when that would need more than :data:`MAX_DECIMALS` decimals or a magnitude reaches 10⁶. A column
    of Python ints is written as integers with thousands separators. Missing, NaN and infinite values become
    ``missing``. Returns the formatter (``value -> str``).
    """
    present = [value for value in values if finite_or_none(value) is not None]
    if present and all(isinstance(value, int) and not isinstance(value, bool) for value in present):
        return lambda value: missing if finite_or_none(value) is None else f"{int(value):,}"
    numbers = [float(value) for value in present]
    nonzero = [abs(number) for number in numbers if number != 0]
    scientific = False
    decimals = significant
    if nonzero:
        low, high = min(nonzero), max(nonzero)
        decimals = max(0, significant - 1 - math.floor(math.log10(low)))
        scientific = decimals > MAX_DECIMALS or high >= 1e6
    template = f"{{:.{significant - 1}e}}" if scientific else f"{{:.{decimals}f}}"

    def show(value: object) -> str:
        number = finite_or_none(value)
        return missing if number is None else template.format(number)

    return show


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
