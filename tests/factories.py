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


def identity_sae(hook: str = HOOK, d_in: int = D_MODEL, normalize_activations: str = "none") -> Any:
    """The package's identity SAE (:func:`pytest_saecheck.checks.pipeline_subjects.identity_sae`: latent pairs
    (e_i, −e_i), ReLU(x) − ReLU(−x) = x) at ``hook``, on the CPU, naming no model (tests name their own), with
    SAE Lens' ``normalize_activations`` (applied around the same weights)."""
    import dataclasses

    from pytest_saecheck.checks.pipeline_subjects import identity_sae as package_identity_sae

    sae = package_identity_sae(d_in, hook, torch.device("cpu"))
    if "model_name" in sae.cfg.metadata:
        del sae.cfg.metadata.model_name
    if normalize_activations != "none":
        normalised = type(sae)(dataclasses.replace(sae.cfg, normalize_activations=normalize_activations))
        normalised.load_state_dict(sae.state_dict())
        sae = normalised
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
# cross-layer transcoders


def clt_tensors_from_mlps(model: Any, spread: bool = False) -> dict[str, list[torch.Tensor]]:
    """CLT tensors (``pytest_saecheck.clt.TensorSource`` layout) that reproduce a ReLU model's MLPs exactly.

    Features at layer ``l`` are the MLP's hidden units (``W_enc = W_in``, ``b_enc = b_in``) and write only to
    layer ``l`` (``W_dec[l][:, 0] = W_out``, ``b_dec = b_out``). ``spread=True``: layer 0 gets one more feature
    whose activation is the constant 1 (zero encoder, bias 1) and writes ``v`` into layer 1 only, while layer
    1's bias is lowered by ``v``: layer 1's output is spread over two source layers and still sums to the MLP's.
    """
    n, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    blocks = [model.blocks[layer].mlp for layer in range(n)]
    w_enc = [b.W_in.detach().clone() for b in blocks]
    b_enc = [b.b_in.detach().clone() for b in blocks]
    b_dec = [b.b_out.detach().clone() for b in blocks]
    w_dec = []
    for layer, block in enumerate(blocks):
        dec = torch.zeros(d_mlp, n - layer, D_MODEL)
        dec[:, 0] = block.W_out.detach()
        w_dec.append(dec)
    if spread:
        v = torch.linspace(-1.0, 1.0, D_MODEL)
        w_enc[0] = torch.cat([w_enc[0], torch.zeros(D_MODEL, 1)], dim=1)
        b_enc[0] = torch.cat([b_enc[0], torch.ones(1)])
        extra = torch.zeros(1, n, D_MODEL)
        extra[0, 1] = v
        w_dec[0] = torch.cat([w_dec[0], extra], dim=0)
        b_dec[1] = b_dec[1] - v
    return {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}


def clt_hooks(n_layers: int, hook_in: str = "ln2.hook_normalized") -> dict[str, list[str]]:
    """The read and write points of a CLT over every MLP of an ``n_layers`` model."""
    return {
        "hook_names_in": [f"blocks.{layer}.{hook_in}" for layer in range(n_layers)],
        "hook_names_out": [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)],
    }


def write_circuit_tracer_clt(
    path: Path, tensors: dict[str, list[torch.Tensor]], model_name: str = "tiny"
) -> Path:
    """``tensors`` as a circuit-tracer CLT folder (the mntss releases' layout: config.yaml, W_enc_l / W_dec_l)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(
        f"model_name: {model_name}\nmodel_kind: cross_layer_transcoder\n"
        "feature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"
    )
    for layer in range(len(tensors["W_enc"])):
        encoder = {
            f"W_enc_{layer}": tensors["W_enc"][layer].T.contiguous(),
            f"b_enc_{layer}": tensors["b_enc"][layer].contiguous(),
            f"b_dec_{layer}": tensors["b_dec"][layer].contiguous(),
        }
        if "threshold" in tensors:
            encoder[f"threshold_{layer}"] = tensors["threshold"][layer].contiguous()
        save_file(encoder, str(path / f"W_enc_{layer}.safetensors"))
        save_file(
            {f"W_dec_{layer}": tensors["W_dec"][layer].contiguous()}, str(path / f"W_dec_{layer}.safetensors")
        )
    return path


def write_gemma_scope_2_clt(path: Path, tensors: dict[str, list[torch.Tensor]]) -> Path:
    """``tensors`` as a Gemma Scope 2 CLT folder (``layer_l.safetensors`` with w_enc, w_dec over every layer,
    b_enc, b_dec, threshold; affine_skip_connection when ``tensors`` has ``W_skip``)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    n = len(tensors["W_enc"])
    for layer in range(n):
        width = tensors["W_enc"][layer].shape[1]
        w_dec = torch.zeros(width, n, D_MODEL)
        w_dec[:, layer:] = tensors["W_dec"][layer]
        threshold = tensors["threshold"][layer] if "threshold" in tensors else torch.zeros(width)
        params = {
            "w_enc": tensors["W_enc"][layer].contiguous(),
            "b_enc": tensors["b_enc"][layer].contiguous(),
            "b_dec": tensors["b_dec"][layer].contiguous(),
            "threshold": threshold.contiguous(),
            "w_dec": w_dec,
        }
        if "W_skip" in tensors:
            params["affine_skip_connection"] = tensors["W_skip"][layer].contiguous()
        save_file(params, str(path / f"layer_{layer}.safetensors"))
    return path


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
