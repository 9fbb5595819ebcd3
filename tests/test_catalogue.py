"""The metric catalogue: one numpy-free home for what each metric means."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_saecheck import catalogue, metrics
from pytest_saecheck.metrics import metrics_from_sums

README = Path(__file__).resolve().parent.parent / "docs" / "reference" / "metrics.md"


def test_the_readme_metric_table_is_the_catalogue() -> None:
    text = README.read_text(encoding="utf-8")
    assert catalogue.with_table(text) == text, (
        "run: python -m pytest_saecheck.catalogue docs/reference/metrics.md"
    )
    for info in catalogue.METRICS.values():
        assert f"| `{info.name}` | {info.formula.replace('|', chr(92) + '|')} |" in text


def test_the_catalogue_imports_neither_numpy_nor_torch() -> None:
    code = "import sys, pytest_saecheck.catalogue; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_metrics_computes_what_the_catalogue_describes() -> None:
    assert metrics.METRICS is catalogue.METRICS and metrics.BOOTSTRAPPABLE == catalogue.BOOTSTRAPPABLE
    for info in catalogue.METRICS.values():
        assert info.formula and info.scale and info.unit and info.hides, info.name
        assert info.direction in ("higher", "lower")
        if info.lower_bound is not None and info.upper_bound is not None:
            assert info.lower_bound < info.upper_bound


def _sums(rng: random.Random) -> dict[str, np.ndarray]:
    """Random CE and KL sums of a small evaluation (float64 means via n = number of positions)."""
    n = float(rng.randint(1, 500))
    orig = rng.uniform(1.0, 4.0)
    sums = {
        "n_ce": n,
        "ce_sum_orig": n * orig,
        "ce_sum_sae": n * (orig + rng.uniform(-0.2, 2.0)),
        "ce_sum_zero": n * (orig + rng.uniform(0.5, 8.0)),
        "ce_sum_mean": n * (orig + rng.uniform(0.5, 8.0)),
        "n_kl": n,
        "kl_sum_sae": n * rng.uniform(0.0, 1.0),
        "kl_sum_zero": n * rng.uniform(1.0, 9.0),
    }
    return {key: np.asarray(value, dtype=np.float64) for key, value in sums.items()}


@pytest.mark.parametrize("seed", range(20))
def test_each_formula_of_metric_symbols_evaluates_to_the_engines_value(seed: int) -> None:
    """The catalogue's formula, with the metric values put in and read as Python arithmetic, is the engine's."""
    values = {
        name: float(value) for name, value in metrics_from_sums(_sums(random.Random(seed)), None).items()
    }
    derived = 0
    for name in catalogue.METRICS:
        text = catalogue.derivation(name, values, repr)
        if text is None or name not in values:
            continue
        derived += 1
        python = text.replace("−", "-")
        assert eval(python, {"__builtins__": {}}) == pytest.approx(values[name], rel=1e-12, abs=1e-12), name
    assert derived == 5  # delta_ce, the three loss scores, kl_div_score


def test_derivation_needs_every_symbol_to_be_a_metric() -> None:
    values = {"ce_orig": 2.0, "ce_sae": 2.5, "ce_zero": 9.0}
    assert catalogue.derivation("ce_loss_score", values, "{:.1f}".format) == "(9.0 − 2.5) / (9.0 − 2.0)"
    assert catalogue.derivation("ce_loss_score_mean_ablation", values, str) is None  # no ce_mean
    assert catalogue.derivation("compute_fraction", values, str) is None  # E and γ are not metrics
    assert catalogue.derivation("ce_orig", values, str) is None  # a raw loss
    assert catalogue.derivation("unknown", values, str) is None


def test_the_terminal_and_the_report_show_only_catalogued_metrics() -> None:
    """Every metric a table names has its formula, scale and direction in the catalogue."""
    from pytest_saecheck.report import html
    from pytest_saecheck.report.terminal import HEADLINE

    shown = [*HEADLINE, *html.OVERVIEW, *html.LOSS_ROWS, *html.SCORE_ROWS, *html.R2_ROWS, *html.OTHER_ROWS]
    assert {name for name, _ in shown} <= set(catalogue.METRICS)
