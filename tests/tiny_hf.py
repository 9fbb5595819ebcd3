"""Tiny decoder-only Hugging Face models of real architectures (random weights, learned norm gains), and
TransformerLens twins of some of them built from the same weights with TransformerLens' own converters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pytest_saecheck.hookpoints import ModulePoint

VOCAB = 97
D_MODEL = 32


def _gains(model: Any, seed: int) -> Any:
    """Every norm gets a non-trivial learned gain (and bias where it has one)."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                param.copy_(param + 0.5 * torch.randn(param.shape, generator=generator))
    return model.eval()


def tiny_hf(architecture: str, n_layers: int = 2, seed: int = 0) -> Any:
    """A randomly initialised ``architecture`` (a transformers class name) with ``d_model`` 32."""
    import transformers

    torch.manual_seed(seed)
    common: dict[str, Any] = {"vocab_size": VOCAB, "num_hidden_layers": n_layers, "hidden_size": D_MODEL}
    llama_like = {
        **common,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "head_dim": 8,
    }
    if architecture == "GPT2LMHeadModel":
        config: Any = transformers.GPT2Config(
            n_layer=n_layers, n_embd=D_MODEL, n_head=4, n_positions=128, n_ctx=128, vocab_size=VOCAB
        )
    elif architecture == "GPTNeoXForCausalLM":
        config = transformers.GPTNeoXConfig(
            **common, intermediate_size=64, num_attention_heads=4, max_position_embeddings=128
        )
    elif architecture == "Gemma3ForCausalLM":
        config = transformers.Gemma3TextConfig(
            **llama_like,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"][:n_layers]
            + ["full_attention"] * max(0, n_layers - 2),
        )
    elif architecture == "Gemma2ForCausalLM":
        config = transformers.Gemma2Config(**llama_like, query_pre_attn_scalar=8, sliding_window=4)
    elif architecture == "Qwen2MoeForCausalLM":
        config = transformers.Qwen2MoeConfig(
            **llama_like,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        )
    elif architecture == "Qwen3MoeForCausalLM":
        config = transformers.Qwen3MoeConfig(
            **llama_like, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16
        )
    else:
        config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
        config = config_class(**llama_like, pad_token_id=0)
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config)
    return _gains(model, seed)


def tl_twin(hf_model: Any) -> Any:
    """A ``HookedTransformer`` with ``hf_model``'s weights, as ``from_pretrained_no_processing`` would load it."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_state_dict

    architecture = hf_model.config.architectures[0]
    c = hf_model.config
    if architecture == "Gemma3ForCausalLM":
        cfg_dict: dict[str, Any] = {
            "d_model": c.hidden_size,
            "d_head": c.head_dim,
            "n_heads": c.num_attention_heads,
            "d_mlp": c.intermediate_size,
            "n_layers": c.num_hidden_layers,
            "n_ctx": 128,
            "eps": c.rms_norm_eps,
            "d_vocab": c.vocab_size,
            "act_fn": "gelu_pytorch_tanh",
            "normalization_type": "RMS",
            "rotary_base": c.rope_parameters["full_attention"]["rope_theta"],
            "rotary_base_local": c.rope_parameters["sliding_attention"]["rope_theta"],
            "positional_embedding_type": "rotary",
            "use_attn_scale": True,
            "n_key_value_heads": c.num_key_value_heads,
            "gated_mlp": True,
            "final_rms": True,
            "use_normalization_before_and_after": True,
            "use_qk_norm": True,
            "window_size": c.sliding_window,
            "use_local_attn": True,
            "attn_types": ["local" if t == "sliding_attention" else "global" for t in c.layer_types],
            "original_architecture": architecture,
            "rotary_dim": c.head_dim,
            "d_vocab_out": c.vocab_size,
            "tokenizer_prepends_bos": True,
        }
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            c.save_pretrained(tmp)
            cfg_dict = convert_hf_model_config(tmp)
    fields = HookedTransformerConfig.__dataclass_fields__
    cfg = HookedTransformerConfig(
        **{k: v for k, v in cfg_dict.items() if k in fields and k != "tokenizer_name"}
    )
    model = HookedTransformer(cfg)
    state_dict = get_pretrained_state_dict("gpt2", cfg, hf_model)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


RELEASE, SAE_ID = "gemma-scope-2-270m-pt-transcoders-all", "layer_0_width_16k_l0_big"
"""A Gemma Scope 2 transcoder release and one of its dictionaries (written to an offline cache by the tests)."""


@contextmanager
def captured(model: Any, points: list[ModulePoint]) -> Iterator[dict[ModulePoint, torch.Tensor]]:
    """The tensors at ``points`` during forwards inside the block, by plain torch hooks."""
    found: dict[ModulePoint, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for point in points:
        module = modules[point.path]
        if point.io == "input":
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, p=point: found.__setitem__(p, args[0].detach())
                )
            )
        else:

            def hook(m: Any, args: Any, out: Any, p: ModulePoint = point) -> None:
                found[p] = (out[0] if isinstance(out, tuple) else out).detach()

            handles.append(module.register_forward_hook(hook))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def exact_gemma_transcoder(hf: Any) -> dict[str, torch.Tensor]:
    """Weights of a JumpReLU transcoder that maps layer 0's pre_feedforward_layernorm.output (gain applied) to its
    post_feedforward_layernorm.output exactly: with layer 0's attention silenced, that input depends on the token
    only, so one latent per token (threshold between its own and every other token's pre-activation) suffices."""
    with torch.no_grad():
        hf.model.layers[0].self_attn.o_proj.weight.zero_()
    read = ModulePoint("model.layers.0.pre_feedforward_layernorm", "output", 0)
    write = ModulePoint("model.layers.0.post_feedforward_layernorm", "output", 0)
    with torch.no_grad(), captured(hf, [read, write]) as found:
        hf(torch.arange(VOCAB)[None])
    u, y = found[read][0], found[write][0]  # [V, d]
    gain = 1 + hf.model.layers[0].pre_feedforward_layernorm.weight
    n = u / gain
    n[0] = 0  # token 0 is the padding id: a zero embedding, never in the test tokens
    w_enc = (n / (n * n).sum(-1, keepdim=True).clamp_min(1e-12)).T / gain[
        :, None
    ]  # column t: n_t / |n_t|² / gain
    pre = u @ w_enc  # [V, V], 1 on the diagonal from token 1 on
    off = pre - 2 * torch.eye(VOCAB)
    threshold = (1 + off.max(0).values) / 2
    threshold[0] = 0.5
    assert bool((threshold[1:] < 0.999).all())
    return {
        "w_enc": w_enc.contiguous(),
        "w_dec": y.contiguous(),
        "b_enc": torch.zeros(VOCAB),
        "b_dec": torch.zeros(y.shape[-1]),
        "threshold": threshold.detach().contiguous(),
    }
