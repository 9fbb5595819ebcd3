"""The one home of the tests' tiny models, SAEs, transcoders, token batches and tokenizer.

Test modules import from here (``from factories import ...``; pytest puts ``tests/`` on ``sys.path``); no test
module imports another. Everything is small enough to build in well under a second on CPU.

Two model shapes: the plugin tests' tiny model (:func:`make_tiny_model`: 2 layers, ``d_mlp = 2·d_model``, on the
CPU) and the engine tests' model (:func:`make_engine_model`: 3 layers, ``d_mlp = 4·d_model``, on TransformerLens'
default device), both with ``d_model`` :data:`D_MODEL`, :data:`N_CTX` positions and :data:`D_VOCAB` tokens.
SAE Lens SAEs: :func:`random_sae` and :func:`identity_sae` at any hook; :func:`make_random_sae` and
:func:`make_identity_sae` add the metadata the plugin reads (hook :data:`HOOK`, model ``"tiny"``, context size,
BOS), for SAE directories a pytester run loads.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

D_MODEL, N_CTX, D_VOCAB, N_HEADS = 32, 16, 61, 4
HOOK = "blocks.1.hook_resid_pre"
BOS = 0
TESTS_DIR = Path(__file__).resolve().parent

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a sparse autoencoder reads the residual stream and writes it back",
    "every test should fail for the right reason and pass for the right reason",
]

# ---------------------------------------------------------------------------------------------------------
# models


def make_model(
    *,
    n_layers: int = 2,
    d_mlp: int = 2 * D_MODEL,
    act_fn: str = "gelu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | None = "cpu",
    tokenizer: Any = None,
    positional_embedding_type: str = "standard",
) -> Any:
    """A randomly initialised LN ``HookedTransformer`` (seeded), in eval mode; ``device=None``: TransformerLens'
    default device."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=D_MODEL,
        n_ctx=N_CTX,
        d_head=D_MODEL // N_HEADS,
        n_heads=N_HEADS,
        d_mlp=d_mlp,
        d_vocab=D_VOCAB if tokenizer is None else len(tokenizer),
        act_fn=act_fn,
        normalization_type="LN",
        positional_embedding_type=positional_embedding_type,
        seed=seed,
        device=device,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def make_tiny_model(device: str = "cpu", tokenizer: Any = None, seed: int = 0) -> Any:
    """The plugin tests' model (2 layers): what the ``"tiny"`` model spec of :data:`TINY_CONFTEST` serves."""
    return make_model(device=device, tokenizer=tokenizer, seed=seed)


def make_engine_model(dtype: torch.dtype = torch.float32, seed: int = 0, act_fn: str = "gelu") -> Any:
    """The engine tests' model: 3 layers, ``d_mlp = 4·d_model``."""
    return make_model(n_layers=3, d_mlp=4 * D_MODEL, act_fn=act_fn, dtype=dtype, seed=seed, device=None)


def relu_model(seed: int = 0) -> Any:
    """The engine tests' model with ReLU MLPs, so a ReLU transcoder can copy an MLP exactly."""
    return make_engine_model(seed=seed, act_fn="relu")


# ---------------------------------------------------------------------------------------------------------
# SAEs and transcoders


def random_sae(
    hook: str = HOOK,
    head: int | None = None,
    *,
    d_in: int | None = None,
    d_sae: int = 64,
    seed: int = 1,
    **cfg_kwargs: Any,
) -> Any:
    """An SAE Lens ``StandardSAE`` at ``hook`` (one attention head's ``hook_z`` with ``head``), every parameter
    drawn from N(0, 0.3²) with ``seed``. ``d_in``: default the hook's width in the tiny models."""
    from sae_lens import StandardSAE, StandardSAEConfig

    if d_in is None:
        d_in = D_MODEL // N_HEADS if head is not None else D_MODEL
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, **cfg_kwargs)
    cfg.metadata.hook_name = hook
    cfg.metadata.hook_head_index = head
    if hook.endswith("hook_z") and head is None:
        cfg.reshape_activations = "hook_z"
    sae = StandardSAE(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return sae


def identity_sae(hook: str = HOOK, d_in: int = D_MODEL, **cfg_kwargs: Any) -> Any:
    """ReLU(x) − ReLU(−x) = x: latent pairs (e_i, −e_i) reconstruct every input exactly."""
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d_in, d_sae=2 * d_in, apply_b_dec_to_input=False, **cfg_kwargs)
    cfg.metadata.hook_name = hook
    sae = StandardSAE(cfg)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def with_plugin_metadata(sae: Any, **metadata: Any) -> Any:
    """``sae`` with the metadata the plugin reads for the tiny model (then ``metadata``'s overrides)."""
    sae.cfg.metadata.hook_name = HOOK
    sae.cfg.metadata.model_name = "tiny"
    sae.cfg.metadata.context_size = N_CTX
    sae.cfg.metadata.prepend_bos = True
    for key, value in metadata.items():
        sae.cfg.metadata[key] = value
    return sae


