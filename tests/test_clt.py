"""Cross-layer transcoders: loading per layer, the whole replacement spliced at once, and its metrics.

The oracle is independent of the package: plain TransformerLens ``run_with_hooks`` on a float64 copy of the
model, every MLP output replaced by the CLT's reconstruction computed from the raw tensors, CE and KL in float64.
"""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
from factories import (
    D_MODEL,
    clt_hooks,
    clt_tensors_from_mlps,
    make_tokens,
    relu_model,
    write_circuit_tracer_clt,
    write_gemma_scope_2_clt,
)
from transformer_lens import HookedTransformer

from pytest_saecheck.clt import CrossLayerTranscoder, from_tensors, layer_name
from pytest_saecheck.engine.replacement import evaluate_replacement
from pytest_saecheck.errors import ConfigError, HookNotFoundError, LoadError
from pytest_saecheck.loading.clt import load_clt_directory


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return relu_model()


def clt_of(tensors: dict, model: HookedTransformer, **kwargs) -> CrossLayerTranscoder:
    return from_tensors(**tensors, **clt_hooks(model.cfg.n_layers), **kwargs)


def oracle(model: HookedTransformer, tensors: dict, tokens: torch.Tensor, keep_layers=()) -> dict[str, float]:
    """ΔCE and KL of the replacement, float64, plain hooks; position 0 (BOS) neither replaced nor averaged."""
    m64 = copy.deepcopy(model).to(torch.float64)
    t = {key: [v.double() for v in values] for key, values in tensors.items()}
    n = m64.cfg.n_layers
    kept = torch.ones_like(tokens, dtype=torch.bool)
    kept[:, 0] = False
    latents: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}

    def read(layer):
        def hook(x, hook):
            pre = x @ t["W_enc"][layer] + t["b_enc"][layer]
            if "threshold" in t:
                latents[layer] = pre * (pre > t["threshold"][layer])
            else:
                latents[layer] = torch.relu(pre)
            inputs[layer] = x

        return hook

    def write(layer):
        def hook(y, hook):
            out = t["b_dec"][layer] + sum(latents[s] @ t["W_dec"][s][:, layer - s] for s in range(layer + 1))
            if "W_skip" in t:
                out = out + inputs[layer] @ t["W_skip"][layer]
            if layer in keep_layers:
                return y
            return torch.where(kept[..., None], out, y)

        return hook

    hooks = [(f"blocks.{layer}.ln2.hook_normalized", read(layer)) for layer in range(n)]
    hooks += [(f"blocks.{layer}.hook_mlp_out", write(layer)) for layer in range(n)]
    with torch.no_grad():
        logits = m64(tokens)
        replaced = m64.run_with_hooks(tokens, fwd_hooks=hooks)
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(replaced, -1)

    def ce(log_probs):
        return -log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)[kept[:, :-1]].mean().item()

    kl = (lp.exp() * (lp - lq)).sum(-1)[kept].mean().item()
    return {"ce_orig": ce(lp), "ce_sae": ce(lq), "delta_ce": ce(lq) - ce(lp), "kl_sae": kl}


