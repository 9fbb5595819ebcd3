"""Reading and atomically writing report files."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pytest_saecheck.report.schema import json_safe, validate


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The text goes to a temporary file in the same directory (same file system), is flushed to disk, and
    replaces ``path`` in one ``os.replace``. If anything fails (or the process is killed) before that, ``path``
    is untouched and the temporary file is removed (or, after a kill, left as a hidden ``.*.tmp`` file).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        with contextlib.suppress(OSError):
            os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target


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
