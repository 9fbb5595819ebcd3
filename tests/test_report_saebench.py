"""SAEBench-format results: the core result of each SAE, checked against a schema derived from SAEBench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import random_sae
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_saecheck import assert_r2_matches_legacy
from pytest_saecheck.errors import ConfigError
from pytest_saecheck.report import saebench
from pytest_saecheck.report.__main__ import main as report_main

SCHEMA = json.loads((Path(__file__).parent / "data" / "saebench_core.schema.json").read_text())


def validate(result: Any) -> None:
    import jsonschema

    jsonschema.validate(result, SCHEMA)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 1.0)), min_size=1, max_size=200))
def test_density_statistics_are_saebench_definitions(density: list[float]) -> None:
    d = np.asarray(density, dtype=np.float64)
    ours = saebench.density_statistics(density)
    assert ours["frac_alive"] == pytest.approx(np.mean(d > 0))
    for threshold, name in ((0.01, "1_percent"), (0.1, "10_percent")):
        assert ours[f"freq_over_{name}"] == pytest.approx(np.mean(d > threshold))
        expected = d[d > threshold].sum() / d.sum() if d.sum() > 0 else 0.0
        assert ours[f"normalized_freq_over_{name}"] == pytest.approx(expected)
        assert 0.0 <= ours[f"normalized_freq_over_{name}"] <= 1.0


def test_density_statistics_refuse_nothing_and_nan() -> None:
    for bad in ([], [0.1, float("nan")]):
        with pytest.raises(ConfigError, match="finite numbers"):
            saebench.density_statistics(bad)


@pytest.mark.parametrize("chunk", [3, 4096])
def test_max_cosine_statistics_match_a_brute_force_float64_computation(chunk: int) -> None:
    sae = random_sae("blocks.0.hook_resid_pre", d_sae=37)
    ours = saebench.max_cosine_statistics(sae, chunk=chunk)
    assert ours is not None

    def brute(directions: torch.Tensor) -> float:  # [d_sae, d]
        unit = directions.double() / directions.double().norm(dim=-1, keepdim=True)
        sims = unit @ unit.T
        sims.fill_diagonal_(-2.0)
        return float(sims.max(dim=-1).values.mean())

    assert ours["average_max_encoder_cosine_sim"] == pytest.approx(brute(sae.W_enc.T.detach()), abs=1e-6)
    assert ours["average_max_decoder_cosine_sim"] == pytest.approx(brute(sae.W_dec.detach()), abs=1e-6)


def test_identical_decoder_rows_have_max_cosine_one() -> None:
    sae = random_sae("blocks.0.hook_resid_pre", d_sae=8)
    with torch.no_grad():
        sae.W_dec[:] = sae.W_dec[0]
    ours = saebench.max_cosine_statistics(sae)
    assert ours is not None and ours["average_max_decoder_cosine_sim"] == pytest.approx(1.0, abs=1e-6)


TEST_FILE = """
import pytest
from pytest_saecheck import assert_ce_recovery

pytestmark = pytest.mark.saecheck(sae="demo/good", n_tokens=1024)

def test_behaviour(saecheck):
    assert_ce_recovery(saecheck, min_score=0.5)
"""


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[Path]]:
    """The demo SAE gated by a plugin run that writes the JSON result and the SAEBench directory."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("saebench_run")
    (root / "test_gate.py").write_text(TEST_FILE)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
         "--saecheck-json", "result.json", "--saecheck-saebench-json", "saebench", "test_gate.py"],
        cwd=root, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SAEBench core result written to" in run.stdout
    return json.loads((root / "result.json").read_text()), sorted((root / "saebench").iterdir())


def test_the_plugin_export_validates_and_carries_the_runs_numbers(demo_export: Any) -> None:
    document, files = demo_export
    (path,) = files
    assert path.name == "demo_good_eval_results.json"
    result = json.loads(path.read_text())
    validate(result)
    (entry,) = document["saes"]
    metrics = result["eval_result_metrics"]
    ours = entry["metrics"]
    assert metrics["model_performance_preservation"]["ce_loss_score"] == ours["ce_loss_score"]
    assert metrics["model_performance_preservation"]["ce_loss_with_ablation"] == ours["ce_zero"]
    assert metrics["model_behavior_preservation"]["kl_div_with_sae"] == ours["kl_sae"]
    assert metrics["reconstruction_quality"]["explained_variance"] == ours["explained_variance"]
    assert metrics["shrinkage"]["relative_reconstruction_bias"] == ours["relative_reconstruction_bias"]
    assert metrics["misc_metrics"]["frac_alive"] == ours["alive_fraction"]
    assert metrics["token_stats"]["total_tokens_eval_reconstruction"] == entry["tokens"]["n_tokens"]
    misc = metrics["misc_metrics"]
    assert 0 <= misc["average_max_decoder_cosine_sim"] <= 1  # computed from the weights for this export
    unstructured = result["eval_result_unstructured"]["saecheck"]
    assert unstructured["not_measured"] == []
    assert any(line.startswith("explained_variance: pooled") for line in unstructured["definitions"])
    assert result["sae_bench_commit_hash"].startswith("not SAEBench")


def test_the_command_line_export_is_the_plugins(demo_export: Any, tmp_path: Path) -> None:
    document, files = demo_export
    source = tmp_path / "result.json"
    source.write_text(json.dumps(document))
    assert report_main(["export-saebench", str(source), str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / files[0].name).read_text())
    plugin = json.loads(files[0].read_text())
    validate(exported)
    assert exported == plugin  # the document carries the weight statistics the plugin computed


def test_an_export_reads_as_ours_in_assert_r2_matches_legacy(demo_export: Any) -> None:
    """SAEBench 0.6.0's own explained_variance is the collapsed formula; ours is the pooled one, and the export
    says so, so the fingerprint check does not take our number for SAEBench's."""
    _, files = demo_export
    assert_r2_matches_legacy(json.loads(files[0].read_text()))


def test_a_result_without_evaluations_exports_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="was not evaluated"):
        saebench.core_result({"label": "rel/id", "evaluated": False, "metrics": {}}, {})
    assert saebench.write_core_results({"saes": [{"label": "x", "evaluated": False}]}, tmp_path / "d") == []


def test_an_undefined_number_is_null_with_its_reason(demo_export: Any) -> None:
    document, _ = demo_export
    (entry,) = document["saes"]
    metrics = {k: v for k, v in entry["metrics"].items() if k != "ce_loss_score"}
    reason = "the zero-ablation gap is not resolved from zero"
    result = saebench.core_result(
        {**entry, "metrics": metrics, "undefined": {"ce_loss_score": reason}}, document
    )
    assert result["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] is None
    assert f"ce_loss_score: {reason}" in result["eval_result_unstructured"]["saecheck"]["not_measured"]
    import jsonschema

    with pytest.raises(
        jsonschema.ValidationError
    ):  # SAEBench's models require the number: say it, never invent it
        validate(result)
