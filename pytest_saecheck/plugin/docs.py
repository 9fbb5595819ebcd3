"""The generated parts of the documentation: tables written from the code, kept in step by a test.

Each generated block sits between two HTML comments in a Markdown page, ``<!-- NAME: generated ... -->`` and
``<!-- /NAME -->``; :func:`with_tables` rewrites every block a text holds, and ``python -m
pytest_saecheck.plugin.docs PAGE.md ...`` rewrites pages in place (``tests/test_docs.py`` fails when a committed
page differs from what the code generates). The blocks:

- ``settings-table``: every setting of :data:`~pytest_saecheck.plugin.settings.SETTINGS` with its marker key,
  option, ini key and help (which states the default), then the run options that are not settings;
- ``metric-table``: the metric catalogue (:func:`pytest_saecheck.catalogue.markdown_table`);
- ``json-schema``: the result document's JSON Schema (:data:`pytest_saecheck.report.schema.JSON_SCHEMA`);
- ``sae-table``: the fields of the document's SAE entry, from that schema (``report/SCHEMA.md``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_saecheck import catalogue
from pytest_saecheck.plugin.settings import OVERRIDE_OPTION, SETTINGS

#: Options of the plugin that are not per-test settings: ``(option, ini key or "", meaning)``.
RUN_OPTIONS: tuple[tuple[str, str, str], ...] = (
    (f"{OVERRIDE_OPTION} NAME=VALUE", "", "force a setting on every test, over markers (repeatable)"),
    (
        "--saecheck-profile NAME",
        "",
        "use a named set of settings from the configuration file (profiles: marker > command line > profile > ini)",
    ),
    ("--saecheck-json PATH", "saecheck_json", "write the run's result document (JSON)"),
    ("--saecheck-report PATH", "saecheck_report", "write the HTML report"),
    (
        "--saecheck-saebench-json DIR",
        "saecheck_saebench_json",
        "write each evaluated SAE's core numbers in SAEBench's core result format, one file each",
    ),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    """The settings reference: one row per setting, then the run options."""
    lines = ["| marker key | option | ini key | meaning and default |", "| --- | --- | --- | --- |"]
    for setting in SETTINGS:
        lines.append(f"| `{setting.name}` | `{setting.option}` | `{setting.ini}` | {_cell(setting.help)} |")
    lines += ["", "| run option | ini key | meaning |", "| --- | --- | --- |"]
    for option, ini, meaning in RUN_OPTIONS:
        lines.append(f"| `{option}` | {f'`{ini}`' if ini else '—'} | {_cell(meaning)} |")
    return "\n".join(lines)


def json_schema() -> str:
    """The result document's JSON Schema, as a fenced JSON block."""
    from pytest_saecheck.report.schema import JSON_SCHEMA

    return "```json\n" + json.dumps(JSON_SCHEMA, indent=1, sort_keys=True, ensure_ascii=False) + "\n```"


def sae_table() -> str:
    """The result document's SAE entry, field by field (:func:`pytest_saecheck.report.schema.sae_table`)."""
    from pytest_saecheck.report.schema import sae_table

    return sae_table()


TABLES: dict[str, Callable[[], str]] = {
    "settings-table": settings_table,
    "metric-table": catalogue.markdown_table,
    "json-schema": json_schema,
    "sae-table": sae_table,
}


def with_tables(text: str) -> str:
    """``text`` with every generated block it holds (any of :data:`TABLES`) rewritten from the code."""
    for name, generate in TABLES.items():
        opening = f"<!-- {name}:"
        start = text.find(opening)
        while start != -1:
            body_start = text.index("-->", start) + len("-->")
            closing = f"<!-- /{name} -->"
            end = text.find(closing, body_start)
            if end == -1:
                raise ValueError(f"the generated block {name!r} has no closing {closing!r}")
            text = text[:body_start] + "\n" + generate() + "\n" + text[end:]
            start = text.find(opening, body_start)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the generated blocks of the given pages in place."""
    for name in sys.argv[1:] if argv is None else argv:
        path = Path(name)
        path.write_text(with_tables(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
