"""Token groups: the evaluation's metrics restricted to labelled positions ("where the splice hurts").

A grouping labels every position of the evaluation tokens with a group id (``labels[i, t]`` in
``0..n_groups-1``, or ``-1`` for no group). Position ``t`` contributes to its group

- its reconstruction terms (R², MSE, cosine similarity, ...), when the token policy keeps it;
- its KL term ``KL(p_orig ‖ p_sae)`` at ``t``;
- its cross-entropy term: the prediction made at ``t`` of token ``t + 1``.

The accumulator sums each of these per sequence and per group (float64, one index-add per batch), so a group's
metrics are the ordinary metrics (:func:`pytest_saecheck.metrics.metrics_from_sums`) of its sums, and its
intervals the ordinary paired bootstrap over sequences (:func:`pytest_saecheck.stats.bootstrap_intervals`).
When every kept position has a group, the groups' token-weighted metrics add up to the whole:
``Σ_g n_g · ΔCE_g = n · ΔCE``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pytest_saecheck.errors import ConfigError, ShapeMismatchError
from pytest_saecheck.metrics import metrics_from_sums
from pytest_saecheck.stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, bootstrap_intervals
from pytest_saecheck.sums import Sum

GROUP_PREFIX = "group/"
"""Accumulator keys of per-sequence, per-group sums (``[n_sequences, n_groups, ...]``)."""

GROUP_METRICS: tuple[str, ...] = (
    "ce_orig",
    "ce_sae",
    "delta_ce",
    "kl_sae",
    "explained_variance",
    "cosine_sim",
    "relative_error_norm",
    "mse",
    "l0",
)
"""The metrics measured per group (reconstruction metrics only where the evaluation has a reconstruction)."""

CE_GROUP_METRICS = frozenset({"ce_orig", "ce_sae", "delta_ce"})


def resolve_labels(
    token_groups: Any, group_names: Sequence[str] | None, tokens: torch.Tensor
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """``(labels [n_sequences, seq_len] int64 on the CPU, names)`` from ``evaluate``'s ``token_groups``.

    ``token_groups`` is an integer tensor shaped like ``tokens``, or a callable of the tokens returning one (a
    :class:`pytest_saecheck.groups.Grouping` also brings its names). ``group_names[k]`` names label ``k``
    (default: the grouping's names, else ``"0"``, ``"1"``, ...). Raises :class:`ConfigError` (a bad name list,
    a label without a name, a callable that fails) and :class:`ShapeMismatchError` (wrong shape or dtype).
    """
    names: Sequence[str] | None = group_names
    if names is None:
        names = getattr(token_groups, "names", None)
    labels = token_groups
    if callable(token_groups) and not isinstance(token_groups, torch.Tensor):
        labels = token_groups(tokens)
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise ShapeMismatchError(
                f"token_groups must be an integer tensor [n_sequences, seq_len] (or a callable of the tokens "
                f"returning one), got {type(labels).__name__}"
            ) from None
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ShapeMismatchError(
            f"token_groups labels must be integers (-1 = no group), got dtype {labels.dtype}"
        )
    if tuple(labels.shape) != tuple(tokens.shape):
        raise ShapeMismatchError(
            f"token_groups labels have shape {tuple(labels.shape)} but the tokens have shape {tuple(tokens.shape)}; "
            "give one label per token position (-1 = no group)"
        )
    labels = labels.to(device="cpu", dtype=torch.long)
    low = int(labels.min())
    high = int(labels.max())
    if low < -1:
        raise ConfigError(f"token_groups labels must be -1 (no group) or a group id 0, 1, ...; found {low}")
    if names is None:
        names = [str(k) for k in range(max(high + 1, 0))]
    if isinstance(names, (str, bytes)) or not all(isinstance(name, str) and name for name in names):
        raise ConfigError(f"group_names must be a sequence of non-empty strings, got {names!r}")
    names = tuple(names)
    if len(set(names)) != len(names):
        raise ConfigError(f"group_names must be distinct, got {list(names)}")
    if high >= len(names):
        raise ConfigError(
            f"token_groups uses label {high} but group_names names only {len(names)} groups ({', '.join(names)}); "
            "give one name per label 0..max"
        )
    if not names:
        raise ConfigError("token_groups names no group; give at least one label 0 and its name")
    return labels, names


def sums_by_group_positions(values: torch.Tensor, labels: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-row sums of ``values`` ``[batch, positions]`` by group: ``[batch, n_groups]`` float64.

    ``labels`` ``[batch, positions]``; ``-1`` positions are dropped (summed into a spare column cut off after).
    """
    labels = labels.to(values.device)
    index = torch.where(labels < 0, torch.full_like(labels, n_groups), labels)
    out = torch.zeros((values.shape[0], n_groups + 1), dtype=torch.float64, device=values.device)
    return out.scatter_add_(1, index, values.double())[:, :n_groups]


