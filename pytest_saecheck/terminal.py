"""Terminal output: the header line and the end-of-run table of every SAE checked.

The table is built from ``report.saecheck_records`` as reports arrive (on the xdist controller too, since the
records are plain values). Imports no torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pytest

from pytest_saecheck.config import SETTINGS, resolve, short_id
from pytest_saecheck.report.display import column_format, outcome_counts, short_labels
from pytest_saecheck.report.schema import count

HEADLINE = (
    ("ce_loss_score", "CE score"),
    ("delta_ce", "ΔCE"),
    ("kl_div_score", "KL score"),
    ("explained_variance", "R²"),
    ("l0", "L0"),
)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def header_lines(config: pytest.Config) -> list[str]:
    """``saecheck: device=..., versions, defaults``, resolved from the command line and ini (markers excluded)."""
    settings = resolve(config)
    if settings.device is not None:
        device = f"{settings.device} ({settings.sources.get('device')})"
    elif "torch" in sys.modules:
        torch = sys.modules["torch"]
        device = ("cuda" if torch.cuda.is_available() else "cpu") + " (auto)"
    else:
        device = "auto: cuda when available, else cpu"
    versions = ", ".join(
        f"{name} {_version(name)}" for name in ("pytest-saecheck", "torch", "transformer-lens", "sae-lens")
    )
    defaults = ", ".join(
        f"{setting.name}={_show(getattr(settings, setting.name), setting.name)}"
        for setting in SETTINGS
        if setting.name != "device"
    )
    return [f"saecheck: device={device}; {versions}", f"saecheck defaults: {defaults}"]


def _show(value: Any, name: str) -> str:
    if value is None:
        return {
            "context_size": "from SAE",
            "dtype": "float32",
            "tokens": "SAE's dataset",
            "scaling_law": "none",
            "activation_scaler": "auto",
        }.get(name, "-")
    if isinstance(value, bool):
        return str(value).lower()
    if name == "scaling_law":
        return value.spec + ("" if value.fitted else " (not fitted)")
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


@dataclass
class SubjectRow:
    label: str
    sae: str | None = None  # the specs as given: the table shows their short ids
    model_spec: str | None = None
    device: str | None = None
    model: str | None = None
    tokens: str | None = None
    n_tokens: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    compute_law: dict[str, Any] | None = None
    outcomes: dict[str, str] = field(default_factory=dict)  # nodeid -> outcome


class Summary:
    """Gathers records from test reports; renders one row per SAE checked."""

    def __init__(self) -> None:
        self.rows: dict[str, SubjectRow] = {}
        self._subjects_by_node: dict[str, set[str]] = {}

    def add_report(self, report: pytest.TestReport) -> None:
        for entry in getattr(report, "saecheck_records", None) or ():
            if entry.get("label") is None:  # e.g. reported metrics checked without an SAE under test
                continue
            label = str(entry["label"])
            if label not in self.rows and entry.get("kind") not in ("subject", "evaluation"):
                continue  # rows are the SAEs of the saecheck fixture; bare assertions only add outcomes
            row = self.rows.setdefault(label, SubjectRow(label))
            row.device = entry.get("device") or row.device
            row.sae = entry.get("sae") or row.sae
            row.model_spec = entry.get("model") or row.model_spec
            self._subjects_by_node.setdefault(report.nodeid, set()).add(label)
            if entry.get("kind") == "evaluation":
                row.model = entry.get("resolved_model") or row.model
                row.tokens = entry.get("resolved_tokens") or row.tokens
                row.n_tokens = entry.get("n_tokens")
                row.metrics = dict(entry.get("metrics") or {})
                row.compute_law = entry.get("compute_law")
        outcome = _outcome(report)
        if outcome is None:
            return
        for label in self._subjects_by_node.get(report.nodeid, ()):
            previous = self.rows[label].outcomes.get(report.nodeid)
            if previous in (None, "passed") or outcome == "error":
                self.rows[label].outcomes[report.nodeid] = outcome

    def lines(self) -> list[str]:
        """The table: one row per SAE, local paths cut to their last part, one number format per column."""
        if not self.rows:
            return []
        rows = list(self.rows.values())
        labels = short_labels([(row.label, row.sae, row.model_spec) for row in rows])
        formats = {
            name: column_format((row.metrics.get(name) for row in rows), missing="-") for name, _ in HEADLINE
        }
        header = ["SAE", "model", "tokens", "n_tokens", *(title for _, title in HEADLINE), "tests"]
        table = [header]
        for label, row in zip(labels, rows, strict=True):
            cells = [label, _short(row.model), _short(row.tokens), str(row.n_tokens or "-")]
            cells += [formats[name](row.metrics.get(name)) for name, _ in HEADLINE]
            cells.append(outcome_counts(count(row.outcomes.values())))
            table.append(cells)
        return _render(table) + _compute_law_notes(labels, rows)


def _compute_law_notes(labels: Sequence[str], rows: Sequence[SubjectRow]) -> list[str]:
    """Under the table: each law not fitted for its model that a compute_fraction (in the JSON and HTML reports)
    rests on, then each such SAE's value with its band across the presets; and any value above 1 (the splice
    lowered the loss), so the number is never read without its caveat."""
    by_law: dict[tuple[str, bool], list[str]] = {}
    for label, row in zip(labels, rows, strict=True):
        law, value = row.compute_law, row.metrics.get("compute_fraction")
        if not isinstance(law, dict) or value is None or (law.get("fitted") and not law.get("above_one")):
            continue
        text = f"  {label}: compute_fraction {value:.3g}"
        band = law.get("band")
        if not law.get("fitted") and isinstance(band, list) and len(band) == 2:
            text += f" (published presets: {band[0]:.3g} to {band[1]:.3g})"
        if law.get("above_one"):
            text += "; above 1: the splice lowered the loss, so it is not a fraction of training compute"
        by_law.setdefault((str(law.get("label")), bool(law.get("fitted"))), []).append(text)
    lines = []
    for (label, fitted), entries in by_law.items():
        fit = "" if fitted else "; fit your family's law (pytest_saecheck.fit_scaling_law)"
        lines.append(f"saecheck: compute_fraction uses the scaling law {label}{fit}")
        lines.extend(entries)
    return lines


def _short(spec: str | None) -> str:
    return "-" if spec is None else short_id(spec)


def _outcome(report: pytest.TestReport) -> str | None:
    outcome = report.outcome  # read as the report collector reads it (a report-like object will do)
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            return "xfailed" if outcome == "skipped" else "xpassed"
        return outcome
    if outcome == "failed":
        return "error"
    if report.when == "setup" and outcome == "skipped":
        return "skipped"
    return None


def _render(table: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for number, row in enumerate(table):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines
