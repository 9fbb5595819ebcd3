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
