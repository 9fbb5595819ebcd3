"""Synthetic per-sequence data for the simulations of the sequential rule and of the bootstrap's coverage
(``tests/test_sequential.py``, ``tests/test_stats.py``): repetitions of a token set whose true metric sits at a
chosen distance from a threshold, with noise of the skewness measured on the demo."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pytest_saecheck.sequential import SequentialPlan, look_sizes
from pytest_saecheck.stats import bca_bounds

REPETITIONS = 2000
CEILING = 256
CONFIDENCE = 0.95
ALPHA = (1 - CONFIDENCE) / 2  # one bound of a two-sided interval
PLAN = SequentialPlan(look_sizes(CEILING, 32))
THRESHOLD = 0.1


def _errors(kind: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Mean-zero, unit-variance per-sequence noise; the skewed kinds span the demo's measured skewness (per-sequence
    ΔCE 0.0 to 1.6, KL 3.1 to 5.2)."""
    if kind == "normal":
        return rng.normal(size=size)
    if kind == "gamma":  # skewness 1.41, like the variance_only SAE's ΔCE
        return (rng.gamma(2.0, size=size) - 2.0) / math.sqrt(2.0)
    if kind == "lognormal":  # skewness 2.9, like per-sequence KL
        s2 = 0.7**2
        return (rng.lognormal(0.0, 0.7, size=size) - math.exp(s2 / 2)) / math.sqrt(
            (math.exp(s2) - 1) * math.exp(s2)
        )
    if kind == "pareto":  # Lomax tail index 4.5: finite variance, heavy tail
        shape = 4.5
        mean, var = 1 / (shape - 1), shape / ((shape - 1) ** 2 * (shape - 2))
        return (rng.pareto(shape, size=size) - mean) / math.sqrt(var)
    raise AssertionError(kind)


def _data(kind: str, shift: float, rng: np.random.Generator, ratio: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` ``[REPETITIONS, CEILING]`` with ``E a / E b = THRESHOLD + shift``.

    ``ratio=False``: a ΔCE-like metric, ``b`` the predictions per sequence (40 to 63), ``a = b · x``; ``ratio=True``:
    a ce_loss_score-like ratio with a noisy denominator (the zero-ablation gap per sequence)."""
    size = (REPETITIONS, CEILING)
    noise = _errors(kind, rng, size)
    if not ratio:
        b = rng.integers(40, 64, size=size).astype(np.float64)
        return b * (THRESHOLD + shift + 0.5 * noise), b
    b = rng.gamma(20.0, 0.5, size=size)  # mean 10, positive
    return (THRESHOLD + shift) * b + 3.0 * noise, b


def ratio_bounds(a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, seed: int = 7) -> tuple[Any, Any]:
    """The package's BCa bounds of ``Σa/Σb`` over sequences on every repetition ``a, b [repetitions, n]``: the
    method of :func:`pytest_saecheck.stats.bootstrap_intervals`, vectorised (resample counts shared across
    repetitions; leave-one-out samples are the totals minus one sequence)."""
    n = a.shape[-1]
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_resamples)
    weights = weights.astype(np.float64)  # [resamples, n]
    replicates = (a @ weights.T) / (b @ weights.T)  # [repetitions, resamples]
    total_a, total_b = a.sum(-1, keepdims=True), b.sum(-1, keepdims=True)
    jackknife = (total_a - a) / (total_b - b)
    return bca_bounds(replicates, (total_a / total_b)[:, 0], jackknife, CONFIDENCE)


def _binomial_se(p: float, n: int = REPETITIONS) -> float:
    return math.sqrt(p * (1 - p) / n)
