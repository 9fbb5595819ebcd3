"""The Hugging Face backend on five architectures (GPT-2, Llama, Gemma 3 with pre/post norms and a logit soft-cap,
Qwen3, GPT-NeoX), tiny models built from transformers configs, all offline on the CPU.

- an identity SAE at a residual point: ΔCE 0, KL 0, R² 1;
- an exact MLP transcoder at the MLP's own input and output points: R² 1, ΔCE 0, KL 0;
- a random SAE: every metric equals an independent float64 computation with plain torch forward hooks;
- a point outside the decoder layers: the whole forward runs again, the same numbers, and the result says so.
"""

from __future__ import annotations

import copy

import pytest
import torch
from factories import identity_sae, random_sae
from hf_models import ARCHS, Arch, mlp_transcoder, tokens

from pytest_saecheck import evaluate
from pytest_saecheck.errors import HookNotFoundError, ModelStateError

ALL_POSITIONS = {"exclude_bos": False, "exclude_special_tokens": False, "progress": False}
IDS = [arch.name for arch in ARCHS]


@pytest.fixture(scope="module", params=ARCHS, ids=IDS)
def arch_model(request: pytest.FixtureRequest) -> tuple[Arch, torch.nn.Module]:
    arch: Arch = request.param
    return arch, arch.build()


def reference(
    model: torch.nn.Module, read: str, write: str, reconstruct, batch: torch.Tensor
) -> dict[str, float]:
    """ce_orig, ce_sae, kl_sae, explained_variance of a splice, in float64, with plain torch hooks: the model's
    own forward, the activation at ``write`` replaced by ``reconstruct`` of the activation at ``read``."""
    model = copy.deepcopy(model).double()
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def grab(point: str, replace: bool):
        path, io = point.rsplit(".", 1)
        module = modules[path]
        if io == "input":

            def pre(module, args, kwargs):
                seen[point] = args[0] if args else kwargs["hidden_states"]

            return module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen[point] = hidden
            if replace:
                new = reconstruct(seen[read]).to(hidden.dtype)
                seen["recon"] = new
                return (new, *output[1:]) if isinstance(output, tuple) else new
            return None

        return module.register_forward_hook(post)

    with torch.no_grad():
        handles = [grab(read, False)] if read != write else []
        handles.append(grab(write, False))
        original = model(input_ids=batch).logits
        x_out = seen[write]
        for handle in handles:
            handle.remove()
        handles = [grab(read, False)] if read != write else []
        handles.append(grab(write, True))
        spliced = model(input_ids=batch).logits
        for handle in handles:
            handle.remove()
    log_p = torch.log_softmax(original, -1)
    log_q = torch.log_softmax(spliced, -1)
    targets = batch[:, 1:, None]
    recon = seen["recon"]
    residual = ((x_out - recon) ** 2).sum()
    centred = ((x_out - x_out.reshape(-1, x_out.shape[-1]).mean(0)) ** 2).sum()
    return {
        "ce_orig": float(-log_p[:, :-1].gather(-1, targets).mean()),
        "ce_sae": float(-log_q[:, :-1].gather(-1, targets).mean()),
        "kl_sae": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
        "explained_variance": float(1 - residual / centred),
    }


