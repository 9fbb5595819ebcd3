"""The demo model's architecture: a TransformerLens ``HookedTransformer`` with the demo tokenizer attached.

The architecture alone, for the loader (:func:`pytest_saecheck.demo.load_model`) and the build
(:mod:`pytest_saecheck.demo.build`, which trains it). Importing this module imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

ASSETS_DIR: Path = Path(__file__).resolve().parent / "assets"
"""Where the shipped assets live (the model weights, the SAEs, ``metadata.json``)."""
MODEL_WEIGHTS_FILENAME = "model.safetensors"
"""The trained model's parameters (safetensors) in :data:`ASSETS_DIR`."""


def make_model(model_config: dict[str, Any], device: Any = "cpu", dtype: Any = None) -> HookedTransformer:
    """A ``HookedTransformer`` with the demo tokenizer attached and weights freshly initialised.

    ``model_config``: ``HookedTransformerConfig`` fields plus ``model_name`` (the build's
    ``BuildConfig.model_config_dict()``, shipped as ``metadata()["model_config"]``). ``device``: where the weights
    are made. ``dtype``: a ``torch.dtype`` or its name; ``None`` is float32.
    """
    import warnings

    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from pytest_saecheck.demo.tokenizer import build_tokenizer

    kwargs = {k: v for k, v in model_config.items() if k not in {"model_name"}}
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cfg = HookedTransformerConfig(
        **kwargs, model_name=model_config["model_name"], device=str(device), dtype=dtype or torch.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=build_tokenizer())
    return model


__all__ = ["ASSETS_DIR", "MODEL_WEIGHTS_FILENAME", "make_model"]
