"""A cross-layer transcoder on either backend (through the model seam): a Gemma Scope 2 CLT folder
on a tiny Gemma 3 evaluated on the Hugging Face backend (at the module points the release records) and on its
TransformerLens twin (``ln2.hook_normalized`` with the norm's gain applied on read), both against an independent
float64 computation with plain torch hooks on the Hugging Face model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from factories import write_gemma_scope_2_clt
from tiny_hf import D_MODEL, VOCAB, tiny_hf, tl_twin

from pytest_saecheck.clt import layer_name
from pytest_saecheck.engine.replacement import evaluate_replacement
from pytest_saecheck.errors import ConfigError
from pytest_saecheck.loading.clt import load_clt_directory
from pytest_saecheck.policy import TokenPolicy

N_LAYERS, D_SAE = 2, 24
POLICY = TokenPolicy(exclude_bos=True, exclude_special_tokens=False)  # the tiny models have no tokenizer


def clt_tensors(seed: int = 3) -> dict[str, list[torch.Tensor]]:
    """Random JumpReLU CLT weights (Gemma Scope 2 layout) whose features fire and whose writes move the logits."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": [torch.randn(D_MODEL, D_SAE, generator=g) * 0.3 for _ in range(N_LAYERS)],
        "b_enc": [torch.randn(D_SAE, generator=g) * 0.1 for _ in range(N_LAYERS)],
        "threshold": [torch.rand(D_SAE, generator=g) * 0.5 for _ in range(N_LAYERS)],
        "b_dec": [torch.randn(D_MODEL, generator=g) * 0.05 for _ in range(N_LAYERS)],
        "W_dec": [torch.randn(D_SAE, N_LAYERS - s, D_MODEL, generator=g) * 0.1 for s in range(N_LAYERS)],
    }


def oracle(hf: torch.nn.Module, tensors: dict, tokens: torch.Tensor) -> dict[str, float]:
    """ΔCE and KL of the replacement, float64, plain forward hooks on the Hugging Face model: each layer's features
    read pre_feedforward_layernorm's output, every post_feedforward_layernorm output is replaced by the sum of the
    decoders of layers ≤ l at every position but the first."""
    m64 = copy.deepcopy(hf).to(torch.float64)
    t = {key: [v.double() for v in values] for key, values in tensors.items()}
    kept = torch.ones_like(tokens, dtype=torch.bool)
    kept[:, 0] = False
    latents: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(m64.model.layers):

        def read(module, args, out, layer=layer):
            pre = out @ t["W_enc"][layer] + t["b_enc"][layer]
            latents[layer] = pre * (pre > t["threshold"][layer])

        def write(module, args, out, layer=layer):
            rec = t["b_dec"][layer] + sum(latents[s] @ t["W_dec"][s][:, layer - s] for s in range(layer + 1))
            return torch.where(kept[..., None], rec, out)

        handles.append(block.pre_feedforward_layernorm.register_forward_hook(read))
        handles.append(block.post_feedforward_layernorm.register_forward_hook(write))
    with torch.no_grad():
        replaced = m64(tokens).logits
        for handle in handles:
            handle.remove()
        logits = m64(tokens).logits
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(replaced, -1)

    def ce(log_probs: torch.Tensor) -> float:
        return -log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)[kept[:, :-1]].mean().item()

    kl = (lp.exp() * (lp - lq)).sum(-1)[kept].mean().item()
    return {"ce_orig": ce(lp), "ce_sae": ce(lq), "delta_ce": ce(lq) - ce(lp), "kl_sae": kl}


@pytest.fixture(scope="module")
def gemma() -> torch.nn.Module:
    return tiny_hf("Gemma3ForCausalLM", n_layers=N_LAYERS)


def test_a_gemma_scope_2_clt_gives_the_same_numbers_on_both_backends_and_the_float64_oracle(gemma, tmp_path):
    tensors = clt_tensors()
    clt = load_clt_directory(write_gemma_scope_2_clt(tmp_path / "clt", tensors))
    tokens = torch.randint(1, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))
    expected = oracle(gemma, tensors, tokens)
    assert abs(expected["delta_ce"]) > 1e-3 and expected["kl_sae"] > 1e-3  # the replacement is measurable
    options = {"batch_size": 4, "policy": POLICY, "progress": False}
    on_hf = evaluate_replacement(gemma, clt, tokens, **options)
    on_tl = evaluate_replacement(tl_twin(gemma), clt, tokens, **options)
    assert on_hf.backend == "hf" and on_tl.backend == "transformer_lens"
    assert on_hf.hook_name.split(" + ")[0] == "model.layers.0.pre_feedforward_layernorm.output"
    for name in ("ce_orig", "ce_sae", "delta_ce", "kl_sae"):
        assert on_hf.metrics[name] == pytest.approx(expected[name], abs=1e-5), name
        assert on_tl.metrics[name] == pytest.approx(expected[name], abs=1e-5), name
    for layer in range(N_LAYERS):
        hf_member, tl_member = on_hf.members[layer_name(layer)], on_tl.members[layer_name(layer)]
        for name in ("explained_variance", "mse", "l0", "explained_variance_alone", "delta_ce_alone"):
            assert hf_member[name] == pytest.approx(tl_member[name], abs=1e-5), (layer, name)
    assert on_hf.compounding["delta_ce_joint"] == pytest.approx(on_tl.compounding["delta_ce_joint"], abs=1e-5)


def test_a_clt_with_only_transformer_lens_names_is_refused_where_a_module_tree_has_no_point(gemma, tmp_path):
    """circuit-tracer's record names ln2.hook_normalized (before the gain): a module tree has no such tensor."""
    from factories import write_circuit_tracer_clt

    from pytest_saecheck.errors import NoFaithfulPointError

    clt = load_clt_directory(write_circuit_tracer_clt(Path(tmp_path / "ct"), clt_tensors()))
    with pytest.raises(NoFaithfulPointError, match=r"ln2\.hook_normalized"):
        evaluate_replacement(gemma, clt, torch.ones(2, 8, dtype=torch.long), policy=POLICY, progress=False)


def test_a_norm_output_is_a_read_point_only(gemma):
    from pytest_saecheck.engine.cut import HookedTransformerCut

    cut = HookedTransformerCut(tl_twin(gemma))
    site = cut.norm_output_site(cut.site("blocks.0.ln2.hook_normalized", None))
    with pytest.raises(ConfigError, match="read point"):
        site.write_back(torch.zeros(1, 2, D_MODEL), torch.zeros(1, 2, D_MODEL))
    with pytest.raises(ConfigError, match="not a norm"):
        cut.norm_output_site(cut.site("blocks.0.hook_mlp_out", None))