def test_identity_sae_at_a_residual_point_changes_nothing(arch_model):
    arch, model = arch_model
    sae = identity_sae(arch.residual(1), model.config.hidden_size)
    result = evaluate(model, sae, tokens(), **ALL_POSITIONS)
    assert result.hook_name == f"{arch.residual(1)}.output"
    assert result.metrics["delta_ce"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["kl_sae"] == pytest.approx(0.0, abs=1e-7)
    assert result.metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert result.metrics["ce_zero"] - result.metrics["ce_orig"] != pytest.approx(0.0, abs=1e-3)


def test_an_exact_mlp_transcoder_at_the_mlps_own_points_changes_nothing(arch_model):
    arch, model = arch_model
    transcoder = mlp_transcoder(model, arch, 1)
    result = evaluate(model, transcoder, tokens(), **ALL_POSITIONS)
    assert (result.hook_name, result.hook_name_out) == (
        f"{arch.mlp_path(1)}.input",
        f"{arch.mlp_path(1)}.output",
    )
    assert result.metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert result.metrics["delta_ce"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["kl_sae"] == pytest.approx(0.0, abs=1e-7)
    # Zero-ablating the MLP is not free: the points are where the MLP's output really enters the model.
    assert result.metrics["kl_zero"] > 1e-4


@pytest.mark.parametrize("where", ["residual", "mlp"])
def test_a_random_sae_equals_a_float64_computation_with_plain_hooks(arch_model, where):
    arch, model = arch_model
    point = arch.residual(1) if where == "residual" else arch.mlp_path(2)
    sae = random_sae(point, d_in=model.config.hidden_size, d_sae=48, seed=4)
    batch = tokens()
    result = evaluate(model, sae, batch, **ALL_POSITIONS)
    sae64 = copy.deepcopy(sae).double()
    expected = reference(
        model, f"{point}.output", f"{point}.output", lambda x: sae64.decode(sae64.encode(x)), batch
    )
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-5, rel=1e-5), name


def test_a_transcoder_equals_a_float64_computation_with_plain_hooks(arch_model):
    """A transcoder whose latents are not the MLP's own (its decoder scaled): the read and the write points differ."""
    arch, model = arch_model
    transcoder = mlp_transcoder(model, arch, 0)
    scaled = copy.deepcopy(transcoder)
    with torch.no_grad():
        scaled.down.weight.mul_(0.5)
    batch = tokens()
    result = evaluate(model, scaled, batch, **ALL_POSITIONS)
    reference_tc = copy.deepcopy(scaled).double()
    expected = reference(
        model, f"{arch.mlp_path(0)}.input", f"{arch.mlp_path(0)}.output", reference_tc.forward, batch
    )
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-5, rel=1e-5), name


def test_a_point_outside_the_layers_runs_the_whole_forward_and_says_so():
    arch = ARCHS[1]
    model = arch.build()
    sae = random_sae("model.embed_tokens", d_in=model.config.hidden_size, d_sae=48, seed=5)
    batch = tokens()
    with pytest.warns(Warning, match="whole forward"):
        result = evaluate(model, sae, batch, **ALL_POSITIONS)
    sae64 = copy.deepcopy(sae).double()
    expected = reference(
        model,
        "model.embed_tokens.output",
        "model.embed_tokens.output",
        lambda x: sae64.decode(sae64.encode(x)),
        batch,
    )
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-5, rel=1e-5), name


def test_sparsify_style_paths_relative_to_the_base_model_resolve():
    arch = ARCHS[1]
    model = arch.build()
    sae = identity_sae("layers.1", model.config.hidden_size)
    result = evaluate(model, sae, tokens(), **ALL_POSITIONS)
    assert result.hook_name == "model.layers.1.output"
    assert result.metrics["kl_sae"] == pytest.approx(0.0, abs=1e-7)


def test_an_unknown_module_path_lists_the_nearest():
    model = ARCHS[1].build()
    with pytest.raises(HookNotFoundError, match=r"model\.layers\.1\.mlp"):
        evaluate(
            model, identity_sae("model.layers.1.mpl", model.config.hidden_size), tokens(), **ALL_POSITIONS
        )


def test_a_model_in_training_mode_is_refused():
    model = ARCHS[1].build().train()
    with pytest.raises(ModelStateError, match="eval"):
        evaluate(model, identity_sae("model.layers.1", model.config.hidden_size), tokens(), **ALL_POSITIONS)


def test_the_backend_must_match_the_model():
    model = ARCHS[1].build()
    with pytest.raises(ModelStateError, match="backend='transformer_lens'"):
        evaluate(
            model,
            identity_sae("model.layers.1", model.config.hidden_size),
            tokens(),
            backend="transformer_lens",
            **ALL_POSITIONS,
        )


