"""Bootstrap confidence intervals over sequences, paired across variants."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pytest_saecheck.defaults import INTERVAL_LEVEL as DEFAULT_LEVEL
from pytest_saecheck.errors import ConfigError

DEFAULT_RESAMPLES = 2000

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
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over sequences resampled with replacement.

    ``per_sequence`` maps each additive quantity to an array whose first axis is the sequence; one resample
    draws the same sequences for every quantity, so variants stay paired (the interval of ΔCE is the
    interval of a paired difference, not of two independent means). ``statistic`` maps summed quantities
    (with a leading resample axis) to values.
    """
    intervals = bootstrap_intervals(
        per_sequence, lambda sums: {"value": statistic(sums)}, level=level, n_resamples=n_resamples, seed=seed
    )
    return intervals["value"]


def bootstrap_intervals(
    per_sequence: Mapping[str, np.ndarray],
    statistics: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Like :func:`bootstrap_interval` for several statistics at once, from the same resamples."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must lie strictly between 0 and 1, got {level!r}")
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
        for name, value in statistics(summed).items():
            values.setdefault(name, []).append(np.asarray(value, dtype=np.float64))
    tail = (1.0 - level) / 2.0
    intervals: dict[str, tuple[float, float]] = {}
    for name, chunks in values.items():
        replicates = np.concatenate(chunks)
        if np.isnan(replicates).any():
            # A replicate where the metric is undefined (a zero denominator) makes the interval undefined.
            intervals[name] = (float("nan"), float("nan"))
            continue
        low, high = np.quantile(replicates, [tail, 1.0 - tail])
        intervals[name] = (float(low), float(high))
    return intervals
