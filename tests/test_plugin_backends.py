"""The plugin's backend choice: a dictionary whose record names a tensor a ``HookedTransformer`` has no
faithful point at (Gemma Scope 2 transcoders read the pre-MLP norm's output with its gain) is evaluated on the
Hugging Face backend, end to end through the marker and the fixture, from an offline hub cache that holds a tiny
Gemma 3 under its real id and the transcoder in the release's own layout; nothing is fetched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from offline_hub import GEMMA_SCOPE_2_RELEASE, save_gemma_scope_2_transcoder, save_model, use_offline_cache
from tiny_hf import SAE_ID, VOCAB, exact_gemma_transcoder, tiny_hf

from pytest_saecheck.hookpoints import HookRecord, choose_backend

GEMMA_SCOPE_2_TRANSCODER = HookRecord(
    "blocks.3.hook_mlp_in",
    "blocks.3.hook_mlp_out",
    "model.layers.3.pre_feedforward_layernorm.output",
    "model.layers.3.post_feedforward_layernorm.output",
)


def test_a_gained_norm_output_record_asks_for_the_hf_backend():
    choice = choose_backend(GEMMA_SCOPE_2_TRANSCODER, transcoder=True, architecture="Gemma3ForCausalLM")
    assert choice.backend == "hf"
    assert "pre_feedforward_layernorm.output" in choice.reason and "no hook" in choice.reason
    # without the architecture every map that places the point is asked: the same answer
    assert choose_backend(GEMMA_SCOPE_2_TRANSCODER, transcoder=True).backend == "hf"


@pytest.mark.parametrize(
    ("record", "transcoder", "backend"),
    [
        # Gemma Scope 2 residual SAEs: both records name the residual, which TransformerLens hooks
        (HookRecord("blocks.3.hook_resid_post", None, "model.layers.3.output"), False, "transformer_lens"),
        # the attention SAEs read the heads' outputs (hook_z)
        (
            HookRecord("blocks.3.attn.hook_z", None, "model.layers.3.self_attn.o_proj.input"),
            False,
            "transformer_lens",
        ),
        # Gemma Scope 1 transcoders: ln2.hook_normalized, no Hugging Face record
        (HookRecord("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"), True, "transformer_lens"),
        # sparsify / Qwen Scope: a module path
        (HookRecord("layers.6"), False, "hf"),
        (HookRecord("blocks.6.hook_resid_post", None, "model.layers.6"), False, "transformer_lens"),
        # a raw MLP output before Gemma's post norm: no TransformerLens hook
        (HookRecord(None, None, "model.layers.2.mlp.output"), False, "hf"),
        # the override: the test's hook_name decides alone
        (
            HookRecord("blocks.3.hook_resid_post", None, "model.layers.3.mlp.output", override=True),
            False,
            "transformer_lens",
        ),
    ],
)
def test_the_record_decides_the_backend(record, transcoder, backend):
    assert choose_backend(record, transcoder=transcoder, architecture="Gemma3ForCausalLM").backend == backend


def test_a_point_no_map_places_asks_for_the_hf_backend():
    choice = choose_backend(HookRecord(None, None, "transformer.blocks.3.ffn.output"), transcoder=False)
    assert choice.backend == "hf" and "no TransformerLens hook map" in choice.reason


PLUGIN_TEST = f"""
import json
import pytest
from pytest_saecheck import assert_ce_recovery

pytestmark = pytest.mark.saecheck(
    sae="{GEMMA_SCOPE_2_RELEASE}/{SAE_ID}", tokens="tokens.npy", n_tokens=128, context_size=16,
    exclude_special_tokens=False,
)

def test_where_it_was_trained(saecheck):
    assert saecheck.backend == "hf"
    assert type(saecheck.model).__name__ == "Gemma3ForCausalLM"
    evaluation = saecheck.evaluation
    assert evaluation.backend == "hf"
    points = evaluation.dictionary["points"]
    assert points["read"]["point"] == "model.layers.0.pre_feedforward_layernorm.output"
    assert points["read"]["source"] == "hf_hook_name"
    assert evaluation.metrics["explained_variance"] == pytest.approx(1, abs=1e-5)
    assert evaluation.metrics["kl_sae"] == pytest.approx(0, abs=1e-6)
    assert evaluation.metrics["delta_ce"] == pytest.approx(0, abs=1e-5)
    assert_ce_recovery(saecheck, metric="kl_sae", max_value=1e-5)
    assert_ce_recovery(saecheck, metric="delta_ce", max_value=1e-4)
"""


@pytest.fixture(scope="module")
def gemma_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 3 saved as google/gemma-3-270m (the model SAE Lens names for the release) and the exact
    transcoder, in an offline hub cache. Module-scoped: built (and torch's lazily imported modules with it) before
    pytester snapshots ``sys.modules``, which it restores after each test."""
    import datasets  # noqa: F401 - imported by the inner run otherwise, then dropped (it registers arrow types)
    import sae_lens  # noqa: F401

    root = tmp_path_factory.mktemp("hf-home")
    hf = tiny_hf("Gemma3ForCausalLM")
    weights = exact_gemma_transcoder(hf)  # silences layer 0's attention, then fits the transcoder exactly
    save_model(root, "google/gemma-3-270m", hf)
    save_gemma_scope_2_transcoder(root, SAE_ID, 0, weights)
    return root


def test_gemma_scope_2_through_the_plugin_runs_on_the_hf_backend_and_says_so(
    gemma_hub: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    use_offline_cache(gemma_hub, monkeypatch)  # any HTTP request of SAE Lens' loader fails the test
    ids = np.random.default_rng(0).integers(1, VOCAB, size=(8, 16))  # token 0 is Gemma's padding id
    np.save(pytester.path / "tokens.npy", ids)
    pytester.makepyfile(PLUGIN_TEST)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--saecheck-json", "out.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*the hf backend (its hf_hook_name *pre_feedforward_layernorm.output*no hook at)*"]
    )
    document = json.loads((pytester.path / "out.json").read_text())
    (entry,) = document["saes"]
    assert entry["backend"] == "hf"
    assert entry["model"]["loading"]["backend"]["name"] == "hf"
    assert "pre_feedforward_layernorm.output" in entry["model"]["loading"]["backend"]["reason"]


def test_the_architecture_is_read_from_files_on_this_machine_only(gemma_hub, tmp_path, monkeypatch):
    """A local directory's or a cached hub id's config.json names the architecture; anything else gives None
    (the choice then asks every map), and nothing is fetched."""
    from pytest_saecheck.plugin.fixtures import _architecture

    use_offline_cache(gemma_hub, monkeypatch)
    assert _architecture("google/gemma-3-270m") == "Gemma3ForCausalLM"
    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert _architecture(str(local)) == "LlamaForCausalLM"
    assert _architecture("google/not-cached-here") is None
    assert _architecture("gpt2-small") is None and _architecture(None) is None
