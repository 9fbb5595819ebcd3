"""Device choice: the one rule for where models, SAEs and evaluations run when no device is configured."""

from __future__ import annotations


def auto_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"`` (imports torch when called)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` (a CUDA device's stream, MPS's queue); nothing on the CPU. Timings
    read after it count the work, not its launch."""
    import torch

    kind = device.split(":", 1)[0]
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))
    elif kind == "mps":
        mps = getattr(torch, "mps", None)
        if mps is not None:
            mps.synchronize()
