"""Device choice: the one rule for where models, SAEs and evaluations run when no device is configured."""

from __future__ import annotations


def auto_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"`` (imports torch when called)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
