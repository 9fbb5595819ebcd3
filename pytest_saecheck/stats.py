"""Bootstrap confidence intervals over sequences, paired across variants: BCa by default.

Why BCa and not the percentile interval: per-sequence ΔCE and KL are right-skewed (skewness up to 5 on the demo),
and on such data the percentile interval's upper bound is too low, so a ``max_value`` gate whose true value sits on
its threshold passed 0.049 to 0.056 of the time against the nominal 0.025 (``tests/test_stats.py`` measures it).
Efron's bias-corrected and accelerated interval (Efron 1987, "Better bootstrap confidence intervals", JASA
82:171; Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 14) corrects the percentiles for the
replicates' median bias and for the skewness the jackknife measures, and is second-order accurate.

Why not ``scipy.stats.bootstrap(method="BCa")``: it resamples the observations themselves, materialising each
input at ``[..., resamples, n_sequences]`` (the ``[n_sequences, d]`` variance sums would take gigabytes) and a
``[n, n − 1]`` jackknife; here every metric is a function of additive sums, so a resample is a weight vector and a
leave-one-out sample is the total minus one row, within a fixed memory bound. ``tests/test_stats.py`` checks these
intervals against scipy's BCa.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pytest_saecheck.defaults import INTERVAL_LEVEL as DEFAULT_LEVEL
from pytest_saecheck.errors import ConfigError

DEFAULT_RESAMPLES = 2000

BCA, PERCENTILE = "BCa", "percentile"
METHODS = (BCA, PERCENTILE)
"""The interval methods of :func:`bootstrap_intervals`; BCa is the default."""

_WEIGHTS_BYTES = 8 * 1024 * 1024
"""Bound of the bootstrap's resampling weights in memory (at most 250 resamples at a time)."""
_CHUNK = 250  # resamples per matrix product: bounds memory for the [resamples, sequences] weight matrix


def bootstrap_interval(
    per_sequence: Mapping[str, np.ndarray],
    statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: str = BCA,
) -> tuple[float, float]:
    """BCa (or, with ``method="percentile"``, percentile) interval of ``statistic`` over sequences resampled with
    replacement.

    ``per_sequence`` maps each additive quantity to an array whose first axis is the sequence; one resample
    draws the same sequences for every quantity, so variants stay paired (the interval of ΔCE is the
    interval of a paired difference, not of two independent means). ``statistic`` maps summed quantities
    (with a leading axis: resamples, leave-one-out samples) to values.
    """
    intervals = bootstrap_intervals(
        per_sequence,
        lambda sums: {"value": statistic(sums)},
        level=level,
        n_resamples=n_resamples,
        seed=seed,
        method=method,
    )
    return intervals["value"]


def bootstrap_intervals(
    per_sequence: Mapping[str, np.ndarray],
    statistics: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: str = BCA,
) -> dict[str, tuple[float, float]]:
    """Like :func:`bootstrap_interval` for several statistics at once, from the same resamples.

    A statistic undefined (NaN) in some resample, or in some leave-one-out sample (BCa), has the interval
    ``(nan, nan)``. Raises :class:`ConfigError` for a level outside (0, 1), fewer than 2 sequences or an unknown
    method.
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must lie strictly between 0 and 1, got {level!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown bootstrap interval method {method!r}; choose one of {', '.join(METHODS)}")
    n_sequences = len(next(iter(per_sequence.values())))
    if n_sequences < 2:
        raise ConfigError(
            f"a bootstrap interval over sequences needs at least 2 sequences, got {n_sequences}; "
            "evaluate more sequences (n_tokens / context_size)"
        )
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {}
    uniform = np.full(n_sequences, 1.0 / n_sequences)
    # The [resamples, sequences] weights (int64 draws and their float64 copy, 16 bytes each) stay within
    # _WEIGHTS_BYTES however many sequences: chunking the draws gives the same stream of resamples.
    chunk = max(1, min(_CHUNK, _WEIGHTS_BYTES // (16 * n_sequences)))
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        weights = rng.multinomial(n_sequences, uniform, size=size).astype(np.float64)
        summed = {key: np.tensordot(weights, array, axes=(1, 0)) for key, array in per_sequence.items()}
        del weights  # else the next chunk's draws are made while this chunk's float64 copy is alive (1.5x)
        for name, value in statistics(summed).items():
            values.setdefault(name, []).append(np.asarray(value, dtype=np.float64))
    replicates = {name: np.concatenate(chunks) for name, chunks in values.items()}
    tail = (1.0 - level) / 2.0
    if method == BCA and replicates:
        points, jackknife = _point_and_jackknife(per_sequence, statistics, list(replicates), chunk)
        low, high = bca_bounds(
            np.stack([replicates[name] for name in replicates]),
            np.array([points[name] for name in replicates]),
            np.stack([jackknife[name] for name in replicates]),
            level,
        )
        bounds = dict(zip(replicates, zip(low.tolist(), high.tolist(), strict=True), strict=True))
    else:
        bounds = {
            name: (float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail)))
            for name, values in replicates.items()
            if not np.isnan(values).any()
        }
    # A replicate where the metric is undefined (a zero denominator) makes the interval undefined.
    nan = (float("nan"), float("nan"))
    return {
        name: nan if np.isnan(replicates[name]).any() else (float(bounds[name][0]), float(bounds[name][1]))
        for name in replicates
    }


def _point_and_jackknife(
    per_sequence: Mapping[str, np.ndarray],
    statistics: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    names: list[str],
    chunk: int,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Each statistic on every sequence (the point estimate) and on every leave-one-out sample ``[n_sequences]``
    (the total minus one sequence's row), ``chunk`` samples at a time."""
    total = {key: array.sum(0) for key, array in per_sequence.items()}
    found = statistics({key: value[None] for key, value in total.items()})
    points = {name: float(np.asarray(found[name], dtype=np.float64).reshape(-1)[0]) for name in names}
    n_sequences = len(next(iter(per_sequence.values())))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, n_sequences, chunk):
        rows = slice(start, start + chunk)
        left_out = {key: total[key][None] - array[rows] for key, array in per_sequence.items()}
        found = statistics(left_out)
        for name in names:
            parts[name].append(np.asarray(found[name], dtype=np.float64))
    return points, {name: np.concatenate(chunks) for name, chunks in parts.items()}