def sums_by_group_rows(
    values: torch.Tensor, seq_index: torch.Tensor, group_ids: torch.Tensor, n_batch: int, n_groups: int
) -> torch.Tensor:
    """Sums of per-token rows ``values`` ``[tokens, ...]`` by (sequence, group): ``[n_batch, n_groups, ...]``."""
    group_ids = group_ids.to(values.device)
    column = torch.where(group_ids < 0, torch.full_like(group_ids, n_groups), group_ids)
    index = seq_index.to(values.device) * (n_groups + 1) + column
    out = torch.zeros(
        (n_batch * (n_groups + 1), *values.shape[1:]), dtype=torch.float64, device=values.device
    )
    out.index_add_(0, index, values.double())
    return out.view(n_batch, n_groups + 1, *values.shape[1:])[:, :n_groups]


@dataclass
class GroupResult:
    """One token group's metrics: ``metrics`` (name → float, never NaN; see :data:`GROUP_METRICS`), the reason
    for every undefined one in ``undefined``, ``n_tokens`` (kept positions in the group: reconstruction and KL)
    and ``n_predictions`` (predictions made at those positions: cross-entropy). ``per_sequence`` holds the
    group's per-sequence sums, from which :meth:`confidence_intervals` resamples sequences (paired)."""

    name: str
    n_tokens: int
    n_predictions: int
    metrics: dict[str, float]
    undefined: dict[str, str]
    per_sequence: dict[str, np.ndarray] = field(repr=False)
    _interval_cache: dict[tuple[float, int, int], dict[str, tuple[float, float]]] = field(
        default_factory=dict, repr=False
    )

    def confidence_intervals(
        self, level: float = DEFAULT_LEVEL, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """BCa bootstrap intervals over sequences of every defined metric (empty with < 2 sequences);
        a metric undefined in some resample (the group absent from it) has no interval."""
        key = (float(level), int(n_resamples), int(seed))
        if key not in self._interval_cache:
            names = list(self.metrics)
            n_sequences = len(next(iter(self.per_sequence.values())))
            intervals: dict[str, tuple[float, float]] = {}
            if names and n_sequences >= 2:

                def statistics(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                    values = metrics_from_sums(sums, None)
                    return {name: values[name] for name in names}

                found = bootstrap_intervals(
                    self.per_sequence, statistics, level=level, n_resamples=n_resamples, seed=seed
                )
                intervals = {name: value for name, value in found.items() if all(map(math.isfinite, value))}
            self._interval_cache[key] = intervals
        return dict(self._interval_cache[key])

    def confidence_interval(
        self, name: str, level: float = DEFAULT_LEVEL, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
    ) -> tuple[float, float]:
        """The interval of one metric; :class:`ConfigError` when it is undefined or has none."""
        if name not in self.metrics:
            reason = self.undefined.get(
                name, f"not measured per group (group metrics: {', '.join(GROUP_METRICS)})"
            )
            raise ConfigError(f"{name!r} is undefined for group {self.name!r}: {reason}")
        intervals = self.confidence_intervals(level, n_resamples=n_resamples, seed=seed)
        if name not in intervals:
            raise ConfigError(
                f"{name!r} of group {self.name!r} has no bootstrap interval: it needs at least 2 sequences and the "
                "group in every resample of them; evaluate more sequences"
            )
        return intervals[name]

    def to_dict(self, level: float = DEFAULT_LEVEL) -> dict[str, Any]:
        """Plain values, intervals at ``level`` included."""
        return {
            "name": self.name,
            "n_tokens": self.n_tokens,
            "n_predictions": self.n_predictions,
            "metrics": dict(self.metrics),
            "undefined": dict(self.undefined),
            "intervals": {
                name: [low, high] for name, (low, high) in self.confidence_intervals(level).items()
            },
            "interval_level": level,
        }


def group_results(group_sums: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, GroupResult]:
    """``name → GroupResult`` from the accumulator's per-sequence group sums (``[n_sequences, n_groups, ...]``)."""
    out: dict[str, GroupResult] = {}
    for index, name in enumerate(names):
        per_sequence = {
            key[len(GROUP_PREFIX) :]: np.ascontiguousarray(value[:, index])
            for key, value in group_sums.items()
        }
        sums = {key: value.sum(axis=0) for key, value in per_sequence.items()}
        n_tokens = round(float(sums[Sum.N_KL]))
        n_predictions = round(float(sums[Sum.N_CE]))
        values = metrics_from_sums(sums, None)
        metrics: dict[str, float] = {}
        undefined: dict[str, str] = {}
        for metric in GROUP_METRICS:
            if metric not in values:
                continue
            value = float(values[metric])
            if math.isfinite(value):
                metrics[metric] = value
            elif n_tokens == 0:
                undefined[metric] = "no evaluated position carries this group's label"
            elif metric in CE_GROUP_METRICS and n_predictions == 0:
                undefined[metric] = "no prediction is evaluated at this group's positions"
            else:
                undefined[metric] = (
                    f"a zero denominator on this group's {n_tokens} tokens (e.g. no variance to explain)"
                )
        out[name] = GroupResult(name, n_tokens, n_predictions, metrics, undefined, per_sequence)
    return out
