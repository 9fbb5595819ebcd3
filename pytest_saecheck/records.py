"""Results of saecheck assertions and evaluations, carried on pytest's test reports as plain Python values.

Each assertion appends one record (a ``dict`` of str, int, float, bool, None, lists and dicts) to the running
test's stash; the plugin moves them onto the report of the phase that produced them as
``report.saecheck_records``. Plain types survive xdist's report serialisation, so the controller sees them.
"""

from __future__ import annotations

from typing import Any

import pytest

RECORDS_KEY = pytest.StashKey[list[dict[str, Any]]]()
REPORT_ATTRIBUTE = "saecheck_records"

_current_item: pytest.Item | None = None


def set_current_item(item: pytest.Item | None) -> None:
    """Remember the test being run (set by the plugin around each test's protocol)."""
    global _current_item
    _current_item = item


def current_item() -> pytest.Item | None:
    return _current_item


def plain(value: Any) -> Any:
    """``value`` as plain Python types (numbers, strings, lists, dicts); anything else becomes its ``str``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return plain(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number


def record(entry: dict[str, Any], item: pytest.Item | None = None) -> None:
    """Attach ``entry`` to ``item`` (default: the running test). Outside pytest this does nothing."""
    target = item if item is not None else _current_item
    if target is None:
        return
    target.stash.setdefault(RECORDS_KEY, []).append(plain(entry))


def take(item: pytest.Item) -> list[dict[str, Any]]:
    """Remove and return the records ``item`` has gathered since the last call."""
    records = item.stash.get(RECORDS_KEY, [])
    item.stash[RECORDS_KEY] = []
    return records
