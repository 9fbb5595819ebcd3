"""Render a result document as one self-contained HTML page.

jinja2 with autoescape on; CSS inline; charts inline SVG (:mod:`~pytest_saecheck.report.charts`); no script.
The page carries a Content-Security-Policy that forbids every network fetch, scripts included, so it opens
offline and cannot phone home even if an extension section misbehaves. Sections' HTML is markup only when an
in-process hook returned it in this run (sanitised); from a file it is text (:func:`prepare_sections`). The page
is otherwise a function of the document alone: a merged document renders exactly like a single run's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from markupsafe import Markup

from pytest_saecheck import catalogue
from pytest_saecheck.defaults import INTERVAL_LEVEL as DEFAULT_INTERVAL_LEVEL
from pytest_saecheck.errors import ConfigError
from pytest_saecheck.messages import (
    NOT_AVAILABLE,
    column_format,
    fmt_interval,
    fmt_readable,
    fmt_threshold,
)
from pytest_saecheck.naming import short_id
from pytest_saecheck.report import charts
from pytest_saecheck.report.display import outcome_counts, row_labels, verdict
from pytest_saecheck.report.markup import sanitise_html
from pytest_saecheck.report.schema import STATUSES
from pytest_saecheck.scaling import ScalingLaw

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


def baseline_note(metrics: Mapping[str, Any]) -> str | None:
    """What this evaluation's numbers say about mean vs zero ablation as the baseline of a loss-recovered score.

    A baseline that raises the loss more makes the same splice score higher, so it is the laxer one. Compares
    ``ce_mean`` with ``ce_zero`` of this evaluation (nats/token); ``None`` when either is missing.
    """
    mean, zero = metrics.get("ce_mean"), metrics.get("ce_zero")
    if mean is None or zero is None:
        return None
    values = f"L_mean {fmt_readable(mean)} vs L_zero {fmt_readable(zero)} nats/token"
    if mean > zero:
        return f"share of the mean-ablation loss gap recovered; here mean ablation hurts more than zero ablation ({values}), so this baseline is the laxer one"
    if mean < zero:
        return f"share of the mean-ablation loss gap recovered; here mean ablation hurts less than zero ablation ({values}), so this baseline is the stricter one"
    return (
        f"share of the mean-ablation loss gap recovered; here mean and zero ablation hurt equally ({values})"
    )


def _rows(sae: Mapping[str, Any], names: Any) -> list[dict[str, Any]]:
    """One row per metric, its value and interval written with one number format for the table's columns.

    Formula, scale and the formula evaluated on this SAE's numbers (``derivation``) come from the metric
    catalogue (:mod:`pytest_saecheck.catalogue`).
    """
    rows = []
    metrics, intervals, undefined = sae.get("metrics", {}), sae.get("intervals", {}), sae.get("undefined", {})
    for name, title in names:
        meta = catalogue.get(name)
        rows.append(
            {
                "name": name,
                "title": title,
                "value": metrics.get(name),
                "interval": intervals.get(name),
                "undefined": undefined.get(name),
                "formula": meta.formula if meta is not None else None,
                "scale": meta.scale if meta is not None else None,
                "derivation": catalogue.derivation(name, metrics, fmt_readable) if name in metrics else None,
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
        row["interval_text"] = fmt_interval(row["interval"], show, NOT_AVAILABLE)
    return rows


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
                    (
                        fmt_readable(metrics.get(name)),
                        fmt_interval(intervals.get(name), fmt_readable) if name in intervals else "",
                    )
                    for name, _ in GROUP_COLUMNS
                ],
                "share": fmt_readable(added[group["name"]] / total)
                if group["name"] in added and total > 0
                else "n/a",
                "sort": -metrics["delta_ce"] if "delta_ce" in metrics else math.inf,
            }
        )
    return sorted(rows, key=lambda row: row["sort"])


def _replacement_chart(sae: Mapping[str, Any]) -> Markup | None:
    """R² of each member (a replacement's layers, in order) inside the joint model, and on the original model's
    inputs when recorded (``explained_variance_alone``: a cross-layer transcoder's layers); None without members."""
    members = list((sae.get("members") or {}).values())
    if not members:
        return None
    series: list[charts.Series] = []
    if any("explained_variance_alone" in values for values in members):
        alone = [values.get("explained_variance_alone") for values in members]
        series.append(
            ("R² on the original model's inputs", alone, charts.PALETTE["secondary"], charts.UNDERLAY)
        )
    inside = [values.get("explained_variance") for values in members]
    series.append(("R² inside the replacement", inside, charts.PALETTE["primary"]))
    return charts.line_chart(
        series, title="Reconstruction of each MLP output", x_label="layer (member)", y_label="R²"
    )


def _view(sae: Mapping[str, Any], sections: Sequence[Mapping[str, Any]], short_label: str) -> dict[str, Any]:
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
                "interval_text": fmt_interval(a.get("interval"), show, NOT_AVAILABLE),
                "shown_outcome": assertion_outcome(a),
            }
            for a in assertions
        ],
        "loss_rows": _rows(sae, LOSS_ROWS),
        "score_rows": _rows(sae, SCORE_ROWS),
        "r2_rows": _rows(sae, R2_ROWS),
        "other_rows": _rows(sae, OTHER_ROWS + tuple((name, name) for name in extra)),
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
        "replacement_chart": _replacement_chart(sae),
        "group_rows": _group_rows(sae),
        "task_rows": list(sae.get("tasks") or ()),
        "density_chart": charts.density_histogram(sae.get("latent_density_histogram")),
        "assertions_passed": passed,
        "assertions_total": len(sae.get("assertions", ())),
        "sections": [section for section in sections if section.get("sae") == sae.get("id")],
    }


