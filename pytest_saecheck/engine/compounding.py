"""Compounding: the ΔCE of several splices at once against the sum of their ΔCEs one at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pytest_saecheck.engine.accumulate import totals
from pytest_saecheck.stats import DEFAULT_LEVEL, bootstrap_intervals
from pytest_saecheck.sums import Sum


def compounding(
    joint: Mapping[str, np.ndarray], isolated: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, Any]:
    """Joint ΔCE against the sum of the isolated ΔCEs (nats/token), with a paired bootstrap interval of the excess.

    ``joint`` and each of ``isolated``: per-sequence sums with ``ce_sum_orig``, ``ce_sum_sae``, ``n_ce``
    (``engine.accumulate.Accumulator.per_sequence``) over the same sequences. Returns ``delta_ce_joint``,
    ``delta_ce_isolated_sum``, ``excess`` (joint − sum), ``excess_interval`` (95%, paired over sequences; None
    with fewer than two sequences) and ``ratio`` (joint / sum; None when the sum is not positive, where a ratio
    of added losses reads backwards).
    """
    per_sequence = {
        "d_joint": joint[Sum.CE_SAE] - joint[Sum.CE_ORIG],
        "d_sum": sum(
            (sums[Sum.CE_SAE] - sums[Sum.CE_ORIG] for sums in isolated),
            np.zeros_like(joint[Sum.CE_ORIG]),
        ),
        Sum.N_CE: joint[Sum.N_CE],
    }
    sums = totals(per_sequence)
    joint_delta = float(sums["d_joint"] / sums[Sum.N_CE])
    isolated_sum = float(sums["d_sum"] / sums[Sum.N_CE])
    out: dict[str, Any] = {
        "delta_ce_joint": joint_delta,
        "delta_ce_isolated_sum": isolated_sum,
        "excess": joint_delta - isolated_sum,
        "ratio": joint_delta / isolated_sum if isolated_sum > 0 else None,
        "excess_interval": None,
    }
    if len(per_sequence[Sum.N_CE]) >= 2:
        (low, high) = bootstrap_intervals(
            per_sequence, lambda s: {"excess": (s["d_joint"] - s["d_sum"]) / s[Sum.N_CE]}, level=DEFAULT_LEVEL
        )["excess"]
        out["excess_interval"] = [low, high]
    return out
