"""Render a result document as one self-contained HTML page.

jinja2 with autoescape on; CSS inline; charts inline SVG (:mod:`~pytest_saecheck.report.charts`); no script.
The page carries a Content-Security-Policy that forbids every network fetch, scripts included, so it opens
offline and cannot phone home even if an extension section misbehaves. The page is a function of the document
alone: a merged document renders exactly like a single run's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jinja2
from markupsafe import Markup

from pytest_saecheck.config import short_id
from pytest_saecheck.defaults import INTERVAL_LEVEL as DEFAULT_INTERVAL_LEVEL
from pytest_saecheck.report import charts
from pytest_saecheck.report.display import column_format, outcome_counts, short_labels
from pytest_saecheck.report.schema import STATUSES

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
)

LOSS_ROWS = (
    ("ce_orig", "original model"),
    ("ce_sae", "SAE spliced in"),
    ("ce_mean", "mean-ablated"),
    ("ce_zero", "zero-ablated"),
)
SCORE_ROWS = (
    ("delta_ce", "ΔCE"),
    ("ce_loss_score", "loss recovered vs zero ablation"),
    ("ce_loss_score_mean_ablation", "loss recovered vs mean ablation"),
    ("ce_rec", "patched loss score"),
    ("compute_fraction", "compute fraction"),
    ("kl_sae", "KL, SAE spliced"),
    ("kl_zero", "KL, zero-ablated"),
    ("kl_div_score", "KL recovered vs zero ablation"),
)
R2_ROWS = (
    ("explained_variance", "R² about the mean (correct)"),
    ("explained_variance_legacy", "legacy per-token R² (SAE Lens)"),
    ("explained_variance_about_zero", "R² about zero (diagnostic: the bug)"),
)
OTHER_ROWS = (
    ("l0", "L0"),
    ("l1", "L1"),
    ("alive_fraction", "alive latents"),
    ("mse", "MSE"),
    ("cosine_sim", "cosine similarity"),
    ("relative_error_norm", "relative error norm"),
    ("l2_ratio", "L2 ratio"),
)
# (metric, heading) of the overview table
OVERVIEW = (
    ("ce_orig", "CE orig"),
    ("ce_sae", "CE SAE"),
    ("delta_ce", "ΔCE"),
    ("ce_loss_score", "score vs zero"),
    ("ce_loss_score_mean_ablation", "score vs mean"),
    ("kl_div_score", "KL score"),
    ("compute_fraction", "compute frac."),
    ("explained_variance", "R²"),
    ("l0", "L0"),
)
# the ratio each normalised score is made of, shown in nats beside it
_DERIVATIONS = {
    "ce_loss_score": ("ce_zero", "ce_sae", "ce_zero", "ce_orig"),
    "ce_loss_score_mean_ablation": ("ce_mean", "ce_sae", "ce_mean", "ce_orig"),
    "kl_div_score": ("kl_zero", "kl_sae", "kl_zero", None),
}


def _metric_info() -> Mapping[str, Any]:
    try:
        from pytest_saecheck.metrics import METRICS
    except Exception:  # the report renders without the engine's dependencies (e.g. merging on a CI box)
        return {}
    return METRICS


def fmt(value: Any, digits: int = 4) -> str:
    """A number for people: ``n/a`` when missing, 4 significant decimals, no spurious precision."""
    if value is None or isinstance(value, bool):
        return "n/a"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return "n/a"
    if number == int(number) and abs(number) < 1e15 and isinstance(value, int):
        return f"{int(number):,}"
    magnitude = abs(number)
    if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
        return f"{number:.{digits - 1}e}"
    return f"{number:.{digits}f}" if magnitude < 10 else f"{number:.{max(1, digits - 2)}f}"


def fmt_interval(interval: Any) -> str:
    if not interval or not isinstance(interval, (list, tuple)) or len(interval) != 2:
        return "n/a"
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"


def fmt_threshold(threshold: Mapping[str, Any] | None) -> str:
    if not threshold:
        return "n/a"
    parts = []
    if threshold.get("min") is not None:
        parts.append(f"≥ {fmt(threshold['min'])}")
    if threshold.get("max") is not None:
        parts.append(f"≤ {fmt(threshold['max'])}")
    if threshold.get("tol") is not None:
        parts.append(f"|difference| ≤ {fmt(threshold['tol'])}")
    return " and ".join(parts) or "n/a"


def baseline_note(metrics: Mapping[str, Any]) -> str | None:
    """What this evaluation's numbers say about mean vs zero ablation as the baseline of a loss-recovered score.

    A baseline that raises the loss more makes the same splice score higher, so it is the laxer one. Compares
    ``ce_mean`` with ``ce_zero`` of this evaluation (nats/token); ``None`` when either is missing.
    """
    mean, zero = metrics.get("ce_mean"), metrics.get("ce_zero")
    if mean is None or zero is None:
        return None
    values = f"L_mean {fmt(mean)} vs L_zero {fmt(zero)} nats/token"
    if mean > zero:
        return f"share of the mean-ablation loss gap recovered; here mean ablation hurts more than zero ablation ({values}), so this baseline is the laxer one"
    if mean < zero:
        return f"share of the mean-ablation loss gap recovered; here mean ablation hurts less than zero ablation ({values}), so this baseline is the stricter one"
    return (
        f"share of the mean-ablation loss gap recovered; here mean and zero ablation hurt equally ({values})"
    )


def _rows(sae: Mapping[str, Any], names: Any, info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per metric, its value and interval written with one number format for the table's columns."""
    rows = []
    metrics, intervals, undefined = sae.get("metrics", {}), sae.get("intervals", {}), sae.get("undefined", {})
    for name, title in names:
        meta = info.get(name)
        derivation = None
        if name in _DERIVATIONS and name in metrics:
            a, b, c, d = _DERIVATIONS[name]
            values = [metrics.get(key) for key in (a, b, c)] + [metrics.get(d) if d else 0.0]
            if all(value is not None for value in values):
                if d:
                    derivation = (
                        f"({fmt(values[0])} − {fmt(values[1])}) / ({fmt(values[2])} − {fmt(values[3])})"
                    )
                else:
                    derivation = f"({fmt(values[0])} − {fmt(values[1])}) / {fmt(values[2])}"
        elif name == "delta_ce" and name in metrics and "ce_orig" in metrics and "ce_sae" in metrics:
            derivation = f"{fmt(metrics['ce_sae'])} − {fmt(metrics['ce_orig'])} nats"
        elif name == "ce_rec" and name in metrics and "ce_orig" in metrics and "ce_sae" in metrics:
            derivation = f"2 − {fmt(metrics['ce_sae'])} / {fmt(metrics['ce_orig'])}"
        rows.append(
            {
                "name": name,
                "title": title,
                "value": metrics.get(name),
                "interval": intervals.get(name),
                "undefined": undefined.get(name),
                "formula": getattr(meta, "formula", None),
                "scale": getattr(meta, "scale", None),
                "derivation": derivation,
            }
        )
        if name == "ce_loss_score_mean_ablation":  # only what this evaluation's numbers show
            rows[-1]["scale"] = baseline_note(metrics)
        law = sae.get("compute_law")
        if name == "compute_fraction" and isinstance(law, Mapping) and law.get("note"):
            rows[-1]["scale"] = f"{rows[-1]['scale']}; {law['note']}" if rows[-1]["scale"] else law["note"]
    show = column_format(
        [row["value"] for row in rows]
        + [bound for row in rows for bound in (row["interval"] or ()) if row["interval"]]
    )
    for row in rows:
        row["value_text"] = show(row["value"])
        row["interval_text"] = _interval_text(row["interval"], show)
    return rows


