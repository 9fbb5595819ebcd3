"""Extension points of the saecheck report (pluggy hookspecs; added by the report plugin's ``pytest_addhooks``).

Both hooks run once, on the xdist controller, at the end of the run, after the document has been built and
before the files are written. What they return is stored in the JSON document, so the HTML (also one rendered
later by ``python -m pytest_saecheck.report merge``) is a function of the JSON alone.

Example ``conftest.py``::

    def pytest_saecheck_json_fields(document, config):
        return {"my_team": {"release": "v1.2", "n_saes": len(document["saes"])}}

    def pytest_saecheck_report_sections(document, config):
        return [{"title": "Release notes", "text": "Layer 8 SAE retrained with AuxK."}]
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec
def pytest_saecheck_json_fields(document: dict[str, Any], config: pytest.Config) -> dict[str, Any] | None:
    """Return extra fields for the JSON document, or ``None``.

    ``document`` is the finished result document (read it, do not change it). The returned mapping (plain
    JSON values only) is merged into ``document["extensions"]``; use a key named after your plugin.
    """


@pytest.hookspec
def pytest_saecheck_report_sections(
    document: dict[str, Any], config: pytest.Config
) -> list[dict[str, Any]] | None:
    """Return sections to add to the HTML report, or ``None``.

    Each section is a dict: ``title`` (str), and ``text`` (str, shown escaped, whitespace kept) or ``html``
    (str: markup, sanitised by :func:`~pytest_saecheck.report.markup.sanitise_html`, which keeps text
    structure, tables and links and drops ``style``, ``meta``, ``link``, ``base``, scripts and ``class``/``id``/
    ``style`` attributes, so no section can restyle, hide or redirect the verdict), and optionally ``sae`` (an
    SAE id from ``document["saes"]``) to place it in that SAE's section instead of at the end. Sections are
    stored in ``document["report_sections"]``; a report rendered later from that JSON file (``python -m
    pytest_saecheck.report render/merge``) shows their ``html`` as text, never as markup.
    """
