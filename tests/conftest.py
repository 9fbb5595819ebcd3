"""Shared helpers for the plugin, loader and assertion tests: tiny models, SAEs and token files.

Everything here is small enough to build in well under a second on CPU. ``tiny_assets`` writes, once per
session, a directory a pytester run can use:

- ``sae_identity/``: an SAE Lens directory whose SAE reconstructs every activation exactly (a planted good SAE);
- ``sae_random/``: an SAE Lens directory with random weights (a planted bad SAE);
- ``tokens.npy``: 40 × 16 token ids with BOS (0) at position 0.

``TINY_CONFTEST`` is a conftest for pytester runs that serves the model spec ``"tiny"`` through the
``pytest_saecheck_load_model`` hook.

Tests marked ``slow`` (end-to-end runs in subprocesses or xdist workers, each paying the ~7 s import of
torch, TransformerLens and SAE Lens) are deselected unless ``--run-slow`` is given: ``pytest`` alone is the
fast suite, ``pytest --run-slow -m slow`` (``make test-slow``) runs the rest, and CI runs both.
"""

from __future__ import annotations

import gc
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

D_MODEL, N_CTX, D_VOCAB, N_HEADS = 32, 16, 61, 4
HOOK = "blocks.1.hook_resid_pre"
BOS = 0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (end-to-end runs in subprocesses and xdist workers); "
        "`pytest --run-slow -m slow` runs only those",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: an end-to-end test that takes many seconds (subprocesses, xdist workers); deselected unless "
        "--run-slow is given",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.getoption("--run-slow"):
        return None
    return "slow tests: deselected (--run-slow includes them; `make test-slow` runs only them)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
        config.hook.pytest_deselected(items=slow)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Exempt everything alive after collection from garbage collection.

    By now torch, TransformerLens, SAE Lens and transformers are imported: about half a million objects that
    live as long as the process. Every full ``gc.collect()`` (the session cache frees memory with one whenever
    the model changes, and pytester runs change it often) would walk them all, about 0.25 s each on this
    2-core machine. Frozen, a collection walks only what the tests create, so tests that check that objects
    are freed still see them collected.
    """
    gc.freeze()


def make_tiny_model(device: str = "cpu", tokenizer: Any = None, seed: int = 0) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D_MODEL,
        n_ctx=N_CTX,
        d_head=D_MODEL // N_HEADS,
        n_heads=N_HEADS,
        d_mlp=2 * D_MODEL,
        d_vocab=D_VOCAB if tokenizer is None else len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device=device,
    )
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def _metadata(sae: Any, **metadata: Any) -> None:
    sae.cfg.metadata.hook_name = HOOK
    sae.cfg.metadata.model_name = "tiny"
    sae.cfg.metadata.context_size = N_CTX
    sae.cfg.metadata.prepend_bos = True
    for key, value in metadata.items():
        sae.cfg.metadata[key] = value


def make_identity_sae(d_in: int = D_MODEL, **metadata: Any) -> Any:
    """ReLU(x) − ReLU(−x) = x: latent pairs (e_i, −e_i) reconstruct every input exactly."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in, apply_b_dec_to_input=False))
    _metadata(sae, **metadata)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def make_random_sae(d_in: int = D_MODEL, seed: int = 1, **metadata: Any) -> Any:
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in))
    _metadata(sae, **metadata)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return sae


def make_tokens(n_sequences: int = 40, seq_len: int = N_CTX, seed: int = 0) -> np.ndarray:
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


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a sparse autoencoder reads the residual stream and writes it back",
    "every test should fail for the right reason and pass for the right reason",
]


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """pytester without hypothesis' plugin, whose terminal summary costs ~2 s per in-process run."""
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest")
    return pytester


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("saecheck_assets")
    make_identity_sae().save_model(root / "sae_identity")
    make_random_sae().save_model(root / "sae_random")
    np.save(root / "tokens.npy", make_tokens())
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tokenizer(CORPUS * 20)


TINY_CONFTEST = textwrap.dedent(
    f"""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    LOADS = []

    def pytest_saecheck_load_model(spec, device, dtype):
        if not spec.startswith("tiny"):
            return None
        seed = int(spec[4:] or 0)
        LOADS.append(spec)
        torch.manual_seed(seed)
        cfg = HookedTransformerConfig(
            n_layers=2, d_model={D_MODEL}, n_ctx={N_CTX}, d_head={D_MODEL // N_HEADS}, n_heads={N_HEADS},
            d_mlp={2 * D_MODEL}, d_vocab={D_VOCAB}, act_fn="gelu", normalization_type="LN", seed=seed, device=device,
        )
        return HookedTransformer(cfg).eval()
    """
)


@pytest.fixture
def tiny_pytester(pytester: pytest.Pytester, tiny_assets: Path) -> pytest.Pytester:
    """A pytester whose runs serve model "tiny" (and "tiny1", "tiny2", ... with other seeds) and see the assets.

    ``sae_identity``, ``sae_random`` and ``tokens.npy`` are symlinked into the test directory, so markers can
    name them by relative path.
    """
    pytester.makeconftest(TINY_CONFTEST)
    for name in ("sae_identity", "sae_random", "tokens.npy"):
        (pytester.path / name).symlink_to(tiny_assets / name)
    return pytester
