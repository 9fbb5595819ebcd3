"""``assert_ce_recovery``: a cross-entropy metric of the spliced model against a threshold.

It follows the one check workflow (:mod:`pytest_saecheck.checks.workflow`): validate the thresholds against the
metric catalogue (direction and bounds), measure, build a :class:`CheckOutcome`, :func:`conclude`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

from pytest_saecheck import catalogue
from pytest_saecheck.checks.workflow import (
    CheckOutcome,
    Subject,
    conclude,
    confidence_level,
    finite_number,
    interval_of,
    is_fixture,
    subject_of,
)
from pytest_saecheck.defaults import INTERVAL_LEVEL as DISPLAY_LEVEL
from pytest_saecheck.errors import ConfigError, SAECheckWarning
from pytest_saecheck.messages import fmt, fmt_interval, table
from pytest_saecheck.sequential import PASS, GateDecision, gate_label

#: The metrics ``assert_ce_recovery`` gates (see the catalogue for their formulas and directions).
CE_METRICS: tuple[str, ...] = (
    "ce_loss_score",
    "ce_loss_score_mean_ablation",
    "ce_rec",
    "delta_ce",
    "kl_div_score",
    "kl_sae",
    "compute_fraction",
    "delta_ce_within_context",
    "delta_ce_beyond_context",
    "kl_sae_within_context",
    "kl_sae_beyond_context",
)
#: The raw losses shown above the gated metric in a failure message.
LOSS_ROWS = ("ce_orig", "ce_sae", "ce_zero", "ce_mean")


def validate_ce_thresholds(
    metric: str, min_score: Any, max_value: Any, confidence: Any
) -> tuple[float | None, float | None, float | None]:
    if metric not in CE_METRICS:
        raise ConfigError(
            f"assert_ce_recovery: unknown metric {metric!r}; choose one of {', '.join(CE_METRICS)}"
        )
    if min_score is None and max_value is None:
        raise ConfigError(
            f"assert_ce_recovery: give a threshold: min_score= (the {metric} must be at least this) "
            "or max_value= (at most this)"
        )
    info = catalogue.get(metric)
    low = None if min_score is None else finite_number("min_score", min_score)
    high = None if max_value is None else finite_number("max_value", max_value)
    if low is not None and info is not None and not info.higher_is_better:
        raise ConfigError(
            f"assert_ce_recovery: {metric} is lower-is-better ({info.scale}); bound it with max_value=, not min_score="
        )
    if low is not None and info is not None and info.upper_bound is not None and low > info.upper_bound:
        raise ConfigError(
            f"assert_ce_recovery: min_score={low} can never pass: {metric} is at most {info.upper_bound} "
            f"({info.formula})"
        )
    if high is not None and info is not None and info.lower_bound is not None and high < info.lower_bound:
        raise ConfigError(
            f"assert_ce_recovery: max_value={high} can never pass: {metric} is at least {info.lower_bound} "
            f"({info.formula})"
        )
    if low is not None and high is not None and low > high:
        raise ConfigError(f"assert_ce_recovery: min_score={low} is above max_value={high}")
    level = None if confidence is None else confidence_level("assert_ce_recovery", confidence)
    return low, high, level


def assert_ce_recovery(
    check: Any,
    *,
    metric: str = "ce_loss_score",
    min_score: float | None = None,
    max_value: float | None = None,
    confidence: float | None = None,
    group: str | None = None,
    layer: int | str | None = None,
) -> None:
    """Assert that a cross-entropy metric of the spliced model meets a threshold.

    ``check`` is the ``saecheck`` fixture (or an ``Evaluation``). ``metric`` is one of :data:`CE_METRICS`.
    ``min_score`` bounds it from below, ``max_value`` from above. With ``confidence`` (e.g. 0.95) the gate is the
    bootstrap interval over sequences: its lower bound must reach ``min_score``, its upper bound must stay
    under ``max_value``. Without it, the point estimate is gated. An undefined or NaN metric fails.
    Gating on ``compute_fraction`` under the default scaling law (published for another model family, not
    fitted for this one) raises :class:`ConfigError`: fit or choose the law (the ``scaling_law`` setting).

    ``group`` gates one token group's metric instead (``Evaluation.groups``, from the ``token_groups`` setting or
    ``evaluate(..., token_groups=...)``); per group only ``delta_ce``, ``kl_sae`` and the other
    :data:`~pytest_saecheck.engine.grouping.GROUP_METRICS` exist. An unknown group, or a metric not measured per
    group, raises :class:`ConfigError` naming the choices.
    """
    __tracebackhide__ = True
    low, high, level = validate_ce_thresholds(metric, min_score, max_value, confidence)
    decision = None
    grown = None
    decide = getattr(check, "decide_sequential", None) if is_fixture(check) else None
    if callable(decide):  # the sequential setting: grow the shared evaluation until this gate is decided
        sequential = decide(
            metric,
            low,
            high,
            level if group is None and layer is None else None,
            gate_label(metric, low, high, level),
        )
        if sequential is not None:
            grown, decision = sequential
    evaluation, facts = subject_of(check, grown)
    if layer is not None:
        evaluation, facts = _layer_subject(evaluation, facts, layer)
    if group is not None:
        evaluation, facts = _group_subject(evaluation, facts, group, metric)
    law = getattr(evaluation, "scaling_law", None)
    if metric == "compute_fraction" and law is not None and getattr(law, "default", False):
        raise ConfigError(
            "assert_ce_recovery(metric='compute_fraction') gates on the default scaling law "
            f"({law.label()}); fit the law for your model family (pytest_saecheck.fit_scaling_law, then "
            "scaling_law='path/to/fit.json') or choose one explicitly (scaling_law='chinchilla', 'epoch', 'kaplan' "
            "or (E, gamma))"
        )
    value = facts.metrics.get(metric)
    shown_level = level if level is not None else DISPLAY_LEVEL
    if value is None:
        interval = None
    elif (
        level is None
    ):  # a point gate: the interval is shown, not gated on, so an undefined one is no warning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SAECheckWarning)
            interval = interval_of(evaluation, metric, shown_level)
    else:
        interval = interval_of(evaluation, metric, shown_level)
    if level is not None and value is not None and interval is None:
        # the caller asked for an interval: let the engine's error say why there is none
        evaluation.confidence_interval(metric, level)
    del evaluation, check  # nothing below (nor the exception) may keep tensors or the model alive

    if decision is not None and decision.verdict is not None:  # decided at an interim look
        failures = [] if decision.verdict == PASS else [_interim_failure(metric, low, high, level, decision)]
    else:
        failures = _ce_failures(metric, value, interval, low, high, level, facts)
    if group is not None:
        failures = [f"in token group {group!r}, {failure}" for failure in failures]
    if layer is not None:
        failures = [f"with only layer {layer!r} replaced, {failure}" for failure in failures]
    conclude(
        CheckOutcome(
            assertion="assert_ce_recovery",
            label=facts.label,
            failures=tuple(failures),
            details=tuple(_ce_details(metric, value, interval, shown_level, low, high, level, facts))
            if failures
            else (),
            metric=metric,
            value=value,
            fields={
                **facts.subject,
                "interval": list(interval) if interval is not None else None,
                "interval_level": shown_level,
                "confidence": level,
                "min_score": low,
                "max_value": high,
                "gate": "point estimate" if level is None else "interval bound",
                "n_tokens": facts.n_tokens,
                **({"group": group} if group is not None else {}),
                **({"layer": layer} if layer is not None else {}),
                **({"sequential": _sequential_fields(grown, decision)} if decision is not None else {}),
            },
        )
    )


def _layer_subject(evaluation: Any, facts: Subject, layer: Any) -> tuple[Any, Subject]:
    """(that layer spliced alone, its facts), else :class:`ConfigError` naming the layers there are."""
    from pytest_saecheck.clt import layer_name

    layers = getattr(evaluation, "layers", None) or {}
    key = layer_name(layer) if isinstance(layer, int) and not isinstance(layer, bool) else layer
    if key not in layers:
        choices = (
            f"the layers are {', '.join(map(repr, layers))}"
            if layers
            else "this evaluation is not a replacement model with layers evaluated alone (a cross-layer transcoder)"
        )
        raise ConfigError(f"assert_ce_recovery: unknown layer {layer!r}; {choices}")
    result = layers[key]
    return result, _restricted(facts, result)


def _restricted(facts: Subject, part: Any) -> Subject:
    """``facts`` restricted to one part of the evaluation (a layer spliced alone, a token group)."""
    return dataclasses.replace(
        facts, metrics=dict(part.metrics), undefined=dict(part.undefined), n_tokens=part.n_tokens
    )


def _interim_failure(
    metric: str, low: float | None, high: float | None, level: float | None, decision: GateDecision
) -> str:
    threshold = " and ".join(
        part
        for part in (
            f"min_score {fmt(low)}" if low is not None else "",
            f"max_value {fmt(high)}" if high is not None else "",
        )
        if part
    )
    return (
        f"{metric} breaks {threshold} beyond the sequential rule's interim boundary (corrected t beyond "
        f"±{decision.statistic_boundary:.2f}) at look {decision.look}, after {decision.n_sequences} sequences: "
        f"decided before the ceiling with the {level:.0%} gate's error rate held (pytest_saecheck.sequential)"
    )


def _sequential_fields(evaluation: Any, decision: GateDecision) -> dict[str, Any]:
    summary = dict(getattr(evaluation, "sequential", None) or {})
    summary.pop("decisions", None)
    return {**summary, **decision.to_dict()}


def _group_subject(evaluation: Any, facts: Subject, group: Any, metric: str) -> tuple[Any, Subject]:
    """(the group's result, the facts restricted to it), else :class:`ConfigError` naming the choices."""
    from pytest_saecheck.engine.grouping import GROUP_METRICS

    groups = getattr(evaluation, "groups", None) or {}
    if not isinstance(group, str) or group not in groups:
        choices = (
            f"the groups are {', '.join(map(repr, groups))}"
            if groups
            else "this evaluation has no token groups: set token_groups (e.g. @pytest.mark.saecheck("
            'token_groups="token_class")) or pass token_groups= to evaluate()'
        )
        raise ConfigError(f"assert_ce_recovery: unknown group {group!r}; {choices}")
    if metric not in GROUP_METRICS:
        per_group = ", ".join(name for name in GROUP_METRICS if name in CE_METRICS)
        raise ConfigError(
            f"assert_ce_recovery: {metric} is not measured per token group; with group= choose one of {per_group}"
        )
    result = groups[group]
    return result, _restricted(facts, result)


def _ce_failures(
    metric: str,
    value: float | None,
    interval: tuple[float, float] | None,
    low: float | None,
    high: float | None,
    level: float | None,
    facts: Subject,
) -> list[str]:
    if value is None:
        reason = facts.undefined.get(metric, "the evaluation did not compute it")
        return [f"{metric} is undefined for this SAE: {reason}"]
    if math.isnan(value):
        return [f"{metric} is NaN"]
    failures: list[str] = []
    if low is not None:
        gated = value if level is None else (interval[0] if interval else math.nan)
        what = metric if level is None else f"the lower bound of the {level:.0%} interval of {metric}"
        if not gated >= low:  # NaN fails
            failures.append(f"{what} = {fmt(gated)} is below min_score {fmt(low)}")
    if high is not None:
        gated = value if level is None else (interval[1] if interval else math.nan)
        what = metric if level is None else f"the upper bound of the {level:.0%} interval of {metric}"
        if not gated <= high:
            failures.append(f"{what} = {fmt(gated)} is above max_value {fmt(high)}")
    return failures


def _ce_details(
    metric: str,
    value: float | None,
    interval: tuple[float, float] | None,
    shown_level: float,
    low: float | None,
    high: float | None,
    level: float | None,
    facts: Subject,
) -> list[str]:
    info = catalogue.get(metric)
    threshold = " and ".join(
        part
        for part in (
            f"≥ {fmt(low)}" if low is not None else "",
            f"≤ {fmt(high)}" if high is not None else "",
        )
        if part
    )
    rows: list[tuple[str, ...]] = [("", "value", f"{shown_level:.0%} interval", "threshold")]
    for name in LOSS_ROWS:
        loss = facts.metrics.get(name)
        rows.append(
            (name, fmt(loss), "", "" if loss is not None else facts.undefined.get(name, "not computed"))
        )
    gate = "point estimate" if level is None else ("lower bound" if low is not None else "upper bound")
    rows.append((metric, fmt(value), fmt_interval(interval), f"{threshold} (gated on the {gate})"))
    lines = table(rows)
    lines.append("  " + facts.tokens_line())
    if info is not None:
        lines.append(f"  scale: {metric} = {info.formula}: {info.scale}")
    return lines