def bca_bounds(
    replicates: np.ndarray, point: np.ndarray, jackknife: np.ndarray, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Efron's BCa bounds of a two-sided ``level`` interval, along the last axis (leading axes: statistics,
    simulation repetitions).

    ``replicates`` ``[..., B]``: the bootstrap replicates; ``point`` ``[...]``: the estimate on every observation;
    ``jackknife`` ``[..., n]``: the estimate with each observation left out. With ``z₀ = Φ⁻¹((#{θ* < θ̂} +
    ½ #{θ* = θ̂}) / B)`` (ties counted half, so constant data gives ``z₀ = 0``; clipped to ``[½/B, 1 − ½/B]``) and
    the acceleration ``a = Σ(θ̄ − θ₍ᵢ₎)³ / (6 (Σ(θ̄ − θ₍ᵢ₎)²)^{3/2})`` (0 when the jackknife has no spread), each
    bound is the replicates' quantile (numpy's linear rule) at ``Φ(z₀ + w / (1 − a w))``, ``w = z₀ + z_α`` for
    ``α = (1 − level)/2`` and ``1 − α`` (Efron & Tibshirani 1993, eqs. 14.9–14.15; where ``1 − a w ≤ 0`` the
    bound is the most extreme replicate on its side). NaN anywhere in a row's inputs gives NaN bounds.
    """
    from scipy.special import ndtr, ndtri  # Φ and Φ⁻¹

    theta = np.asarray(replicates, dtype=np.float64)
    point = np.asarray(point, dtype=np.float64)
    jack = np.asarray(jackknife, dtype=np.float64)
    n_resamples = theta.shape[-1]
    below = (theta < point[..., None]).sum(-1) + 0.5 * (theta == point[..., None]).sum(-1)
    share = np.clip(below / n_resamples, 0.5 / n_resamples, 1.0 - 0.5 / n_resamples)
    z0 = ndtri(share)
    spread = jack.mean(-1, keepdims=True) - jack
    square = (spread**2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        acceleration = np.where(square > 0, (spread**3).sum(-1) / (6.0 * square**1.5), 0.0)
    acceleration = np.where(np.isnan(square), np.nan, acceleration)
    tail = (1.0 - level) / 2.0
    ordered = np.sort(theta, axis=-1)
    bounds = []
    for z_alpha in (ndtri(tail), ndtri(1.0 - tail)):
        w = z0 + z_alpha
        room = 1.0 - acceleration * w
        with np.errstate(divide="ignore", invalid="ignore"):
            adjusted = np.where(
                room > 0, ndtr(z0 + w / np.where(room > 0, room, 1.0)), np.where(w > 0, 1.0, 0.0)
            )
        adjusted = np.where(np.isnan(acceleration) | np.isnan(point), np.nan, adjusted)
        bounds.append(_quantile_sorted(ordered, adjusted))
    return bounds[0], bounds[1]


def _quantile_sorted(ordered: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The quantile ``q[...]`` of each row of the sorted ``ordered[..., B]`` by numpy's default (linear) rule."""
    n = ordered.shape[-1]
    position = np.where(np.isnan(q), 0.0, q) * (n - 1)
    lower = np.clip(np.floor(position).astype(np.int64), 0, n - 1)
    upper = np.minimum(lower + 1, n - 1)
    fraction = position - lower
    low_value = np.take_along_axis(ordered, lower[..., None], -1)[..., 0]
    high_value = np.take_along_axis(ordered, upper[..., None], -1)[..., 0]
    value = low_value + fraction * (high_value - low_value)
    return np.where(np.isnan(q), np.nan, value)
