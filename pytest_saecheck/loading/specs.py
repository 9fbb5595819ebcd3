"""Spec parsing and the defaults an SAE implies: which model, tokens and context size a test uses.

A spec is what users type: a local path, a TransformerLens model name, an SAE Lens ``release/id`` pair,
``"hf:<dataset>"``, or a name a plug-in loads (the bundled demo's ``"demo"`` and ``"demo/<name>"``). Nothing here
loads anything.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_saecheck import extensions
from pytest_saecheck.defaults import DEFAULT_CONTEXT_SIZE
from pytest_saecheck.errors import ConfigError, SAECheckWarning
from pytest_saecheck.loading.chat import CHAT_PREFIX, default_is_chat

# --------------------------------------------------------------------------------------------------------
# spec helpers


def local_path(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    return path if path.exists() else None


def absolute_path(spec: str) -> str:
    """The absolute path a spec names (for "not found" messages)."""
    return os.path.abspath(os.path.expanduser(spec))


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` is written as a path (``./``, ``../``, ``/``, ``~``, a trailing separator)."""
    # SAE ids and HF names hold "/" too, so only an explicit relative, absolute or home path counts
    return spec.startswith((".", "/", "~", "\\")) or spec.endswith(("/", "\\"))


def split_release(spec: str) -> tuple[str, str]:
    """Split an SAE Lens ``release/id`` spec at the first ``/`` (release names hold no ``/``)."""
    release, sep, sae_id = spec.partition("/")
    if not sep or not release or not sae_id:
        raise ConfigError(
            f"SAE spec {spec!r} is neither an existing local directory nor an SAE Lens 'release/id' pair; "
            'write sae="<release>/<sae id>" (e.g. "gpt2-small-res-jb/blocks.8.hook_resid_pre"), '
            "or the path of a directory holding cfg.json"
        )
    return release, sae_id


# --------------------------------------------------------------------------------------------------------
# SAE config lookups


def sae_metadata(sae: Any, key: str) -> Any:
    """``sae.cfg.metadata[key]`` (SAE Lens 6), falling back to ``sae.cfg.<key>``; None when absent."""
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    value = None
    if metadata is not None:
        try:
            value = metadata[key] if not isinstance(metadata, Mapping) else metadata.get(key)
        except (KeyError, TypeError):
            value = getattr(metadata, key, None)
    if value is None and cfg is not None:
        value = getattr(cfg, key, None)
    return value


def default_model_spec(sae_spec: str, sae: Any) -> str:
    """The model an SAE was trained on, for tests that name only an SAE: a plug-in's answer
    (``pytest_saecheck_default_model``), else the model its config names."""
    answer = extensions.relay().pytest_saecheck_default_model(sae_spec=sae_spec, sae=sae)
    if answer is not None:
        return str(answer)
    name = sae_metadata(sae, "model_name")
    if not name:
        raise ConfigError(
            f"no model is configured and the SAE {sae_spec!r} does not name its model; "
            'set @pytest.mark.saecheck(model="...") or --saecheck-model'
        )
    if not isinstance(name, str):
        raise ConfigError(
            f"the SAE {sae_spec!r} names its model with {name!r}; metadata.model_name must be a string"
        )
    if local_path(name) is not None:  # a path chosen by the artefact, not by the test: say so
        warnings.warn(
            f"the model is {absolute_path(name)!r}, a local directory chosen by the SAE {sae_spec!r} "
            "(its metadata.model_name), not by the test; set model= to choose the model yourself",
            SAECheckWarning,
            stacklevel=2,
        )
    return name


def default_token_source(sae_spec: str | None, sae: Any) -> str:
    """The SAE's own training dataset, ``chat:``-prefixed when the SAE was trained on chat-formatted data
    (:func:`pytest_saecheck.loading.chat.default_is_chat`); a plug-in's answer first
    (``pytest_saecheck_default_tokens``: the demo corpus for the demo SAEs).

    Raises :class:`ConfigError` when the SAE names no dataset (Qwen Scope records ``dataset_path: None``: its
    training data is not public), so the test must bring its own tokens.
    """
    answer = extensions.relay().pytest_saecheck_default_tokens(sae_spec=sae_spec, sae=sae)
    if answer is not None:
        return str(answer)
    dataset = sae_metadata(sae, "dataset_path")
    if not dataset:
        raise ConfigError(
            f"no tokens are configured and the SAE {sae_spec!r} does not name its training dataset (its "
            "dataset_path is empty, as in Qwen Scope releases, whose training data is not public), so this gate "
            "must bring its own tokens; "
            'set @pytest.mark.saecheck(tokens="...") (a local file, "hf:<dataset>" or "demo") or --saecheck-tokens'
        )
    dataset = str(dataset)
    source = dataset if local_path(dataset) is not None or dataset.startswith("hf:") else "hf:" + dataset
    if default_is_chat(sae_metadata(sae, "use_chat_formatting"), dataset):
        return CHAT_PREFIX + source  # trained on chat-formatted data: rendered with the model's chat template
    return source


def default_context_size(context_size: int | None, sae: Any) -> int:
    if context_size is not None:
        return context_size
    from_sae = sae_metadata(sae, "context_size")
    return int(from_sae) if from_sae else DEFAULT_CONTEXT_SIZE


def prepend_bos(sae: Any) -> bool:
    """The SAE's ``prepend_bos`` (default true). Raises :class:`ConfigError` for a value that is not a boolean
    (a string ``"false"`` would otherwise read as true)."""
    value = sae_metadata(sae, "prepend_bos")
    if value is not None and not isinstance(value, bool):
        raise ConfigError(
            f"the SAE config's metadata.prepend_bos must be true or false (a boolean), got "
            f"{type(value).__name__} {value!r}"
        )
    return True if value is None else value
