"""Smoke tests of benchmarks/bench_engine.py: its pure helpers, and one tiny end-to-end comparison."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pytest
import torch


def test_parse_configs(bench):
    assert bench.parse_configs("1,3") == ["1", "3"]
    assert bench.parse_configs(" 2 , 2,1") == ["2", "1"]
    assert bench.parse_configs("release") == ["4"]
    assert bench.parse_configs("1,release,4") == ["1", "4"]
    assert bench.parse_configs("hf,1") == ["5", "1"]
    assert bench.parse_configs("replacement,hf") == ["6", "5"]
    for bad in ("", "7", "1,x", "releases"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_configs(bad)


def test_whole_batches(bench):
    assert bench.n_sequences_for(2048, 128, 8) == 16
    assert bench.n_sequences_for(100, 128, 8) == 8  # at least one batch
    assert bench.n_sequences_for(3000, 128, 8) == 24  # rounded to whole batches


def test_ratios_are_pair_by_pair(bench):
    assert bench.pairwise_ratios([4.0, 9.0], [2.0, 3.0]) == [2.0, 3.0]
    assert bench.spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError):
        bench.pairwise_ratios([1.0], [1.0, 2.0])


def test_compare_metrics_reports_worst_difference(bench):
    ours = {name: 1.0 for name, _, _ in bench.SHARED_METRICS}
    anchor = {name: 1.0 for _, _, name in bench.SHARED_METRICS}
    anchor["mse"] = 1.5
    rows, worst = bench.compare_metrics(ours, anchor, [0.1, 0.2], [0.1, 0.25])
    assert worst == pytest.approx(0.5)
    assert rows[-1][0] == bench.DENSITY_ROW and rows[-1][3] == pytest.approx(0.05)
    assert len(rows) == len(bench.SHARED_METRICS) + 1
    assert bench.worst_metric(rows)["max_abs_diff_metric"] == "mse"


def test_float32_ulps(bench):
    assert bench.float32_ulps(1.0, 1.0) == 0.0
    assert bench.float32_ulps(1.0 + 2**-23, 1.0) == pytest.approx(1.0)
    assert math.isfinite(bench.float32_ulps(1e-9, 0.0))


def test_token_store_serves_batches_in_order(bench):
    tokens = torch.arange(12).reshape(6, 2)
    store = bench.TokenStore(tokens, 2)
    assert store.context_size == 2 and store.store_batch_size_prompts == 2
    assert store.get_batch_tokens(2).tolist() == [[0, 1], [2, 3]]
    assert store.get_batch_tokens(4).tolist() == [[4, 5], [6, 7], [8, 9], [10, 11]]
    with pytest.raises(RuntimeError):
        store.get_batch_tokens(2)
    store.reset_input_dataset()
    assert store.get_batch_tokens(2).tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"])
def test_tiny_case_end_to_end(bench, hook):
    """The benchmark's comparison on a tiny model: both implementations agree, the record is complete."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_mlp=128, d_vocab=61, act_fn="gelu"
    )
    model = HookedTransformer(cfg).eval()
    sae = bench.topk_sae(hook, 32, "cpu", expansion=4, k=8)
    tokens = bench.random_tokens(8, 16, 61)
    case = bench.Case("t", "tiny", model, sae, tokens)
    timings, ours, anchor, peak = bench.measure_case(case, 4, 2, "cpu", True, lambda message: None)
    lines, record = bench.case_report(case, timings, ours, anchor, peak, 4)
    assert record["max_abs_diff"] <= 1e-4, "\n".join(lines)
    assert record["speedup"] > 0 and record["forward_passes"] > 0
    assert all(peak[name] > 0 for name in ("ours", "defaults", "anchor", "floor", "bound"))
    assert record["speedup_bound"] > 0 and record["bound_forward_passes"] > 0
    # the default settings are timed beside the settings matched to SAE Lens
    assert record["seconds_defaults"] > 0 and record["defaults_forward_passes"] > 0
    assert any(line.strip().startswith("ours, default settings") for line in lines)
    assert any("no exact evaluation can beat" in line for line in lines)
    # The float64 arbiter: ours is at least as close to it as SAE Lens on the rounding-exposed metrics.
    for name, errors in record["error_vs_float64"].items():
        assert errors["ours"] <= max(errors["anchor"], 1e-6), name
    json.dumps(record)  # the JSON line must serialise


def test_release_layers_are_spread_and_distinct(bench):
    assert bench.release_layers(12, 12) == list(range(12))
    assert bench.release_layers(12, 3) == [0, 6, 11]
    assert bench.release_layers(3, 3) == [0, 1, 2]
    for n_layers in range(1, 13):
        for n_saes in range(1, n_layers + 1):
            layers = bench.release_layers(n_layers, n_saes)
            assert len(set(layers)) == n_saes and layers == sorted(layers)
            assert layers[0] == 0 and (n_saes == 1 or layers[-1] == n_layers - 1)
    for bad in (0, 13):
        with pytest.raises(ValueError):
            bench.release_layers(12, bad)