@pytest.mark.parametrize("spread", [False, True], ids=["own-layer", "spread-over-two-layers"])
def test_a_clt_of_the_models_own_mlps_is_lossless(model, spread):
    tensors = clt_tensors_from_mlps(model, spread=spread)
    result = evaluate_replacement(model, clt_of(tensors, model), make_tokens(8), batch_size=3, progress=False)
    m = result.metrics
    assert m["delta_ce"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    for layer in range(model.cfg.n_layers):
        member = result.members[layer_name(layer)]
        assert member["explained_variance"] == pytest.approx(1.0, abs=1e-5)
        assert member["explained_variance_alone"] == pytest.approx(1.0, abs=1e-5)
        assert member["delta_ce_alone"] == pytest.approx(0.0, abs=1e-5)
        assert result.layers[layer_name(layer)].metrics["delta_ce"] == pytest.approx(0.0, abs=1e-5)
    assert result.compounding["delta_ce_joint"] == pytest.approx(0.0, abs=1e-5)


def perturbed(model, layer=0, scale=0.3, seed=5):
    tensors = clt_tensors_from_mlps(model, spread=True)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(tensors["W_dec"][layer].shape, generator=generator) * scale
    tensors["W_dec"][layer] = tensors["W_dec"][layer] + noise  # writes into every later layer too
    return tensors


def test_a_perturbed_clt_equals_the_float64_oracle(model):
    tensors = perturbed(model)
    tokens = make_tokens(10)
    result = evaluate_replacement(model, clt_of(tensors, model), tokens, batch_size=4, progress=False)
    expected = oracle(model, tensors, tokens)
    assert abs(expected["delta_ce"]) > 1e-3 and expected["kl_sae"] > 1e-3  # the perturbation is measurable
    for name in ("ce_orig", "ce_sae", "delta_ce", "kl_sae"):
        assert result.metrics[name] == pytest.approx(expected[name], abs=1e-5), name
    low, high = result.confidence_interval("delta_ce")
    assert low <= result.metrics["delta_ce"] <= high
    # every later layer now receives a wrong write from layer 0: each is worse inside the replacement
    assert result.members[layer_name(1)]["explained_variance"] < 1.0 - 1e-4


def test_kept_layers_keep_the_models_own_output(model):
    tensors = perturbed(model, layer=1)
    tokens = make_tokens(8)
    result = evaluate_replacement(
        model, clt_of(tensors, model), tokens, batch_size=4, keep_layers=[1], progress=False
    )
    expected = oracle(model, tensors, tokens, keep_layers={1})
    assert result.metrics["delta_ce"] == pytest.approx(expected["delta_ce"], abs=1e-5)
    assert result.members[layer_name(1)]["kept"] == 1.0
    assert result.dictionary["keep_layers"] == [1]


def test_jump_relu_and_skip_connections_match_the_oracle(model):
    tensors = perturbed(model, layer=2, scale=0.2)
    generator = torch.Generator().manual_seed(9)
    tensors["threshold"] = [torch.rand(w.shape[1], generator=generator) * 0.2 for w in tensors["W_enc"]]
    tensors["W_skip"] = [torch.randn(D_MODEL, D_MODEL, generator=generator) * 0.02 for _ in tensors["W_enc"]]
    tokens = make_tokens(8)
    result = evaluate_replacement(
        model, clt_of(tensors, model), tokens, batch_size=8, alone=False, progress=False
    )
    expected = oracle(model, tensors, tokens)
    assert result.metrics["delta_ce"] == pytest.approx(expected["delta_ce"], abs=1e-5)
    assert result.metrics["kl_sae"] == pytest.approx(expected["kl_sae"], abs=1e-5)


def test_compounding_sums_each_layer_alone(model):
    tensors = perturbed(model, layer=0, scale=0.2)
    result = evaluate_replacement(model, clt_of(tensors, model), make_tokens(8), batch_size=4, progress=False)
    alone = sum(result.layers[layer_name(layer)].metrics["delta_ce"] for layer in range(model.cfg.n_layers))
    assert result.compounding["delta_ce_isolated_sum"] == pytest.approx(alone, abs=1e-9)
    assert result.compounding["delta_ce_joint"] == pytest.approx(result.metrics["delta_ce"], abs=1e-9)
    low, high = result.compounding["excess_interval"]
    assert low <= result.compounding["excess"] <= high


@pytest.mark.parametrize(
    "writer", [write_circuit_tracer_clt, write_gemma_scope_2_clt], ids=["circuit-tracer", "gs2"]
)
def test_a_folder_loads_per_layer_and_equals_the_oracle(model, tmp_path, writer):
    tensors = perturbed(model, layer=1)
    generator = torch.Generator().manual_seed(4)
    tensors["threshold"] = [torch.rand(w.shape[1], generator=generator) * 0.1 for w in tensors["W_enc"]]
    if writer is write_gemma_scope_2_clt:  # Gemma Scope 2's affine CLTs have a skip connection
        tensors["W_skip"] = [
            torch.randn(D_MODEL, D_MODEL, generator=generator) * 0.02 for _ in tensors["W_enc"]
        ]
    clt = load_clt_directory(writer(tmp_path / "clt", tensors))
    assert clt.activation == "jump_relu" and clt.has_skip == ("W_skip" in tensors)
    assert clt.n_layers == model.cfg.n_layers and clt.d_model == D_MODEL
    assert clt.record.hook_names_in[2] == "blocks.2.ln2.hook_normalized"
    tokens = make_tokens(8)
    result = evaluate_replacement(model, clt, tokens, batch_size=4, alone=False, progress=False)
    assert result.metrics["delta_ce"] == pytest.approx(oracle(model, tensors, tokens)["delta_ce"], abs=1e-5)


def test_a_clt_over_the_weight_budget_streams_one_slice_at_a_time(model, tmp_path):
    """Decoders totalling 4x the budget: streamed, and the measured peak of weights alive stays in the budget."""
    tensors = perturbed(model)
    clt = load_clt_directory(write_circuit_tracer_clt(tmp_path / "clt", tensors))
    decoder_bytes = sum(w.numel() * 4 for w in tensors["W_dec"])
    budget = decoder_bytes // 4
    streamed = load_clt_directory(tmp_path / "clt", weight_budget_bytes=budget)
    assert not streamed.cache.resident and clt.cache.resident
    tokens = make_tokens(8)
    result = evaluate_replacement(model, streamed, tokens, batch_size=4, alone=False, progress=False)
    gc.collect()
    assert 0 < streamed.cache.peak_bytes <= budget
    assert result.dictionary["weight_peak_bytes"] == streamed.cache.peak_bytes
    resident = evaluate_replacement(model, clt, tokens, batch_size=4, alone=False, progress=False)
    assert result.metrics["delta_ce"] == pytest.approx(resident.metrics["delta_ce"], abs=1e-7)
    assert clt.cache.peak_bytes > budget  # the resident copy holds them all


def test_a_budget_smaller_than_one_slice_is_refused_naming_it(model, tmp_path):
    clt = load_clt_directory(
        write_circuit_tracer_clt(tmp_path / "clt", perturbed(model)), weight_budget_bytes=1000
    )
    with pytest.raises(ConfigError, match=r"weight budget of 0\.0 MiB \(weight_budget_bytes\)"):
        evaluate_replacement(model, clt, make_tokens(4), progress=False)


def test_folder_errors_name_the_file_and_the_key(model, tmp_path):
    from safetensors.torch import save_file

    folder = write_circuit_tracer_clt(tmp_path / "clt", perturbed(model))
    save_file({"W_dec_1": torch.zeros(3, 2, D_MODEL)}, str(folder / "W_dec_1.safetensors"))
    with pytest.raises(
        LoadError, match=r"W_dec_1\.safetensors.*'W_dec_1' has shape \(3, 2, 32\), expected \(128, 2, 32\)"
    ):
        load_clt_directory(folder)
    (folder / "W_enc_1.safetensors").unlink()
    with pytest.raises(LoadError, match="missing layer 1"):
        load_clt_directory(folder)
    (folder / "W_enc_1.safetensors").write_bytes((folder / "W_enc_0.safetensors").read_bytes())
    with pytest.raises(LoadError, match="no tensor 'W_enc_1'"):
        load_clt_directory(folder)
    folder = write_circuit_tracer_clt(tmp_path / "clt", perturbed(model))
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text() + "n_layers: 4\n")
    with pytest.raises(LoadError, match="records n_layers=4, but the weight files hold n_layers=3"):
        load_clt_directory(folder)
    (folder / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(LoadError, match="model_kind='transcoder_set'"):
        load_clt_directory(folder)


def test_a_clt_for_another_model_is_refused(model):
    tensors = clt_tensors_from_mlps(model)
    short = {key: values[:2] for key, values in tensors.items()}
    short["W_dec"] = [w[:, : 2 - layer] for layer, w in enumerate(short["W_dec"])]
    with pytest.raises(ConfigError, match="the CLT has 2 layers but the model has 3"):
        evaluate_replacement(model, from_tensors(**short, **clt_hooks(2)), make_tokens(4), progress=False)
    wrong = from_tensors(**tensors, **clt_hooks(3, hook_in="hook_nope"))
    with pytest.raises(HookNotFoundError, match=r"blocks\.0\.hook_nope"):
        evaluate_replacement(model, wrong, make_tokens(4), progress=False)


def test_load_sae_reads_both_folder_layouts(model, tmp_path):
    from pytest_saecheck import evaluate, load_sae

    tensors = perturbed(model)
    tokens = make_tokens(6)
    expected = oracle(model, tensors, tokens)["delta_ce"]
    for writer in (write_circuit_tracer_clt, write_gemma_scope_2_clt):
        clt = load_sae(str(writer(tmp_path / writer.__name__, tensors)), device="cpu")
        assert isinstance(clt, CrossLayerTranscoder)
        result = evaluate(model, clt, tokens, batch_size=3, progress=False)
        assert result.metrics["delta_ce"] == pytest.approx(expected, abs=1e-5)
        assert set(result.layers) == {layer_name(layer) for layer in range(3)}


def test_a_clt_in_a_set_of_dictionaries_is_refused(model):
    from factories import mlp_transcoder

    from pytest_saecheck import evaluate

    clt = clt_of(clt_tensors_from_mlps(model), model)
    with pytest.raises(ConfigError, match="evaluate it alone"):
        evaluate(model, {"clt": clt, "tc": mlp_transcoder(model, 1)}, make_tokens(4), joint=True)


def test_an_sae_lens_clt_release_loads_the_whole_clt_from_the_cache(model, tmp_path, monkeypatch):
    """SAE Lens sums these releases' decoders; here the repository is read as the circuit-tracer CLT it is."""
    from huggingface_hub import constants
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from pytest_saecheck import load_sae
    from pytest_saecheck.errors import WeightsUnavailableError

    releases = {
        name: release
        for name, release in get_pretrained_saes_directory().items()
        if release.conversion_func == "mntss_clt_layer_transcoder"
    }
    if not releases:  # pragma: no cover - depends on the installed SAE Lens' release list
        pytest.skip("this SAE Lens lists no cross-layer transcoder release")
    name, release = next(iter(releases.items()))
    spec = f"{name}/{next(iter(release.saes_map))}"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match=release.repo_id):
        load_sae(spec, device="cpu")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{release.repo_id.replace('/', '--')}"
    tensors = perturbed(model)
    write_circuit_tracer_clt(repo / "snapshots" / commit, tensors)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    clt = load_sae(spec, device="cpu")
    assert isinstance(clt, CrossLayerTranscoder) and clt.n_layers == 3
    assert clt.record.format == "circuit_tracer"
    tokens = make_tokens(6)
    result = evaluate_replacement(model, clt, tokens, batch_size=3, alone=False, progress=False)
    assert result.metrics["delta_ce"] == pytest.approx(oracle(model, tensors, tokens)["delta_ce"], abs=1e-5)


