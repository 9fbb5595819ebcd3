"""Hugging Face models through the loader and the plugin: a local directory loaded as an AutoModelForCausalLM
(backend hf), spread over devices by an explicit per-layer device_map (on the CPU: the single-device numbers),
and a whole test through the plugin with an SAE that names a module path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import random_sae
from hf_models import ARCHS, VOCAB, tokens

from pytest_saecheck import evaluate
from pytest_saecheck.loading import load_hf_model

# no scaling law: these random SAEs lower the loss, and compute_fraction (which would warn) is not what is compared
ALL_POSITIONS = {
    "exclude_bos": False,
    "exclude_special_tokens": False,
    "progress": False,
    "scaling_law": None,
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    ARCHS[1].build().save_pretrained(path)
    return path


def test_a_local_directory_loads_as_a_causal_lm_in_float32_on_the_cpu(llama_dir):
    model = load_hf_model(str(llama_dir), "cpu", None)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert not model.training


def test_an_explicit_per_layer_device_map_gives_the_single_device_numbers(llama_dir):
    single = load_hf_model(str(llama_dir), "cpu", "float32")
    n_layers = single.config.num_hidden_layers
    device_map = {
        "model.embed_tokens": "cpu",
        **{f"model.layers.{i}": "cpu" for i in range(n_layers)},
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    spread = load_hf_model(str(llama_dir), "cpu", "float32", device_map=device_map)
    assert getattr(spread, "hf_device_map", None) == device_map
    sae = random_sae("model.layers.1", d_in=single.config.hidden_size, d_sae=48, seed=7)
    batch = tokens()
    one = evaluate(single, sae, batch, **ALL_POSITIONS)
    two = evaluate(spread, copy.deepcopy(sae), batch, **ALL_POSITIONS)
    for name, value in one.metrics.items():
        assert two.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_the_plugin_evaluates_an_sae_at_a_module_path_on_the_hf_backend(pytester: pytest.Pytester, llama_dir):
    sae = random_sae("model.layers.1", d_in=32, d_sae=48, seed=8)
    sae.save_model(pytester.path / "sae")
    np.save(pytester.path / "tokens.npy", np.random.default_rng(0).integers(1, VOCAB, size=(8, 16)))
    pytester.makepyfile(
        f"""
        import pytest

        pytestmark = pytest.mark.saecheck(
            model={str(llama_dir)!r}, sae="sae", tokens="tokens.npy", n_tokens=128, context_size=16,
            exclude_special_tokens=False,
        )

        def test_it(saecheck):
            assert type(saecheck.model).__name__ == "LlamaForCausalLM"
            assert saecheck.evaluation.hook_name == "model.layers.1.output"
            assert saecheck.evaluation.model_dtype == "float32"
            assert saecheck.evaluation.metrics["kl_sae"] > 0
        """
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def _same_numbers(one: Any, two: Any) -> None:
    for name, value in one.metrics.items():
        assert two.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize(
    ("device_map", "max_memory"),
    [("auto", None), ("auto", {"cpu": "8GiB"}), ({"": "cpu"}, None)],
    ids=["auto", "auto-max-memory", "explicit-whole-model"],
)
def test_device_maps_accelerate_allows_on_the_cpu_give_the_single_device_numbers(
    llama_dir, device_map, max_memory
):
    single = load_hf_model(str(llama_dir), "cpu", "float32")
    mapped = load_hf_model(str(llama_dir), "cpu", "float32", device_map=device_map, max_memory=max_memory)
    sae = random_sae("model.layers.1", d_in=single.config.hidden_size, d_sae=48, seed=7)
    batch = tokens()
    _same_numbers(
        evaluate(single, sae, batch, **ALL_POSITIONS),
        evaluate(mapped, copy.deepcopy(sae), batch, **ALL_POSITIONS),
    )


def test_layers_offloaded_to_disk_compute_on_their_execution_device(llama_dir, tmp_path):
    """A max_memory too small for the model: accelerate keeps the layers, the final norm and the head on disk (their
    weights on the meta device) and computes them on the CPU. The hooks and the continued layers run where each
    module computes, the logits come back to the scoring device, and the numbers are the single-device run's."""
    from transformers import AutoModelForCausalLM

    from pytest_saecheck.engine.hf import HFCut

    single = load_hf_model(str(llama_dir), "cpu", "float32")
    offloaded = AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype=torch.float32, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    assert next(offloaded.model.layers[1].parameters()).device.type == "meta"
    cut = HFCut(offloaded)
    assert {str(device) for device in cut.layer_devices} == {"cpu"} and str(cut.output_device) == "cpu"
    for where in ("model.layers.1", "model.layers.1.mlp"):
        sae = random_sae(where, d_in=single.config.hidden_size, d_sae=48, seed=7)
        batch = tokens()
        one = evaluate(single, sae, batch, **ALL_POSITIONS)
        two = evaluate(offloaded, copy.deepcopy(sae), batch, **ALL_POSITIONS)
        assert two.device == "cpu"
        _same_numbers(one, two)


def test_transformers_own_output_recorders_are_not_hooks_on_the_model(llama_dir):
    """transformers 5 installs recording hooks on the layers the first time hidden states are asked for; they change
    no output, so they are not reported as hooks that the measured model runs with (a user's hook still is)."""
    from pytest_saecheck.engine.hf import HFCut

    model = load_hf_model(str(llama_dir), "cpu", "float32")
    with torch.no_grad():
        model(input_ids=tokens()[:1], output_hidden_states=True)
    assert any(module._forward_hooks for module in model.modules())  # transformers' recorders are there
    assert HFCut(model).check() == []
    handle = model.model.layers[0].register_forward_hook(lambda module, args, output: None)
    try:
        assert HFCut(model).check() == ["model.layers.0 (forward hook)"]
    finally:
        handle.remove()