def test_release_forward_passes_are_per_sae(bench):
    timings = bench.Timings()
    for name, seconds in (("ours", 6.0), ("anchor", 24.0), ("floor", 1.0), ("bound", 5.0)):
        timings.add(name, seconds, seconds)
    record = bench.summary_record(timings, 0.0, {}, per_sae=3)
    assert record["speedup"] == 4.0 and record["speedup_bound"] == pytest.approx(4.8)
    assert record["forward_passes"] == 2.0
    assert record["anchor_forward_passes"] == 8.0 and record["bound_forward_passes"] == pytest.approx(1.667)


def test_tiny_release_end_to_end(bench):
    """The release configuration on a tiny model: one evaluate() call on 3 SAEs against run_evals per SAE."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_mlp=128, d_vocab=61, act_fn="gelu"
    )
    model = HookedTransformer(cfg).eval()
    saes = bench.release_saes(model, 3, "cpu", expansion=4, k=8)
    assert list(saes) == [f"blocks.{layer}.hook_resid_pre" for layer in range(3)]
    tokens = bench.random_tokens(8, 16, 61)
    case = bench.ReleaseCase("4", "tiny release", model, saes, tokens, "tiny release")
    timings, results, peak = bench.measure_release(case, 4, 2, "cpu", True, lambda message: None)
    assert set(timings.seconds) == {"ours", "joint", "anchor", "floor", "bound"}
    lines, record = bench.release_report(case, timings, results, peak, 4)
    text = "\n".join(lines)
    assert record["name"] == "tiny release" and record["n_saes"] == 3
    assert record["max_abs_diff"] <= 1e-4, text
    assert record["max_abs_diff_sae"] in saes
    assert set(record["per_sae"]) == set(saes)
    assert all(info["max_abs_diff"] <= record["max_abs_diff"] for info in record["per_sae"].values())
    # Every ratio in the record is the one its name says, repetition by repetition, from the measured seconds
    # (the values themselves are timings: no test asserts them).
    s = timings.seconds
    assert all(len(s[name]) == 2 and all(v > 0 for v in s[name]) for name in s)

    def median_ratio(top, bottom, per=1):
        return round(statistics.median(a / b / per for a, b in zip(s[top], s[bottom], strict=True)), 3)

    assert record["speedup"] == median_ratio("anchor", "ours")
    assert record["forward_passes"] == median_ratio("ours", "floor", 3)
    assert record["forward_passes_total"] == median_ratio("ours", "floor")
    assert record["anchor_forward_passes"] == median_ratio("anchor", "floor", 3)
    assert record["speedup_bound"] == median_ratio("anchor", "bound")
    assert record["joint_ratio"] == median_ratio("joint", "ours")
    assert record["seconds_joint"] == round(statistics.median(s["joint"]), 3)
    assert record["forward_passes"] == pytest.approx(record["forward_passes_total"] / 3, abs=1e-3)
    # Peaks are bytes allocated above the run's start: the whole set's at least one SAE's, and the growth the
    # record reports is exactly their difference per extra SAE.
    assert all(peak[name] > 0 for name in ("ours", "joint", "anchor", "floor", "bound", "ours_one_sae"))
    assert record["peak_bytes_per_extra_sae"] == (peak["ours"] - peak["ours_one_sae"]) / 2
    assert record["peak_bytes_per_extra_sae"] is not None
    assert record["peak_bytes_one_batch_of_logits"] == 4 * 16 * 61 * 4
    assert record["peak_growth_in_batches_of_logits"] is not None
    assert any("x one batch of logits" in line for line in lines)
    # joint=True leaves the isolated evaluations as they are, and adds the joint splice and its compounding.
    assert record["joint_isolated_max_diff"] <= 1e-12
    assert set(record["compounding"]) >= {"delta_ce_joint", "delta_ce_isolated_sum", "excess"}
    assert record["joint_metrics"]["ce_sae"] > 0
    assert set(record["bound_parts_seconds"]) == {"original", "sae", "suffix"}
    assert record["ours_over_bound"] == median_ratio("ours", "bound")
    assert any("joint=True" in line for line in lines) and any("compounding" in line for line in lines)
    for name, errors in record["error_vs_float64"].items():
        assert errors["ours"] <= max(errors["anchor"], 1e-6), name
    json.dumps(record)  # the JSON line must serialise


def test_release_bound_refuses_hooks_inside_a_block(bench):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=64, d_vocab=11, act_fn="gelu"
    )
    model = HookedTransformer(cfg).eval()
    sae = bench.topk_sae("blocks.0.hook_mlp_out", 16, "cpu", expansion=2, k=4)
    with pytest.raises(ValueError, match="residual"):
        bench.run_release_bound(model, {"mlp": sae}, bench.random_tokens(2, 8, 11), 2)


def test_bound_starts_after_the_hook(bench):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=3, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=64, d_vocab=11, act_fn="gelu"
    )
    model = HookedTransformer(cfg)
    assert bench.suffix_start(model, "blocks.2.hook_resid_pre") == (2, False)
    assert bench.suffix_start(model, "blocks.1.hook_resid_post") == (2, False)
    # Inside a block the rest of the block is skipped too (a lower bound on the work), and the zero-ablated
    # run depends on the tokens.
    assert bench.suffix_start(model, "blocks.1.hook_mlp_out") == (2, True)


def test_the_demo_case_scores_every_position_on_both_sides(bench):
    """The demo's tokens hold special tokens, which ``evaluate`` leaves out by default while ``run_evals`` (as
    configured) keeps them: the benchmark turns that off, so both average over the same positions and agree."""
    from pytest_saecheck import evaluate

    case = bench.demo_case(512, 4, "cpu", seq_len=32)
    default = evaluate(case.model, case.sae, case.tokens, exclude_bos=False, progress=False)
    assert default.n_tokens < case.tokens.numel()  # there are special tokens to leave out
    timings, ours, anchor, peak = bench.measure_case(case, 4, 1, "cpu", False, lambda message: None)
    assert ours.n_tokens == case.tokens.numel()
    lines, record = bench.case_report(case, timings, ours, anchor, peak, 4)
    assert record["max_abs_diff"] <= 1e-4, "\n".join(lines)


def tiny_gpt2(bench):
    """A 2-layer transformers ``GPT2LMHeadModel`` whose residual stream matters (initialiser 0.2: zero-ablating a
    block's output moves the loss, so ``ce_loss_score`` does not divide by rounding noise)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=16,
        vocab_size=61,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def test_tiny_hf_case_against_sae_lens_hf_path(bench):
    """Configuration 5 on a tiny model: SAE Lens' run_evals on HookedProxyLM, wrapped around the same model object,
    agrees with ours on every shared metric; its hook is gone afterwards (ours would warn about a foreign hook)."""
    model = tiny_gpt2(bench)
    sae = bench.topk_sae("transformer.h.0", 32, "cpu", expansion=4, k=8)
    tokens = bench.random_tokens(8, 16, 61)
    hooks_before = dict(model.transformer.h[0]._forward_hooks)
    lines, record = bench.measure_hf_case(model, sae, tokens, 4, 2, "cpu", lambda message: None, "tiny")
    text = "\n".join(lines)
    assert "anchor_error" not in record, text
    assert record["max_abs_diff"] <= 1e-4, text
    assert set(record["max_abs_diff_by_metric"]) == {name for name, _, _ in bench.SHARED_METRICS} | {
        bench.DENSITY_ROW
    }
    assert record["speedup"] > 0 and record["ours_over_bound"] > 0 and record["forward_passes"] > 0
    assert any("speedup anchor/ours" in line for line in lines)
    left = [
        hook for hook in model.transformer.h[0]._forward_hooks.values() if hook not in hooks_before.values()
    ]
    assert all(not getattr(hook, "__module__", "").startswith("sae_lens") for hook in left), left
    # The float64 arbiter (plain torch forward hooks): ours is at least as close to it as SAE Lens.
    assert set(record["error_vs_float64"]) == {"mse", "l1", "ce_orig", "ce_sae", "ce_zero", "ce_loss_score"}
    for name, errors in record["error_vs_float64"].items():
        assert errors["ours"] <= max(errors["anchor"], 1e-6), name
    json.dumps(record)


def test_hf_case_reports_a_failing_anchor(bench, monkeypatch):
    """Where run_evals cannot run on HookedProxyLM, the output names the exception instead of a time."""

    def broken(*args, **kwargs):
        raise NotImplementedError("no HF path today")

    monkeypatch.setattr(bench, "run_anchor", broken)
    model = tiny_gpt2(bench)
    sae = bench.topk_sae("transformer.h.0", 32, "cpu", expansion=4, k=8)
    lines, record = bench.measure_hf_case(
        model, sae, bench.random_tokens(4, 16, 61), 4, 1, "cpu", lambda message: None
    )
    assert record["anchor_error"] == "NotImplementedError: no HF path today"
    assert "seconds_anchor" not in record and "speedup" not in record
    assert any("did not run: NotImplementedError: no HF path today" in line for line in lines)
    assert record["ours_over_bound"] > 0