CLT_TEST = """
import pytest
from pytest_saecheck import assert_ce_recovery

# no model=: the CLT's own record names it (config.yaml's model_name; config.json's for Gemma Scope 2)
pytestmark = pytest.mark.saecheck(sae="{sae}", tokens="tokens.npy", n_tokens=160, context_size=16)

def test_replacement(saecheck):
    assert saecheck.evaluation.dictionary["kind"] == "cross_layer_transcoder"
    assert saecheck.evaluation.members["layer 1"]["explained_variance_alone"] < 1.0
    assert_ce_recovery(saecheck, metric="delta_ce", max_value=50.0, confidence=0.95)

def test_replacement_gate_fails(saecheck):
    assert_ce_recovery(saecheck, metric="delta_ce", max_value=-10.0)

def test_layer_gate_fails(saecheck):
    assert_ce_recovery(saecheck, metric="delta_ce", max_value=-10.0, layer=1)
"""


@pytest.mark.parametrize(
    "writer", [write_circuit_tracer_clt, write_gemma_scope_2_clt], ids=["circuit-tracer", "gs2"]
)
def test_the_plugin_gates_a_clt_folder(tiny_pytester, writer):
    from factories import make_tiny_model

    folder = writer(tiny_pytester.path / "clt", clt_tensors_from_mlps(make_tiny_model()))
    if writer is write_gemma_scope_2_clt:
        (folder / "config.json").write_text(json.dumps({"model_name": "tiny", "architecture": "jump_relu"}))
    tiny_pytester.makepyfile(CLT_TEST.format(sae="clt"))
    result = tiny_pytester.runpytest_inprocess("--saecheck-report=r.html", "--saecheck-json=r.json")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*with only layer 1 replaced, delta_ce*"])
    (entry,) = json.loads((tiny_pytester.path / "r.json").read_text())["saes"]
    assert entry["dictionary"]["kind"] == "cross_layer_transcoder"
    assert set(entry["members"]) == {"layer 0", "layer 1"}
    assert entry["compounding"]["delta_ce_joint"] == pytest.approx(entry["metrics"]["delta_ce"])
    html = (tiny_pytester.path / "r.html").read_text()
    assert "Reconstruction of each MLP output" in html and "ΔCE alone" in html