@pytest.mark.parametrize("epsilon", [1e-2, 1e-4])
def test_float64_means_float64_throughout_kl_of_a_near_identity_sae(epsilon):
    """dtype=float64: the forward, the SAE and the CE/KL scoring are all float64, so a near-identity SAE's tiny KL
    equals a float64 reference to many digits (scored in float32 it was 10% off, and negative at ε = 1e-4)."""
    arch = ARCHS[1]
    model = arch.build(dtype=torch.float64)
    sae = identity_sae(arch.residual(1), model.config.hidden_size).double()
    with torch.no_grad():
        sae.W_dec.mul_(1 + epsilon)
    batch = tokens()
    result = evaluate(model, sae, batch, **ALL_POSITIONS)
    assert result.model_dtype == "float64"
    expected = reference(
        model,
        f"{arch.residual(1)}.output",
        f"{arch.residual(1)}.output",
        lambda x: sae.decode(sae.encode(x)),
        batch,
    )
    assert expected["kl_sae"] > 0
    assert result.metrics["kl_sae"] == pytest.approx(expected["kl_sae"], rel=1e-6)
    assert result.metrics["delta_ce"] == pytest.approx(
        expected["ce_sae"] - expected["ce_orig"], rel=1e-6, abs=1e-12
    )


def transformer_lens_twin(model: torch.nn.Module, arch: Arch):
    """A HookedTransformer with the Hugging Face model's weights (TransformerLens' own weight conversion)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    c = model.config
    if arch.name == "gpt2":
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
            d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
            normalization_type="LN", eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel",
        )  # fmt: skip
        convert = convert_gpt2_weights
    else:
        d_head = c.hidden_size // c.num_attention_heads
        cfg = HookedTransformerConfig(
            n_layers=c.num_hidden_layers, d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads,
            n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size, d_vocab=c.vocab_size,
            n_ctx=c.max_position_embeddings, act_fn="silu", normalization_type="RMS",
            positional_embedding_type="rotary", rotary_dim=d_head, rotary_base=c.rope_parameters["rope_theta"],
            gated_mlp=True, final_rms=True, eps=c.rms_norm_eps, original_architecture="LlamaForCausalLM",
        )  # fmt: skip
        convert = convert_llama_weights
    twin = HookedTransformer(cfg)
    twin.load_state_dict(convert(model, cfg), strict=False)
    return twin.eval()


@pytest.mark.parametrize("arch", ARCHS[:2], ids=IDS[:2])
@pytest.mark.parametrize(("tl_hook", "module"), [("hook_resid_post", ""), ("hook_mlp_out", ".mlp")])
def test_both_backends_give_the_same_metrics(arch, tl_hook, module):
    model = arch.build()
    twin = transformer_lens_twin(model, arch)
    batch = tokens()
    tl_sae = random_sae(f"blocks.1.{tl_hook}", d_in=model.config.hidden_size, d_sae=48, seed=6)
    hf_sae = copy.deepcopy(tl_sae)
    hf_sae.cfg.metadata.hook_name = f"{arch.residual(1)}{module}"
    on_tl = evaluate(twin, tl_sae, batch, **ALL_POSITIONS)
    on_hf = evaluate(model, hf_sae, batch, backend="hf", **ALL_POSITIONS)
    assert on_tl.metrics.keys() == on_hf.metrics.keys()
    for name, value in on_tl.metrics.items():
        assert on_hf.metrics[name] == pytest.approx(value, abs=1e-5, rel=1e-5), name


def test_a_captured_run_holds_no_layer_inputs():
    """A continuation needs each layer's call arguments, not its input: holding every layer's input hidden states
    would keep n_layers activations of the batch alive through the batch."""
    from pytest_saecheck.engine.hf import HFCut

    model = ARCHS[1].build()
    cut = HFCut(model)
    with torch.inference_mode():
        run = cut.capture(tokens(), [cut.site("model.layers.1", None)])
    assert len(run.context.layer_calls) == cut.n_layers
    for args, kwargs in run.context.layer_calls:
        assert args[:1] in ((None,), ())
        assert "hidden_states" not in kwargs
