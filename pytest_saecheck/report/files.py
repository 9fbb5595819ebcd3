"""Reading and atomically writing report files."""

from __future__ import annotations

import json
import os
from typing import Any

from pytest_saecheck.report.schema import json_safe, validate


def dumps(document: Any) -> str:
    """The document as JSON text (UTF-8, sorted keys, no NaN)."""
    return (
        json.dumps(json_safe(document), indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    )


def load_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a result document (raises ``ValueError`` with the reason when it is not one)."""
    try:
        with open(path, encoding="utf-8") as stream:
            document = json.load(stream)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    try:
        validate(document)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return document
