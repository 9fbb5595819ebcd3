"""Installed versions of the libraries the backends drive, and what they rule out."""

from __future__ import annotations

SUPPORTED_TRANSFORMER_LENS = "3"
"""The TransformerLens major version whose ``HookedTransformer`` the TransformerLens backend drives."""


def installed_version(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def transformer_lens_refusal() -> str | None:
    """Why the TransformerLens backend cannot run with the installed TransformerLens (4 removed
    ``HookedTransformer``; its ``TransformerBridge`` is not a backend yet), or None when it can."""
    version = installed_version("transformer-lens") or installed_version("transformer_lens")
    if version is None or version.split(".")[0] == SUPPORTED_TRANSFORMER_LENS:
        return None
    return (
        f"TransformerLens {version} is installed; pytest-saecheck's TransformerLens backend drives TransformerLens "
        f"{SUPPORTED_TRANSFORMER_LENS}'s HookedTransformer, which TransformerLens 4 removed, and its TransformerBridge "
        f"is not a backend yet (SAE Lens {installed_version('sae-lens') or '(not installed)'} is installed beside it). "
        "Install transformer-lens<4 (pip install 'transformer-lens>=3,<4'), or evaluate the Hugging Face model "
        "with backend='hf'"
    )
