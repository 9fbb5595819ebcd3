"""Is the hub reachable? Offline detection and the errors that mean "not on this machine, no network"."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*deprecated")
        yield


# --------------------------------------------------------------------------------------------------------
# offline / network failures


_NETWORK_CLASS_NAMES = frozenset(
    {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "NetworkError",
        "gaierror",
        "ConnectionError",
        "MaxRetryError",
    }
)
_NETWORK_PHRASES = (
    "couldn't connect",
    "could not connect",
    "offline mode",
    "hf_hub_offline",
    "hf_datasets_offline",
    "local cache",
    "cached files",
    "internet connection",
)


def is_unavailable_error(error: BaseException) -> bool:
    """True when ``error`` (or anything in its chain) means "not cached here and no network to fetch it"."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _NETWORK_CLASS_NAMES for cls in type(current).__mro__):
            return True
        message = str(current).lower()
        if any(phrase in message for phrase in _NETWORK_PHRASES):
            return True
        current = current.__cause__ or current.__context__
    return False


def offline_state() -> str:
    """One line on the offline switches and the cache in use, for messages."""
    flags = [
        f"{name}={os.environ[name]}"
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if name in os.environ
    ]
    try:
        from huggingface_hub import constants

        cache = str(constants.HF_HUB_CACHE)
        if getattr(constants, "HF_HUB_OFFLINE", False) and not flags:
            flags.append("HF_HUB_OFFLINE=1")
    except Exception:  # pragma: no cover - huggingface_hub is a dependency of transformers
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    state = ", ".join(flags) if flags else "online mode, but the download failed"
    return f"{state}; Hugging Face cache: {cache} (move it with HF_HOME)"


def hub_offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


# --------------------------------------------------------------------------------------------------------
# loaders that would fetch outside the cache


def cached_tensor_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    """The tensor shapes of ``filename`` in the hub repository ``repo_id``, read from the header of the file in the
    local Hugging Face cache (``hf_hub_download``: offline, the cache only; online, the file the loader reads next).

    Stands in for SAE Lens' ``get_safetensors_tensor_shapes``, which asks the hub for the header by an HTTP range
    request even when the file is cached (SAE Lens 6.x Gemma Scope 2 and Qwen Scope loaders). Raises what
    ``hf_hub_download`` raises for a file that is neither cached nor reachable.
    """
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    path = hf_hub_download(repo_id, filename)
    with safe_open(path, framework="pt") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}


@contextlib.contextmanager
def no_range_requests() -> Iterator[None]:
    """While SAE Lens loads a release, its tensor-shape range request reads the cached file instead
    (:func:`cached_tensor_shapes`): loading never reaches the hub outside huggingface_hub's cache and offline
    switches."""
    try:
        from sae_lens.loading import pretrained_sae_loaders as loaders
    except ImportError:  # an SAE Lens without that module has no such request either
        yield
        return
    original = getattr(loaders, "get_safetensors_tensor_shapes", None)
    if original is None:
        yield
        return
    loaders.get_safetensors_tensor_shapes = cached_tensor_shapes
    try:
        yield
    finally:
        loaders.get_safetensors_tensor_shapes = original
