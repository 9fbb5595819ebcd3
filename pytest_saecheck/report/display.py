"""How the terminal table and the HTML report show numbers, outcome counts and SAE names (one home for both).

Pure Python: imported by the plugin's terminal summary, so it imports neither torch nor jinja2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pytest_saecheck.config import short_id
from pytest_saecheck.report.schema import OUTCOMES
from pytest_saecheck.report.schema import finite_or_none as _finite

#: Most decimals a fixed-point column gets; a column that needs more is written in scientific notation.
MAX_DECIMALS = 6
MISSING = "n/a"


def column_format(
    values: Iterable[Any], *, significant: int = 4, missing: str = MISSING
) -> Callable[[Any], str]:
    """One number format for every cell of a table column, chosen from all of the column's values.

    Fixed point, with enough decimals that the smallest nonzero magnitude keeps ``significant`` significant
    digits (``0.001777`` beside ``0.99966`` gives ``0.001777`` and ``0.999660``); scientific notation for the whole
    column when that would need more than :data:`MAX_DECIMALS` decimals or a magnitude reaches 10⁶. A column
    of Python ints is written as integers with thousands separators. Missing, NaN and infinite values become
    ``missing``. Returns the formatter (``value -> str``).
    """
    present = [value for value in values if _finite(value) is not None]
    if present and all(isinstance(value, int) and not isinstance(value, bool) for value in present):
        return lambda value: missing if _finite(value) is None else f"{int(value):,}"
    numbers = [float(value) for value in present]
    nonzero = [abs(number) for number in numbers if number != 0]
    scientific = False
    decimals = significant
    if nonzero:
        low, high = min(nonzero), max(nonzero)
        decimals = max(0, significant - 1 - math.floor(math.log10(low)))
        scientific = decimals > MAX_DECIMALS or high >= 1e6
    template = f"{{:.{significant - 1}e}}" if scientific else f"{{:.{decimals}f}}"

    def show(value: Any) -> str:
        number = _finite(value)
        return missing if number is None else template.format(number)

    return show


def outcome_counts(counts: Mapping[str, int]) -> str:
    """``{"passed": 6, "xfailed": 1}`` -> ``"6 passed, 1 xfailed"``, worst outcome first; ``"-"`` when empty."""
    return ", ".join(f"{counts[name]} {name}" for name in OUTCOMES if counts.get(name)) or "-"


def short_labels(subjects: Sequence[tuple[str, str | None, str | None]]) -> list[str]:
    """Short names for table rows: each ``(label, sae spec, model spec)`` with local paths cut to their last part.

    A label that is the plugin's own ``"<sae>"`` or ``"<sae> @ <model>"`` is rebuilt from :func:`short_id` of
    each spec (``/long/path/run-42 @ /models/gpt2-ft`` -> ``run-42 @ gpt2-ft``); any other label is kept. When
    two different labels would get the same short name, both keep their full label.
    """
    shorts = []
    for label, sae, model in subjects:
        short = label
        if sae is not None and label in (sae, f"{sae} @ {model}"):
            short = short_id(sae) if label == sae else f"{short_id(sae)} @ {short_id(str(model))}"
        shorts.append(short)
    owners: dict[str, set[str]] = {}
    for (label, _, _), short in zip(subjects, shorts, strict=True):
        owners.setdefault(short, set()).add(label)
    return [
        short if len(owners[short]) == 1 else label
        for (label, _, _), short in zip(subjects, shorts, strict=True)
    ]
