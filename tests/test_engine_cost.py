"""The cost model (engine.cost): FLOPs against a hand count, passes sized by memory, refusal with numbers."""

from __future__ import annotations

import pytest

from pytest_saecheck.engine.accumulate import per_sequence_bytes
from pytest_saecheck.engine.cost import (
    ModelShape,
    SAEShape,
    describe_pass,
    memory_groups,
    model_shape_from_config,
    pass_cost,
    sae_shape,
)
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
    assert "3 SAEs on 640 tokens (10 sequences)" in line and "about 12.0 s" in line and "MiB" in line
    assert "after the first pass" in describe_pass(cost, 3, 640, 10, rate=None)


def test_a_pass_holds_at_most_max_saes() -> None:
    saes = [DEMO_SAE] * 7
    assert memory_groups(DEMO, saes, 640, 64, 16, budget_bytes=2**40, max_saes=3) == [
        [0, 1, 2],
        [3, 4, 5],
        [6],
    ]


def test_model_shapes_are_read_from_transformer_lens_and_hugging_face_configs() -> None:
    tl = {"n_layers": 3, "d_model": 128, "d_mlp": 512, "d_vocab": 100}
    assert model_shape_from_config(tl) == DEMO
    gemma = {  # the keys of a Hugging Face config.json (Gemma-2-2B's values)
        "num_hidden_layers": 26,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "vocab_size": 256000,
        "torch_dtype": "bfloat16",
    }
    assert model_shape_from_config(gemma) == ModelShape(26, 2304, 9216, 256000, 2)
    assert model_shape_from_config(gemma, "float32").dtype_bytes == 4  # the dtype setting wins
    gpt2 = {"n_layer": 12, "n_embd": 768, "n_inner": None, "vocab_size": 50257}
    assert model_shape_from_config(gpt2) == ModelShape(12, 768, 4 * 768, 50257, 4)
    assert model_shape_from_config({"hidden_size": 8}) is None


@pytest.mark.parametrize(
    ("hook", "layer", "ablated"),
    [
        ("blocks.2.hook_resid_post", 2, 0),
        ("blocks.1.hook_mlp_out", 1, 2),
        ("model.layers.7.mlp", 7, 2),
        ("hook_embed", 0, 2),
        ("ln_final.hook_normalized", 3, 2),
    ],
)
def test_an_sae_shape_reads_its_layer_and_ablations_from_its_write_hook(
    hook: str, layer: int, ablated: int
) -> None:
    shape = sae_shape(DEMO, d_in=128, d_sae=512, hook_name_out=hook, d_out=64, dtype_bytes=2)
    assert (shape.layer, shape.ablated_per_batch, shape.d_out, shape.dtype_bytes) == (layer, ablated, 64, 2)
    assert shape.weight_bytes == (128 * 512 + 512 * 64 + 512 + 64) * 2


def test_the_line_of_a_release_pass_leads_with_its_progress() -> None:
    cost = pass_cost(DEMO, [DEMO_SAE], n_tokens=640, seq_len=64, batch_size=16)
    line = describe_pass(cost, 1, 640, 10, None, "release pass 2/5, SAEs 4/20 done before it")
    assert line.startswith("saecheck: release pass 2/5, SAEs 4/20 done before it: 1 SAE on 640 tokens")
