"""The run's result as JSON (``--saecheck-json``) and as one self-contained HTML page (``--saecheck-report``).

- :mod:`~pytest_saecheck.report.collect` turns the records that ride on test reports into the JSON document;
- :mod:`~pytest_saecheck.report.schema` defines that document (versioned JSON Schema, validation,
  normalisation for comparisons) and derives its summary fields;
- :mod:`~pytest_saecheck.report.merge` merges the documents of sharded runs;
- :mod:`~pytest_saecheck.report.html` renders a document as HTML (jinja2, autoescape, inline CSS and SVG);
- :mod:`~pytest_saecheck.report.plugin` is the pytest plugin that writes both files on the xdist controller;
- ``python -m pytest_saecheck.report merge a.json b.json --html out.html --json out.json``.

Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "build_document",
    "comparable",
    "load_document",
    "merge_documents",
    "render_html",
    "validate",
    "write_atomic",
]

_EXPORTS = {
    "SCHEMA_VERSION": "pytest_saecheck.report.schema",
    "comparable": "pytest_saecheck.report.schema",
    "validate": "pytest_saecheck.report.schema",
    "build_document": "pytest_saecheck.report.collect",
    "merge_documents": "pytest_saecheck.report.merge",
    "load_document": "pytest_saecheck.report.files",
    "write_atomic": "pytest_saecheck.report.files",
    "render_html": "pytest_saecheck.report.html",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
