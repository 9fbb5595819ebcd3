"""An offline Hugging Face hub cache holding a tiny GPT-2 under an official TransformerLens name.

``build_offline_hub(root)`` writes ``root/hub/models--gpt2/snapshots/<commit>/...`` and ``refs/main`` (the
layout ``huggingface_hub`` reads), with a randomly initialised two-layer GPT-2 (transformers
``GPT2LMHeadModel``) and a byte-level BPE tokenizer trained locally, so that
``HookedTransformer.from_pretrained("gpt2")`` works with ``HF_HOME=root`` and ``HF_HUB_OFFLINE=1`` and no
network. huggingface_hub reads both variables when it is imported: use the environment of
:func:`offline_hub_env` in a subprocess (``pytester.runpytest_subprocess``, ``subprocess.run``).

The residual stream writes of this model have a large mean along the all-ones direction (the token embeddings
are shifted by :data:`EMBEDDING_SHIFT`), so TransformerLens' ``center_writing_weights`` changes every
activation in the residual stream: a load with weight processing and one without give measurably different
activations, as they do on the real GPT-2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex string names the snapshot
EMBEDDING_SHIFT = 0.5
N_POSITIONS = 64


def build_offline_hub(root: Path, name: str = "gpt2", seed: int = 0) -> Path:
    """Write a tiny GPT-2 saved as ``name`` into an HF hub cache under ``root``; return ``root`` (for HF_HOME).

    The model has 2 layers, ``d_model`` 32, 4 heads, 64 positions and the vocabulary of a BPE tokenizer trained
    on ``conftest.CORPUS``; its ``config.json`` carries ``n_ctx`` as the official GPT-2 checkpoints do.
    """
    import torch
    from factories import CORPUS, build_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    snapshot = root / "hub" / f"models--{name.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(CORPUS * 20)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=N_POSITIONS,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.add_(EMBEDDING_SHIFT)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    config_path = snapshot / "config.json"
    saved = json.loads(config_path.read_text())
    saved.setdefault("n_ctx", N_POSITIONS)  # the hub's gpt2 config.json has it; transformers 5 writes none
    config_path.write_text(json.dumps(saved, indent=2))
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(COMMIT)
    return root


def offline_hub_env(root: Path) -> dict[str, Any]:
    """Environment variables that point huggingface_hub at ``root`` and forbid the network."""
    return {
        "HF_HOME": str(root),
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def apply_offline_hub_env(root: Path, monkeypatch: Any) -> None:
    """Set :func:`offline_hub_env` with ``monkeypatch`` (for subprocesses started afterwards)."""
    for key, value in offline_hub_env(root).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def snapshot_dir(root: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the hub cache under ``root`` (created, with ``refs/main``)."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def save_model(root: Path, repo_id: str, model: Any) -> Path:
    """Save a transformers ``model`` (a tiny model of a real architecture) into the hub cache under ``root`` as
    ``repo_id`` (e.g. ``google/gemma-3-270m``); return ``root``."""
    model.save_pretrained(snapshot_dir(root, repo_id))
    return root


GEMMA_SCOPE_2_REPO = "google/gemma-scope-2-270m-pt"
GEMMA_SCOPE_2_RELEASE = "gemma-scope-2-270m-pt-transcoders-all"


def save_gemma_scope_2_transcoder(root: Path, sae_id: str, layer: int, weights: dict[str, Any]) -> Path:
    """A Gemma Scope 2 transcoder folder (``transcoder_all/<sae_id>``: ``config.json`` + ``params.safetensors``
    with ``w_enc`` ``[d_model, d_sae]``, ``w_dec`` ``[d_sae, d_model]``, ``b_enc``, ``b_dec``, ``threshold``) in the
    hub cache under ``root``, as the release :data:`GEMMA_SCOPE_2_RELEASE` of SAE Lens lists it; return the folder."""
    from safetensors.torch import save_file

    folder = snapshot_dir(root, GEMMA_SCOPE_2_REPO) / "transcoder_all" / sae_id
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "params.safetensors"))
    config = {
        "architecture": "jump_relu",
        "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
        "affine_connection": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def use_offline_cache(root: Path, monkeypatch: Any) -> None:
    """In this process: huggingface_hub reads the cache under ``root`` offline, and any HTTP request of SAE Lens'
    loaders (its tensor-shape range request) fails the test."""
    import huggingface_hub.constants as hub
    from sae_lens.loading import pretrained_sae_loaders

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)

    def fetched(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"an HTTP request from SAE Lens' loader: {args}")

    monkeypatch.setattr(pretrained_sae_loaders, "_get_with_rate_limit_retry", fetched)