def compute_charts(saes: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """One chart per scaling law with a fitted curve (a law with an amplitude A), with the ``L_orig`` and
    ``L_sae`` of every SAE evaluated under it (:func:`charts.compute_curve`): ``{"label", "source", "corpus",
    "chart"}`` per law, in the order the SAEs come. Laws without a curve (presets, ``(E, gamma)`` pairs) are
    left out: their ``compute_fraction`` has no absolute compute to draw."""
    groups: dict[str, tuple[ScalingLaw, list[charts.CurveMark]]] = {}
    repeated = {label for label in labels if labels.count(label) > 1}
    for sae, label in zip(saes, labels, strict=True):
        if label in repeated:  # the same SAE evaluated on other tokens (e.g. a baseline's token count)
            label = f"{label} ({sae.get('tokens', {}).get('n_tokens')} tokens)"
        record = sae.get("compute_law")
        if not isinstance(record, Mapping) or "A" not in (record.get("parameters") or {}):
            continue
        try:
            law = ScalingLaw.from_dict(record)
        except ConfigError:
            continue
        if law.form != "compute":
            continue
        metrics = sae.get("metrics", {})
        key = json.dumps(law.to_dict(), sort_keys=True, default=str)
        groups.setdefault(key, (law, []))[1].append((label, metrics.get("ce_orig"), metrics.get("ce_sae")))
    return [
        {
            "label": law.label(),
            "source": law.source,
            "corpus": law.corpus,
            "chart": charts.compute_curve(law, marks),
        }
        for law, marks in groups.values()
    ]


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pytest_saecheck.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["num"] = fmt_readable
    environment.filters["interval"] = lambda interval: fmt_interval(interval, fmt_readable, NOT_AVAILABLE)
    environment.filters["threshold"] = fmt_threshold
    return environment


#: Put before a section's HTML when it is shown as text (it came from a file, not from an in-process hook).
HTML_AS_TEXT = "[this section's HTML came from a result file, so it is shown as text]"


def prepare_sections(sections: Sequence[Mapping[str, Any]], *, markup: bool) -> list[dict[str, Any]]:
    """The report sections as the template shows them.

    With ``markup`` (only for sections an in-process ``pytest_saecheck_report_sections`` hook returned in this
    run) a section's ``html`` is sanitised (:func:`~pytest_saecheck.report.markup.sanitise_html`) and inserted
    as markup. Without it (a document read from a file: ``render``, ``merge``) the ``html`` is shown as escaped
    text, so a result file can never restyle, hide or redirect the report's verdict.
    """
    prepared = []
    for section in sections:
        html = section.get("html")
        if html is None:
            prepared.append({**section, "html": None})
        elif markup:
            prepared.append({**section, "html": Markup(sanitise_html(str(html)))})
        else:
            text = "\n\n".join(part for part in (section.get("text"), HTML_AS_TEXT, str(html)) if part)
            prepared.append({**section, "html": None, "text": text})
    return prepared


def render_html(document: Mapping[str, Any], *, markup_from_hooks: bool = False) -> str:
    """The report page of a (validated) result document.

    ``markup_from_hooks``: the document's ``report_sections`` were returned by in-process hooks in this run
    (the pytest plugin's writer), so their ``html`` is kept as sanitised markup; otherwise (every document read
    from a file) it is shown as text (:func:`prepare_sections`).
    """
    prepared = prepare_sections(document.get("report_sections", []), markup=markup_from_hooks)
    saes = worst_first(list(document.get("saes", [])))
    known_ids = {sae.get("id") for sae in saes}
    labels = row_labels(saes)
    template = _environment().get_template("report.html.j2")
    return template.render(
        doc=document,
        verdict=verdict(saes),
        csp=CONTENT_SECURITY_POLICY,
        views=[_view(sae, prepared, label) for sae, label in zip(saes, labels, strict=True)],
        compute_charts=compute_charts(saes, labels),
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