def make_identity_sae(d_in: int = D_MODEL, **metadata: Any) -> Any:
    """:func:`identity_sae` at :data:`HOOK` with the plugin's metadata (a planted good SAE)."""
    return with_plugin_metadata(identity_sae(HOOK, d_in), **metadata)


def make_random_sae(d_in: int = D_MODEL, seed: int = 1, **metadata: Any) -> Any:
    """:func:`random_sae` at :data:`HOOK`, ``d_sae = 2·d_in``, with the plugin's metadata (a planted bad SAE)."""
    return with_plugin_metadata(random_sae(HOOK, d_in=d_in, d_sae=2 * d_in, seed=seed), **metadata)


def mlp_transcoder(
    model: Any, layer: int, hook_in: str = "ln2.hook_normalized", cls_name: str = "Transcoder"
) -> Any:
    """A transcoder whose weights are the MLP's own: forward(normalised resid_mid) == hook_mlp_out exactly."""
    import pytest
    import sae_lens

    if not hasattr(sae_lens, cls_name):
        pytest.skip(f"this SAE Lens has no {cls_name}")
    cls = getattr(sae_lens, cls_name)
    cfg_cls = getattr(sae_lens, cls_name + "Config")
    d_mlp = model.cfg.d_mlp
    cfg = cfg_cls(d_in=D_MODEL, d_sae=d_mlp, d_out=D_MODEL, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = f"blocks.{layer}.{hook_in}"
    cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
    tc = cls(cfg)
    mlp = model.blocks[layer].mlp
    with torch.no_grad():
        tc.W_enc.copy_(mlp.W_in)
        tc.b_enc.copy_(mlp.b_in)
        tc.W_dec.copy_(mlp.W_out)
        tc.b_dec.copy_(mlp.b_out)
        if hasattr(tc, "W_skip"):
            tc.W_skip.zero_()
    return tc


# ---------------------------------------------------------------------------------------------------------
# tokens and tokenizer


def make_tokens(n: int = 12, seq_len: int = N_CTX, seed: int = 2, bos: int | None = BOS) -> torch.Tensor:
    """``[n, seq_len]`` random token ids in ``[1, D_VOCAB)`` (seeded), ``bos`` at position 0 unless None."""
    tokens = torch.randint(1, D_VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    if bos is not None:
        tokens[:, 0] = bos
    return tokens


def make_token_ids(n_sequences: int = 40, seq_len: int = N_CTX, seed: int = 0) -> np.ndarray:
    """``[n_sequences, seq_len]`` random token ids in ``[1, D_VOCAB)`` from numpy (seeded), :data:`BOS` at
    position 0: the plugin tests' token files (``tokens.npy`` of ``tiny_assets``)."""
    tokens = np.random.default_rng(seed).integers(1, D_VOCAB, size=(n_sequences, seq_len))
    tokens[:, 0] = BOS
    return tokens


def build_tokenizer(texts: list[str], vocab_size: int = 200) -> Any:
    """A byte-level BPE tokenizer trained locally (no download), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


#: A conftest for pytester runs: serves model "tiny" (and "tiny1", "tiny2", ... with other seeds) through the
#: ``pytest_saecheck_load_model`` hook, built by :func:`make_tiny_model`; ``LOADS`` lists the specs loaded.
TINY_CONFTEST = textwrap.dedent(
    f"""
    import sys

    sys.path.insert(0, {str(TESTS_DIR)!r})
    from factories import make_tiny_model

    LOADS = []

    def pytest_saecheck_load_model(spec, device, dtype):
        if not spec.startswith("tiny"):
            return None
        LOADS.append(spec)
        return make_tiny_model(device, seed=int(spec[4:] or 0))
    """
)


def make_sparse_coder(**cfg: Any) -> Any:
    """An EleutherAI sparsify ``SparseCoder`` on ``D_MODEL`` inputs with random decoder and encoder biases."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(D_MODEL, SparseCoderConfig(num_latents=4 * D_MODEL, k=6, **cfg), dtype=torch.float32)
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(std=0.1)
    return coder
