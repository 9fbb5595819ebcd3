"""Terminal output: the end-of-run table of every SAE checked (the third renderer beside JSON and HTML).

The table is rendered from the run's result document (:mod:`pytest_saecheck.report.collect` gathers the records
that ride on the test reports, on the xdist controller too), as the JSON file and the HTML page are. Imports no
torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pytest_saecheck.messages import column_format, fmt_significant, table
from pytest_saecheck.naming import short_id
from pytest_saecheck.report.display import outcome_counts, row_labels

HEADLINE = (
    ("ce_loss_score", "CE score"),
    ("delta_ce", "ΔCE"),
    ("kl_div_score", "KL score"),
    ("explained_variance", "R²"),
    ("l0", "L0"),
)


def summary_lines(document: Mapping[str, Any]) -> list[str]:
    """The end-of-run table of a finalised result document: one row per SAE entry, in the document's order.

    A third renderer of the document beside the JSON file and the HTML page, so the three show the same SAEs
    with the same labels (:func:`~pytest_saecheck.report.display.row_labels`), numbers and test counts. Local
    paths are cut to their last part; each metric column has one number format. Empty when no SAE was checked.
    """
    saes = list(document.get("saes") or ())
    if not saes:
        return []
    labels = row_labels(saes)
    formats = {
        name: column_format((sae["metrics"].get(name) for sae in saes), missing="-") for name, _ in HEADLINE
    }
    rows = [["SAE", "model", "tokens", "n_tokens", *(title for _, title in HEADLINE), "tests"]]
    for label, sae in zip(labels, saes, strict=True):
        n_tokens = sae["tokens"].get("n_tokens")
        cells = [label, _short(sae["model"].get("resolved")), _short(sae["tokens"].get("source"))]
        cells.append(str(n_tokens) if n_tokens else "-")
        cells += [formats[name](sae["metrics"].get(name)) for name, _ in HEADLINE]
        cells.append(outcome_counts(sae.get("outcomes") or {}))
        rows.append(cells)
    return table(rows, indent="", rule=True) + _compute_law_notes(labels, saes)


def _compute_law_notes(labels: Sequence[str], saes: Sequence[Mapping[str, Any]]) -> list[str]:
    """Under the table: each law not fitted for its model that a compute_fraction (in the JSON and HTML reports)
    rests on, then each such SAE's value with its band across the presets; and any value above 1 (the splice
    lowered the loss), so the number is never read without its caveat."""
    by_law: dict[tuple[str, bool], list[str]] = {}
    for label, sae in zip(labels, saes, strict=True):
        law, value = sae.get("compute_law"), sae["metrics"].get("compute_fraction")
        if not isinstance(law, Mapping) or value is None or (law.get("fitted") and not law.get("above_one")):
            continue
        text = f"  {label}: compute_fraction {fmt_significant(value, 3, apart_from=1.0)}"
        band = law.get("band")
        if not law.get("fitted") and isinstance(band, list) and len(band) == 2:
            text += f" (published presets: {fmt_significant(band[0], 3)} to {fmt_significant(band[1], 3)})"
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
