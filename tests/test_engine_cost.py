"""The cost model (engine.cost): FLOPs against a hand count, passes sized by memory, refusal with numbers."""

from __future__ import annotations

import pytest

from pytest_saecheck.engine.accumulate import per_sequence_bytes
from pytest_saecheck.engine.cost import ModelShape, SAEShape, describe_pass, memory_groups, pass_cost
from pytest_saecheck.errors import ConfigError

DEMO = ModelShape(n_layers=3, d_model=128, d_mlp=512, d_vocab=100)
DEMO_SAE = SAEShape(d_in=128, d_sae=512, layer=2)


def test_flops_match_a_hand_count() -> None:
    cost = pass_cost(DEMO, [DEMO_SAE], n_tokens=640, seq_len=64, batch_size=16)
    per_layer = 4 * 128 * 128 + 2 * 128 * 512
    unembed = 2 * 128 * 100
    assert cost.flops_shared == 640 * (2 * per_layer * 3 + unembed)
    assert cost.flops_per_sae == (640 * (2 * 512 * 256 + 2 * per_layer * 1 + unembed),)
    assert cost.bytes_sums == 10 * per_sequence_bytes(128, 64)


def test_a_release_is_split_into_passes_that_fit_the_budget() -> None:
    """24 demo-sized SAEs, a budget holding 5 beside the model and a batch: 5 passes, each under budget."""
    saes = [SAEShape(d_in=128, d_sae=512, layer=layer % 3) for layer in range(24)]
    args = (DEMO, 16_384, 64, 16)
    five = pass_cost(DEMO, saes[:5], *args[1:]).peak_bytes
    six = pass_cost(DEMO, saes[:6], *args[1:]).peak_bytes
    budget = (five + six) // 2
    groups = memory_groups(DEMO, saes, *args[1:], budget_bytes=budget)
    assert [len(g) for g in groups] == [5, 5, 5, 5, 4]
    assert sorted(i for g in groups for i in g) == list(range(24))
    assert all(pass_cost(DEMO, [saes[i] for i in g], *args[1:]).peak_bytes <= budget for g in groups)
    room = budget - pass_cost(DEMO, [], *args[1:]).peak_bytes  # what the budget leaves beside model and batch
    assert sum(s.weight_bytes for s in saes) > room  # the release's weights alone exceed it


def test_one_sae_bigger_than_the_budget_is_refused_with_the_numbers() -> None:
    big = SAEShape(d_in=4608, d_sae=262_144, layer=10, dtype_bytes=2)
    model = ModelShape(n_layers=62, d_model=4608, d_mlp=36_864, d_vocab=262_144, dtype_bytes=2)
    with pytest.raises(ConfigError, match=r"SAE 0 needs [\d,]+ MiB .*weights 4,609 MiB.*budget of 1,024 MiB"):
        memory_groups(model, [big], 1024, 1024, 1, budget_bytes=2**30)


def test_the_line_before_the_work_names_tokens_saes_memory_and_time() -> None:
    cost = pass_cost(DEMO, [DEMO_SAE] * 3, n_tokens=640, seq_len=64, batch_size=16)
    line = describe_pass(cost, 3, 640, 10, rate=cost.flops / 12.0)
    assert "3 SAEs on 640 tokens (10 sequences)" in line and "about 12 s" in line and "MiB" in line
    assert "after the first pass" in describe_pass(cost, 3, 640, 10, rate=None)
