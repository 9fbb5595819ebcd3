"""The offline demo: a small trained language model and SAEs on it, bundled with the package.

Everything here works with no network: the tokenizer is built in code, the model weights and the SAEs ship in
``pytest_saecheck/demo/assets/`` (regenerate them with ``python -m pytest_saecheck.demo.build``).

- :func:`load_model` - a TransformerLens ``HookedTransformer`` (3 layers, d_model 128) trained on the synthetic
  language of :mod:`pytest_saecheck.demo.language`, tokenizer attached.
- :func:`load_sae` - one of :data:`SAE_NAMES`, loaded with SAE Lens' own ``SAE.load_from_disk``, all on
  :data:`HOOK_NAME`:

  ``good``           a TopK SAE that preserves the model's behaviour (high ``ce_loss_score``, small ``delta_ce``);
  ``variance_only``  a projection on the top 18 principal components: explained variance above 0.9, but a
                     spliced cross-entropy about 60 times the good SAE's ("looks solved, the model disagrees");
  ``dead``           a TopK SAE trained without the AuxK loss at a too high learning rate: about three quarters
                     of its latents never fire, while its behavioural metrics stay good.
- :func:`relu_model` - the same weights with a ReLU MLP (a subject of the metric-pipeline battery).
- :func:`load_tokens` - held-out text (a generator seed namespace disjoint from training), ``<bos>`` first.
- :func:`metadata` - the build's numbers (held-out CE, unigram entropy, per-SAE metrics, seeds, tolerances).
- :func:`scaling_law` - the compute scaling law fitted by the build for the demo's model family (the demo model
  and smaller siblings): the default ``scaling_law`` of tests on the demo model, so ``compute_fraction`` is
  defined and may be gated on.

Token ids: ``PAD_ID`` = 0, ``BOS_ID`` = 1, ``EOS_ID`` = 2, ``UNK_ID`` = 3.

The demo is a plug-in of the core (:mod:`pytest_saecheck.demo.plugin`): it loads the ``"demo"`` model and tokens
and the ``"demo/<name>"`` SAEs, names its scaling law ``"demo"`` and its token grouping ``"demo_constructs"``, and
gives the metric-pipeline battery its subjects. The model's architecture is :mod:`pytest_saecheck.demo.model`;
:mod:`pytest_saecheck.demo.build` trains it.

Importing this module does not import torch, transformers, TransformerLens or SAE Lens; the loaders do.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_saecheck.demo.language import (
    BOS_ID,
    CONSTRUCTS,
    EOS_ID,
    LATENTS,
    NAME,
    PAD_ID,
    UNK_ID,
    VOCAB,
    Document,
    generate_corpus,
    generate_document,
    iter_documents,
    iter_sequences,
    make_sequences,
)
from pytest_saecheck.demo.model import ASSETS_DIR
from pytest_saecheck.errors import ConfigError, LoadError

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerFast

    from pytest_saecheck.scaling import ScalingLaw

MODEL_NAME = NAME
HOOK_NAME = "blocks.1.hook_resid_post"
"""The hook every demo SAE reads (the residual stream after the second of three layers)."""
SAE_NAMES: tuple[str, ...] = ("good", "variance_only", "dead")
N_CTX = 64
HELDOUT_SPLIT = "heldout"


@functools.lru_cache(maxsize=1)
def metadata() -> dict[str, Any]:
    """The contents of ``assets/metadata.json`` (a fresh copy is not made: do not mutate it)."""
    path = ASSETS_DIR / "metadata.json"
    if not path.is_file():
        raise LoadError(
            f"demo assets missing: {path} not found; rebuild them with `python -m pytest_saecheck.demo.build`"
        )
    return json.loads(path.read_text())


def scaling_law() -> ScalingLaw:
    """The compute scaling law ``L(C) = E + A C^-gamma`` fitted for the demo's model family by the build.

    The demo model and its smaller siblings (``metadata()["family"]``), each evaluated on the held-out tokens the
    demo SAEs are evaluated on; compute is ``6 N D``. It is the default ``scaling_law`` of tests on the demo
    model (``scaling_law="demo"`` names it anywhere). Raises :class:`LoadError` when the assets lack the fit.
    """
    from pytest_saecheck.scaling import law_from_file_dict

    data = metadata().get("scaling_law")
    if data is None:
        raise LoadError(
            "the demo assets carry no scaling law fit; rebuild them with `python -m pytest_saecheck.demo.build`"
        )
    return law_from_file_dict(data, "the demo metadata's scaling_law", name="demo")


def _default_device(device: Any) -> Any:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype):
            return value
    raise ConfigError(f"unknown dtype {dtype!r}; use a torch.dtype or a name such as 'float32', 'bfloat16'")


def get_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's word-level tokenizer (built in code; prepends ``<bos>`` when encoding)."""
    from pytest_saecheck.demo.tokenizer import build_tokenizer

    return build_tokenizer()