def _interval_text(interval: Any, show: Any) -> str:
    if not interval or not isinstance(interval, (list, tuple)) or len(interval) != 2:
        return "n/a"
    return f"[{show(interval[0])}, {show(interval[1])}]"


def _sort_key(sae: Mapping[str, Any]) -> tuple[Any, ...]:
    delta = sae.get("metrics", {}).get("delta_ce")
    failed = sum(1 for a in sae.get("assertions", ()) if a.get("outcome") == "failed")
    return (
        STATUSES.index(sae["status"]) if sae.get("status") in STATUSES else len(STATUSES),
        -failed,
        -(delta if delta is not None else -math.inf),
        sae.get("label", ""),
        sae.get("id", ""),
    )


def worst_first(saes: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Failed first, then errors, passed, skipped, not run; within a status the largest ΔCE first."""
    return sorted(saes, key=_sort_key)


def _r2_gaps(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Each R² variant minus R², as text in one number format."""
    r2 = metrics.get("explained_variance")
    gaps = {name: (metrics[name] - r2) if r2 is not None and name in metrics else None for name, _ in R2_ROWS}
    show = column_format(gaps.values())
    return {name: show(gap) for name, gap in gaps.items()}


def assertion_outcome(assertion: Mapping[str, Any]) -> str:
    """An assertion's outcome as the report shows it: a failure inside an xfail test is ``failed (xfail)``.

    A failure inside a test that pytest counted as passed (the test caught it) is ``failed (test passed)``; an
    assertion's own outcome never decides its SAE's status against pytest's verdict on the test.
    """
    outcome = str(assertion.get("outcome"))
    test_outcome = assertion.get("test_outcome")
    if outcome == "failed" and test_outcome == "xfailed":
        return "failed (xfail)"
    if outcome == "failed" and test_outcome in ("passed", "xpassed"):
        return "failed (test passed)"
    return outcome


#: The columns of the "where it hurts" table: (metric, heading).
GROUP_COLUMNS = (("delta_ce", "ΔCE"), ("kl_sae", "KL"), ("explained_variance", "R²"))


def _group_rows(sae: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The token groups, worst ΔCE first (undefined last), each with its share of the added loss."""
    groups = list(sae.get("groups") or ())
    added = {
        group["name"]: (group.get("n_predictions") or 0) * group["metrics"]["delta_ce"]
        for group in groups
        if "delta_ce" in group.get("metrics", {})
    }
    total = sum(added.values())
    rows = []
    for group in groups:
        metrics, intervals = group.get("metrics", {}), group.get("intervals", {})
        rows.append(
            {
                "name": group["name"],
                "n_tokens": group.get("n_tokens"),
                "cells": [
                    (fmt(metrics.get(name)), fmt_interval(intervals.get(name)) if name in intervals else "")
                    for name, _ in GROUP_COLUMNS
                ],
                "share": fmt(added[group["name"]] / total) if group["name"] in added and total > 0 else "n/a",
                "sort": -metrics["delta_ce"] if "delta_ce" in metrics else math.inf,
            }
        )
    return sorted(rows, key=lambda row: row["sort"])


def _view(
    sae: Mapping[str, Any], info: Mapping[str, Any], sections: list[Mapping[str, Any]], short_label: str
) -> dict[str, Any]:
    known = {name for rows in (LOSS_ROWS, SCORE_ROWS, R2_ROWS, OTHER_ROWS) for name, _ in rows}
    extra = sorted(set(sae.get("metrics", {})) - known)
    metrics = sae.get("metrics", {})
    series: list[charts.Series] = []
    if sae.get("kl_by_position"):  # drawn first, wide and light, so the ΔCE line on top stays visible
        series.append(("KL(orig ‖ SAE)", sae["kl_by_position"], charts.PALETTE["secondary"], charts.UNDERLAY))
    if sae.get("delta_ce_by_position"):
        series.append(("ΔCE", sae["delta_ce_by_position"], charts.PALETTE["primary"]))
    band_values = sae.get("delta_ce_by_position_interval")
    level = sae.get("interval_level") or DEFAULT_INTERVAL_LEVEL
    band = (f"ΔCE {level:.0%} interval", band_values, charts.PALETTE["primary"]) if band_values else None
    context = (sae.get("dictionary") or {}).get("context_size")
    markers = [(context - 0.5, f"SAE training context ({context})")] if isinstance(context, int) else []
    passed = sum(1 for a in sae.get("assertions", ()) if a.get("outcome") == "passed")
    assertions = list(sae.get("assertions", ()))
    show = column_format(
        [a.get("value") for a in assertions]
        + [bound for a in assertions for bound in (a.get("interval") or ())]
    )
    return {
        "sae": sae,
        "short_label": short_label,
        "assertion_rows": [
            {
                **a,
                "value_text": show(a.get("value")),
                "interval_text": _interval_text(a.get("interval"), show),
                "shown_outcome": assertion_outcome(a),
            }
            for a in assertions
        ],
        "loss_rows": _rows(sae, LOSS_ROWS, info),
        "score_rows": _rows(sae, SCORE_ROWS, info),
        "r2_rows": _rows(sae, R2_ROWS, info),
        "other_rows": _rows(sae, OTHER_ROWS + tuple((name, name) for name in extra), info),
        "r2_gaps": _r2_gaps(metrics),
        "loss_chart": charts.loss_scale(metrics),
        "position_chart": charts.line_chart(
            series,
            title="ΔCE and KL by token position",
            x_label="token position",
            y_label="nats per token",
            band=band,
            markers=markers,
        )
        if series
        else None,
        "group_rows": _group_rows(sae),
        "task_rows": list(sae.get("tasks") or ()),
        "density_chart": charts.density_histogram(sae.get("latent_density_histogram")),
        "assertions_passed": passed,
        "assertions_total": len(sae.get("assertions", ())),
        "sections": [section for section in sections if section.get("sae") == sae.get("id")],
    }


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pytest_saecheck.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["num"] = fmt
    environment.filters["interval"] = fmt_interval
    environment.filters["threshold"] = fmt_threshold
    return environment


def render_html(document: Mapping[str, Any]) -> str:
    """The report page of a (validated) result document."""
    info = _metric_info()
    prepared = [  # an extension's html is trusted markup (the page's CSP still blocks scripts and fetches)
        {**section, "html": Markup(section["html"]) if section.get("html") is not None else None}
        for section in document.get("report_sections", [])
    ]
    saes = worst_first(list(document.get("saes", [])))
    known_ids = {sae.get("id") for sae in saes}
    labels = short_labels(
        [
            (sae.get("label", ""), sae.get("sae", {}).get("spec"), sae.get("model", {}).get("spec"))
            for sae in saes
        ]
    )
    template = _environment().get_template("report.html.j2")
    return template.render(
        doc=document,
        csp=CONTENT_SECURITY_POLICY,
        views=[_view(sae, info, prepared, label) for sae, label in zip(saes, labels, strict=True)],
        overview_columns=OVERVIEW,
        group_columns=GROUP_COLUMNS,
        overview_formats={
            name: column_format(sae.get("metrics", {}).get(name) for sae in saes) for name, _ in OVERVIEW
        },
        outcome_counts=outcome_counts,
        assertion_outcome=assertion_outcome,
        short_id=short_id,
        general_sections=[s for s in prepared if s.get("sae") not in known_ids],
        packages=sorted((document.get("environment", {}).get("packages") or {}).items()),
    )
