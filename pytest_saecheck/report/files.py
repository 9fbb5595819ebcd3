"""Reading and atomically writing report files."""

from __future__ import annotations

import json
import os
import re
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


def _html_meta(text: str, name: str) -> str | None:
    found = re.search(rf'<meta name="{name}" content="([^"]*)">', text[:4096])
    return (found.group(1) or None) if found else None


def html_run_id(text: str) -> str | None:
    """The run id an HTML report carries (its ``saecheck-run-id`` meta element), or ``None``."""
    return _html_meta(text, "saecheck-run-id")


def html_run_state(text: str) -> str | None:
    """``complete``, ``interrupted`` or ``incomplete``: the state of the run an HTML report shows, or ``None``."""
    return _html_meta(text, "saecheck-run-state")


def check_pair(json_path: str | os.PathLike[str], html_path: str | os.PathLike[str]) -> str:
    """The run id of a JSON result and the HTML report written with it, after checking they are one run's.

    The writer gives both files of a run the same ``run.id`` and replaces them together
    (:func:`pytest_saecheck.files.commit_files`); a pair that disagrees (a run killed between the two
    replacements, a file copied from another run) is refused.

    Raises:
        ValueError: a file is missing or unreadable, carries no run id, or the ids differ (both named).
    """
    document = load_document(json_path)
    json_id = document["run"].get("id")
    try:
        with open(html_path, encoding="utf-8") as stream:
            html_id = html_run_id(stream.read(4096))
    except OSError as error:
        raise ValueError(f"{html_path}: cannot be read ({error.strerror or error})") from None
    if not json_id or not html_id:
        missing = json_path if not json_id else html_path
        raise ValueError(f"{missing}: carries no run id (written by an older pytest-saecheck?)")
    if json_id != html_id:
        raise ValueError(
            f"{json_path} (run {json_id}) and {html_path} (run {html_id}) come from different runs: "
            "the run that wrote one of them was stopped while writing, or one was copied from another run; "
            "rerun, or render the HTML again from the JSON with `python -m pytest_saecheck.report render`"
        )
    return str(json_id)