def load_model(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> HookedTransformer:
    """The trained demo ``HookedTransformer`` in eval mode, tokenizer attached.

    ``device`` defaults to ``"cuda"`` when available, else ``"cpu"``; ``dtype`` to float32.
    """
    from safetensors.torch import load_file

    from pytest_saecheck.demo.model import MODEL_WEIGHTS_FILENAME, make_model

    device = _default_device(device)
    torch_dtype = _resolve_dtype(dtype)
    weights = ASSETS_DIR / MODEL_WEIGHTS_FILENAME
    if not weights.is_file():
        raise LoadError(
            f"demo model weights missing: {weights}; rebuild with `python -m pytest_saecheck.demo.build`"
        )
    model = make_model(metadata()["model_config"], device="cpu", dtype=torch_dtype)
    # Buffers (attention masks) are rebuilt by the model itself: their stored form differs between
    # TransformerLens 2.x and 3.x, so only parameters are taken from the file.
    buffers = {name for name, _ in model.named_buffers()}
    state = {key: value for key, value in load_file(str(weights)).items() if key not in buffers}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in buffers]
    if missing or unexpected:
        raise LoadError(
            f"demo model weights {weights} do not fit the demo config (missing {missing}, unexpected "
            f"{unexpected}); rebuild with `python -m pytest_saecheck.demo.build`"
        )
    if str(device) != "cpu":
        import torch

        model.to(str(torch.device(device)), print_details=False)
    model.eval()
    return model


def relu_model(device: str | torch.device | None = None) -> HookedTransformer:
    """The demo model's weights in the demo architecture with a ReLU MLP (a different, still fixed, model), in
    eval mode on ``device`` (default as for :func:`load_model`)."""
    from pytest_saecheck.demo.model import make_model

    trained = load_model(device="cpu")
    config = {**metadata()["model_config"], "act_fn": "relu"}
    model = make_model(config, device="cpu", dtype=trained.cfg.dtype)
    model.load_state_dict(trained.state_dict(), strict=False)
    device = _default_device(device)
    if str(device) != "cpu":
        import torch

        model.to(str(torch.device(device)), print_details=False)
    return model.eval()


def sae_path(name: str) -> Path:
    """The directory (SAE Lens format: ``cfg.json`` + ``sae_weights.safetensors``) of demo SAE ``name``."""
    if name not in SAE_NAMES:
        raise ConfigError(f"unknown demo SAE {name!r}; allowed: {', '.join(SAE_NAMES)}")
    return ASSETS_DIR / "saes" / name


def load_sae(
    name: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> SAE:
    """Demo SAE ``name`` (one of :data:`SAE_NAMES`), loaded with ``sae_lens.SAE.load_from_disk``."""
    path = sae_path(name)  # validates the name before any heavy import

    import torch
    from sae_lens import SAE

    if not (path / "cfg.json").is_file():
        raise LoadError(
            f"demo SAE {name!r} missing at {path}; rebuild with `python -m pytest_saecheck.demo.build`"
        )
    torch_dtype = _resolve_dtype(dtype)
    device = str(torch.device(_default_device(device)))
    dtype_name = None if torch_dtype is None else str(torch_dtype).removeprefix("torch.")
    return SAE.load_from_disk(path, device=device, dtype=dtype_name)


def load_tokens(
    n_sequences: int = 64, seq_len: int | None = None, seed: int = 0, device: str | torch.device | None = None
) -> torch.Tensor:
    """Held-out token ids ``[n_sequences, seq_len]`` (int64), ``<bos>`` at position 0, packed documents after it.

    The text comes from the generator's ``"heldout"`` seed namespace, which training never draws from.
    ``seq_len`` defaults to the model's context length (64) and must lie in ``[2, n_ctx]``.
    """
    import torch

    n_ctx = N_CTX
    if seq_len is None:
        seq_len = n_ctx
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
        raise ConfigError(f"n_sequences must be an integer >= 1, got {n_sequences!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 2 <= seq_len <= n_ctx:
        raise ConfigError(
            f"seq_len must be an integer in [2, {n_ctx}] (the demo model's n_ctx), got {seq_len!r}"
        )
    from pytest_saecheck.loading.progress import loading_bar

    # Row by row into one tensor: no Python list of every token (8 bytes per token, not about 40).
    out = torch.empty((n_sequences, seq_len), dtype=torch.long)
    rows = iter_sequences(seq_len, seed=seed, split=HELDOUT_SPLIT, latents=False)
    with loading_bar(n_sequences * seq_len, "demo tokens") as bar:
        for index, (ids, _) in zip(range(n_sequences), rows, strict=False):
            out[index] = torch.tensor(ids, dtype=torch.long)
            bar.update(seq_len)
    return out.to(_default_device(device))


def load_tokens_with_latents(
    n_sequences: int = 64, seq_len: int | None = None, seed: int = 0
) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    """The same held-out sequences as :func:`load_tokens` (as lists) with their ground-truth latents."""
    load_tokens(n_sequences, seq_len, seed, device="cpu")  # validates the arguments
    return make_sequences(n_sequences, seq_len or N_CTX, seed=seed, split=HELDOUT_SPLIT)


__all__ = [
    "ASSETS_DIR",
    "BOS_ID",
    "CONSTRUCTS",
    "EOS_ID",
    "HOOK_NAME",
    "LATENTS",
    "MODEL_NAME",
    "N_CTX",
    "PAD_ID",
    "SAE_NAMES",
    "UNK_ID",
    "VOCAB",
    "Document",
    "generate_corpus",
    "generate_document",
    "get_tokenizer",
    "iter_documents",
    "load_model",
    "load_sae",
    "load_tokens",
    "load_tokens_with_latents",
    "make_sequences",
    "metadata",
    "relu_model",
    "sae_path",
    "scaling_law",
]
