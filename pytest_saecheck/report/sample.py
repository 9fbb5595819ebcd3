"""Synthetic test reports shaped like the plugin's, for tests and for previewing the report without a model.

``python -m pytest_saecheck.report sample --html sample.html`` renders them. The numbers are invented (but
shaped like a small SAE's: a CE score above 0.9 next to a ΔCE that is far from negligible).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pytest_saecheck.defaults import INTERVAL_LEVEL
from pytest_saecheck.messages import fmt
from pytest_saecheck.metrics import metrics_from_sums
from pytest_saecheck.scaling import DEFAULT_LAW
from pytest_saecheck.sums import Sum


@dataclass
class FakeReport:
    """Just the attributes of ``pytest.TestReport`` that the collector reads."""

    nodeid: str
    when: str
    outcome: str = "passed"
    duration: float = 0.01
    saecheck_records: list[dict[str, Any]] = field(default_factory=list)
    longrepr: Any = None


def subject(label: str, *, model: str | None = None, tokens: str | None = None) -> dict[str, Any]:
    return {
        "label": label,
        "model": model,
        "sae": label.split(" @ ")[0],
        "tokens": tokens,
        "device": "cpu",
        "dtype": None,
    }


def evaluation_record(
    label: str,
    *,
    ce_orig: float = 2.10,
    ce_sae: float = 2.45,
    ce_zero: float = 9.80,
    ce_mean: float = 6.20,
    seq_len: int = 32,
    d_sae: int = 512,
    seed: int = 0,
    with_intervals: bool = True,
    with_curves: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    rng = random.Random(f"{label}/{seed}")
    ev = 0.78 + 0.1 * rng.random()
    # per-token means as sums over one token: the scores below come from the engine's own formulas
    sums = {
        Sum.N_CE: 1.0,
        Sum.CE_ORIG: ce_orig,
        Sum.CE_SAE: ce_sae,
        Sum.CE_ZERO: ce_zero,
        Sum.CE_MEAN: ce_mean,
        Sum.N_KL: 1.0,
        Sum.KL_SAE: 0.8 * (ce_sae - ce_orig) + 0.01,
        Sum.KL_ZERO: 7.1,
    }
    computed = metrics_from_sums({key: np.asarray(value) for key, value in sums.items()}, DEFAULT_LAW)
    metrics: dict[str, float] = {name: float(value) for name, value in computed.items()}
    metrics |= {
        "explained_variance": ev,
        "explained_variance_legacy": ev - 0.02,
        "explained_variance_about_zero": 0.97,
        "mse": 3.2,
        "cosine_sim": 0.93,
        "relative_error_norm": 0.31,
        "l2_ratio": 0.91,
        "l0": 24.0 + 10 * rng.random(),
        "l1": 41.0,
        "alive_fraction": 0.94,
    }
    n_sequences = 64
    record: dict[str, Any] = {
        "kind": "evaluation",
        **subject(label),
        "resolved_model": "demo",
        "resolved_tokens": "demo",
        "settings": {
            "model": None,
            "sae": label,
            "tokens": None,
            "n_tokens": n_sequences * seq_len,
            "context_size": seq_len,
            "batch_size": 16,
            "device": None,
            "dtype": None,
            "exclude_bos": True,
            "seed": 0,
            "unavailable": "skip",
        },
        "metrics": metrics,
        "undefined": {},
        "n_tokens": n_sequences * (seq_len - 1),
        "n_sequences": n_sequences,
        "seq_len": seq_len,
        "hook_name": "blocks.1.hook_resid_pre",
        "hook_head_index": None,
        "token_policy": {"exclude_bos": True, "exclude_token_ids": [], "pad_token_id": None},
        "scaling_law": [DEFAULT_LAW.irreducible, DEFAULT_LAW.gamma],
        "batch_size": 16,
        "model_dtype": "float32",
        "sae_dtype": "float32",
        "backend": "transformer_lens",
        "duration_s": 1.5 + rng.random(),
    }
    if with_intervals:
        record["interval_level"] = INTERVAL_LEVEL
        record["intervals"] = {
            name: [value - 0.02 * abs(value), value + 0.02 * abs(value)]
            for name, value in metrics.items()
            if name != "alive_fraction"
        }
    if with_curves:
        delta = metrics["delta_ce"]
        record["delta_ce_by_position"] = [None] + [
            delta * (0.6 + 0.8 * position / seq_len) + 0.05 * rng.uniform(-1, 1)
            for position in range(1, seq_len)
        ]
        record["kl_by_position"] = [None] + [
            metrics["kl_sae"] * (0.6 + 0.8 * position / seq_len) for position in range(1, seq_len)
        ]
        record["latent_density"] = [
            0.0 if rng.random() < 0.06 else min(1.0, math.exp(rng.gauss(-6.5, 1.6))) for _ in range(d_sae)
        ]
    record.update(overrides)
    return record


def ce_assertion(
    label: str,
    value: float,
    *,
    metric: str = "ce_loss_score",
    min_score: float | None = None,
    max_value: float | None = None,
    confidence: float | None = None,
) -> dict[str, Any]:
    passed = (min_score is None or value >= min_score) and (max_value is None or value <= max_value)
    return {
        "kind": "assertion",
        "assertion": "assert_ce_recovery",
        **subject(label),
        "metric": metric,
        "value": value,
        "interval": [value - 0.02 * (abs(value) + 0.1), value + 0.02 * (abs(value) + 0.1)],
        "interval_level": confidence or INTERVAL_LEVEL,
        "confidence": confidence,
        "min_score": min_score,
        "max_value": max_value,
        "gate": "point estimate" if confidence is None else "interval bound",
        "n_tokens": 1984,
        "passed": passed,
        "message": None if passed else f"assert_ce_recovery failed for {label}: {metric} = {fmt(value)}",
    }


def r2_assertion(label: str, ours: float, legacy: float, tol: float = 0.05) -> dict[str, Any]:
    passed = abs(ours - legacy) <= tol
    return {
        "kind": "assertion",
        "assertion": "assert_r2_matches_legacy",
        "tol": tol,
        **subject(label),
        "mode": "ours",
        "metric": "explained_variance",
        "value": ours,
        "legacy": legacy,
        "about_zero": 0.97,
        "n_tokens": 1984,
        "message": None if passed else "explained_variance and explained_variance_legacy differ",
        "passed": passed,
    }


def sae_test_reports(
    module: str,
    label: str,
    *,
    ce_sae: float = 2.45,
    min_score: float = 0.9,
    max_delta: float = 0.5,
    **kwargs: Any,
) -> list[FakeReport]:
    """Reports of two tests on one SAE, as the plugin would produce them (setup, call, teardown each)."""
    evaluation = evaluation_record(label, ce_sae=ce_sae, **kwargs)
    metrics = evaluation["metrics"]
    reports: list[FakeReport] = []
    first = [
        {"kind": "subject", **subject(label)},
        evaluation,
        ce_assertion(label, metrics["ce_loss_score"], min_score=min_score),
        ce_assertion(
            label, metrics["delta_ce"], metric="delta_ce", max_value=max_delta, confidence=INTERVAL_LEVEL
        ),
    ]
    second = [
        {"kind": "subject", **subject(label)},
        evaluation,
        r2_assertion(label, metrics["explained_variance"], metrics["explained_variance_legacy"]),
    ]
    for name, records in (("test_behaviour", first), ("test_metric_consistency", second)):
        nodeid = f"{module}::{name}"
        failed = any(r.get("passed") is False for r in records)
        reports.append(FakeReport(nodeid, "setup", saecheck_records=records[:1]))
        reports.append(
            FakeReport(
                nodeid,
                "call",
                "failed" if failed else "passed",
                saecheck_records=records[1:],
                longrepr="AssertionError: threshold not met" if failed else None,
            )
        )
        reports.append(FakeReport(nodeid, "teardown"))
    return reports


def sample_reports() -> list[FakeReport]:
    """Three SAEs: one good, one failing its CE gate, one passing on CE score while ΔCE is large."""
    return [
        *sae_test_reports("examples/test_good.py", "demo/good", ce_sae=2.18),
        *sae_test_reports("examples/test_bad.py", "demo/bad", ce_sae=3.9, min_score=0.9),
        *sae_test_reports("examples/test_mid.py", "demo/mid", ce_sae=2.95, min_score=0.85, max_delta=1.0),
        FakeReport("examples/test_reported.py::test_reported_r2", "setup"),
        FakeReport(
            "examples/test_reported.py::test_reported_r2",
            "call",
            "failed",
            saecheck_records=[
                {
                    "kind": "assertion",
                    "assertion": "assert_r2_matches_legacy",
                    "tol": 0.05,
                    "label": None,
                    "mode": "reported",
                    "metric": "explained_variance",
                    "value": 0.98,
                    "legacy": 0.78,
                    "keys": ["explained_variance", "explained_variance_legacy"],
                    "message": "explained_variance is the wrong number: variance computed about zero",
                    "passed": False,
                }
            ],
            longrepr="AssertionError: explained_variance is the wrong number",
        ),
        FakeReport("examples/test_reported.py::test_reported_r2", "teardown"),
    ]