def test_a_plt_replacement_gets_the_same_view_through_the_joint_splice(model):
    """Per-layer transcoders spliced jointly equal run_with_hooks with every replacement at once (the oracle
    with diagonal decoders), and carry the per-layer view a CLT's replacement has."""
    from factories import mlp_transcoder

    from pytest_saecheck import assert_ce_recovery, evaluate

    tensors = clt_tensors_from_mlps(model)
    generator = torch.Generator().manual_seed(3)
    transcoders = {}
    for layer in range(model.cfg.n_layers):
        tc = mlp_transcoder(model, layer)
        with torch.no_grad():
            tc.W_dec.add_(torch.randn(tc.W_dec.shape, generator=generator) * 0.2)
        tensors["W_dec"][layer][:, 0] = tc.W_dec.detach()
        transcoders[layer_name(layer)] = tc
    tokens = make_tokens(8)
    result = evaluate(model, transcoders, tokens, joint=True, batch_size=4, progress=False)
    expected = oracle(model, tensors, tokens)
    assert result.joint.metrics["delta_ce"] == pytest.approx(expected["delta_ce"], abs=1e-5)
    assert result.joint.metrics["kl_sae"] == pytest.approx(expected["kl_sae"], abs=1e-5)
    clt = evaluate(model, clt_of(tensors, model), tokens, batch_size=4, progress=False)
    assert clt.metrics["delta_ce"] == pytest.approx(result.joint.metrics["delta_ce"], abs=1e-5)
    for layer in range(model.cfg.n_layers):
        name = layer_name(layer)
        assert result.joint.members[name]["delta_ce_alone"] == pytest.approx(
            clt.members[name]["delta_ce_alone"], abs=1e-5
        )
        assert result.joint.members[name]["explained_variance"] == pytest.approx(
            clt.members[name]["explained_variance"], abs=1e-5
        )
    assert result.joint.layers[layer_name(2)] is result[layer_name(2)]
    with pytest.raises(AssertionError, match="with only layer 'layer 2' replaced"):
        assert_ce_recovery(result.joint, metric="delta_ce", max_value=-10.0, layer="layer 2")
    with pytest.raises(ConfigError, match="unknown layer 7"):
        assert_ce_recovery(clt, metric="delta_ce", max_value=1.0, layer=7)


