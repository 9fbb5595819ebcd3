"""Tiny Hugging Face causal language models of real architectures, built from transformers configs (no hub), and
dictionaries at their module points: an identity SAE, a random SAE, and an exact MLP transcoder.

Every parameter is redrawn (matrices N(0, 0.2²), vectors 1-centred for norms' gains and 0-centred otherwise,
Gemma's zero-centred gains included) so that norms, soft-caps and attention all matter and logits are far from
uniform: a splice that is off anywhere moves CE and KL visibly.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

VOCAB = 97
N_POSITIONS = 64


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, its decoder layers' path, its MLP's path and its down projection."""

    name: str
    layers: str
    mlp: str
    down: str

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
        torch.manual_seed(seed)
        model = _BUILDERS[self.name]().eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                if param.ndim >= 2:
                    param.copy_(noise * 0.2)
                elif "norm" in name or "ln" in name:
                    base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                    param.copy_(base + 0.1 * noise)
                else:
                    param.copy_(0.05 * noise)
        model.tie_weights()
        return model.to(dtype)

    def residual(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp}"


# The shape every Llama-like tiny model shares (grouped-query attention: 4 query heads, 2 key/value heads).
_SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": N_POSITIONS,
}


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=3,
            n_embd=32,
            n_head=4,
            n_positions=N_POSITIONS,
            vocab_size=VOCAB,
            attn_implementation="eager",
        )
    )


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            **_SMALL,
            tie_word_embeddings=False,
        )
    )


def _gemma3() -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            **_SMALL,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=8,
        )
    )


def _qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            **_SMALL,
            head_dim=8,
            tie_word_embeddings=False,
        )
    )


def _neox() -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=N_POSITIONS,
            rotary_pct=0.25,
            use_parallel_residual=True,
        )
    )


_BUILDERS = {"gpt2": _gpt2, "llama": _llama, "gemma3": _gemma3, "qwen3": _qwen3, "neox": _neox}

ARCHS = (
    Arch("gpt2", "transformer.h", "mlp", "c_proj"),
    Arch("llama", "model.layers", "mlp", "down_proj"),
    Arch("gemma3", "model.layers", "mlp", "down_proj"),
    Arch("qwen3", "model.layers", "mlp", "down_proj"),
    Arch("neox", "gpt_neox.layers", "mlp", "dense_4h_to_h"),
)


def tokens(n: int = 6, seq_len: int = 16, seed: int = 3) -> torch.Tensor:
    """``[n, seq_len]`` token ids in ``[1, VOCAB)``."""
    return torch.randint(1, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


class MLPTranscoder(torch.nn.Module):
    """An exact transcoder of one MLP: its latents are the input of the MLP's down projection, its decoder that
    projection, so ``decode(encode(mlp input)) == mlp output`` whatever the MLP's activation or gating."""

    def __init__(
        self, mlp: torch.nn.Module, down: torch.nn.Module, d_model: int, d_mlp: int, read: str, write: str
    ):
        super().__init__()
        self.mlp, self.down = mlp, down
        metadata = SimpleNamespace(
            hook_name=read, hook_name_out=write, hook_head_index=None, context_size=None
        )
        self.cfg = SimpleNamespace(
            d_in=d_model, d_out=d_model, d_sae=d_mlp, metadata=metadata, normalize_activations="none"
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = self.down.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            self.mlp(x)
        finally:
            handle.remove()
        return seen[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(z)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def mlp_transcoder(model: Any, arch: Arch, layer: int) -> MLPTranscoder:
    """:class:`MLPTranscoder` of layer ``layer``'s MLP, reading its input and writing its output."""
    modules = dict(model.named_modules())
    path = arch.mlp_path(layer)
    down = modules[f"{path}.{arch.down}"]
    d_mlp = down.weight.shape[0] if arch.name == "gpt2" else down.weight.shape[1]
    d_model = model.config.hidden_size
    return MLPTranscoder(modules[path], down, d_model, d_mlp, f"{path}.input", f"{path}.output")