def test_the_plugins_weight_budget_streams_a_clt(tiny_pytester):
    """weight_budget_mib=1 with 1.3 MiB of weights: streamed, and the peak of weights alive measured within 1 MiB."""
    from factories import make_tiny_model

    tensors = clt_tensors_from_mlps(make_tiny_model())
    wide = {
        "W_enc": [torch.cat([w] * 40, dim=1) for w in tensors["W_enc"]],
        "b_enc": [torch.cat([b] * 40) for b in tensors["b_enc"]],
        "W_dec": [torch.cat([w] * 40, dim=0) / 40 for w in tensors["W_dec"]],
        "b_dec": tensors["b_dec"],
    }
    write_circuit_tracer_clt(tiny_pytester.path / "clt", wide)
    tiny_pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.saecheck(model="tiny", sae="clt", tokens="tokens.npy", n_tokens=160,
                                          context_size=16, weight_budget_mib=1)

        def test_streamed(saecheck):
            record = saecheck.evaluation.dictionary
            assert record["weight_bytes"] > 2**20 and not record["weights_resident"]
            assert 0 < record["weight_peak_bytes"] <= 2**20
            print("MEASURED", record["weight_bytes"], record["weight_peak_bytes"])
        """
    )
    result = tiny_pytester.runpytest_inprocess("-s")
    result.assert_outcomes(passed=1)


def test_circuit_tracer_graph_scores_say_why_they_are_unavailable():
    from pytest_saecheck.clt import circuit_tracer_graph_scores

    with pytest.raises(LoadError, match=r"<=4\.57\.3.*TransformerLens 3\.9 requires transformers>=5\.9"):
        circuit_tracer_graph_scores("The capital of France is")


def test_a_clt_with_nan_weights_is_refused_naming_the_tensor(model, tmp_path):
    from pytest_saecheck.errors import NonFiniteError

    tensors = perturbed(model)
    tensors["W_dec"][1][3, 1, 5] = float("nan")
    clt = load_clt_directory(write_circuit_tracer_clt(tmp_path / "clt", tensors))
    with pytest.raises(NonFiniteError, match=r"W_dec_1 in .*W_dec_1\.safetensors holds NaN"):
        evaluate_replacement(model, clt, make_tokens(4), alone=False, progress=False)


def test_decode_layer_is_the_sum_over_source_layers(model):
    tensors = perturbed(model)
    clt = clt_of(tensors, model)
    x = [torch.randn(2, 5, D_MODEL) for _ in range(3)]
    z = [clt.encode_layer(x[layer], layer) for layer in range(3)]
    expected = tensors["b_dec"][2] + sum(z[s] @ tensors["W_dec"][s][:, 2 - s] for s in range(3))
    torch.testing.assert_close(clt.decode_layer(z, 2), expected)
    torch.testing.assert_close(
        clt.decode_layer([None, None, z[2]], 2), tensors["b_dec"][2] + z[2] @ tensors["W_dec"][2][:, 0]
    )
    with pytest.raises(ConfigError, match=r"write only to layers 2\.\.2, not 1"):
        clt.write(z[2], 2, 1)


def test_a_bfloat16_model_runs_the_clt_in_its_dtype_and_sums_in_float64(model):
    tensors = clt_tensors_from_mlps(model)
    low = copy.deepcopy(model).to(torch.bfloat16)
    result = evaluate_replacement(low, clt_of(tensors, model), make_tokens(6), batch_size=3, progress=False)
    assert result.model_dtype == "bfloat16"
    assert abs(result.metrics["delta_ce"]) < 0.05  # exact up to bfloat16 rounding
    assert result.members[layer_name(2)]["explained_variance"] > 0.99


def test_a_gemma_scope_2_clt_reads_the_norms_output(tmp_path):
    """Gemma Scope 2 records pre_feedforward_layernorm.output: normalised × weight + bias in TransformerLens."""
    model = relu_model(seed=7)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for block in model.blocks:
            block.ln2.w.copy_(1 + 0.5 * torch.randn(D_MODEL, generator=generator))
            block.ln2.b.copy_(0.1 * torch.randn(D_MODEL, generator=generator))
    tensors = clt_tensors_from_mlps(model)
    tokens = make_tokens(6)
    gs2 = load_clt_directory(write_gemma_scope_2_clt(tmp_path / "gs2", tensors))
    assert gs2.record.norm_output
    result = evaluate_replacement(model, gs2, tokens, batch_size=3, alone=False, progress=False)
    assert result.metrics["delta_ce"] == pytest.approx(0.0, abs=1e-5)
    assert result.members[layer_name(1)]["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    # circuit-tracer's config names the hook itself, read as named: here the pre-affine activation, not exact
    ct = load_clt_directory(write_circuit_tracer_clt(tmp_path / "ct", tensors))
    off = evaluate_replacement(model, ct, tokens, batch_size=3, alone=False, progress=False)
    assert off.members[layer_name(1)]["explained_variance"] < 0.99


def test_a_norm_output_clt_on_a_model_with_folded_norms_is_refused(tmp_path):
    from transformer_lens import HookedTransformer

    model = relu_model()
    folded = HookedTransformer(model.cfg)
    folded.load_and_process_state_dict(model.state_dict(), fold_ln=True)
    gs2 = load_clt_directory(write_gemma_scope_2_clt(tmp_path / "gs2", clt_tensors_from_mlps(model)))
    with pytest.raises(ConfigError, match="folded into the MLP"):
        evaluate_replacement(folded, gs2, make_tokens(4), progress=False)
