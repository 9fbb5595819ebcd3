"""Where a dictionary reads and writes: TransformerLens hook sites, module points, and the resolver from a
dictionary's own record to one point on the chosen backend (:mod:`pytest_saecheck.hookpoints.resolve`)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pytest_saecheck.errors import ConfigError, HookNotFoundError

if TYPE_CHECKING:
    import torch

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HEAD_DIM_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")

# Hooks that TransformerLens fires only when a config flag is on (HookedTransformer.check_hooks_to_add).
_FLAGGED_HOOKS: tuple[tuple[str, str], ...] = (
    ("attn.hook_result", "use_attn_result"),
    ("hook_q_input", "use_split_qkv_input"),
    ("hook_k_input", "use_split_qkv_input"),
    ("hook_v_input", "use_split_qkv_input"),
    ("hook_mlp_in", "use_hook_mlp_in"),
    ("hook_attn_in", "use_attn_in"),
)


def required_flags(hook_name: str) -> tuple[str, ...]:
    """The ``model.cfg`` flags that must be on for ``hook_name`` to fire (e.g. ``use_hook_mlp_in``)."""
    return tuple(flag for suffix, flag in _FLAGGED_HOOKS if hook_name.endswith(suffix))


@dataclass(frozen=True)
class HookSite:
    """A parsed hook point.

    ``resid_layer`` is set when the hook is a residual-stream boundary (``hook_resid_pre`` of layer L, or
    ``hook_resid_post`` of layer L-1): the model can then be cut at block L with ``start_at_layer`` /
    ``stop_at_layer``. Otherwise the hook lies inside block ``layer``.
    """

    hook_name: str
    layer: int
    resid_layer: int | None
    head_index: int | None
    has_head_dim: bool

    @property
    def is_residual(self) -> bool:
        return self.resid_layer is not None

    @property
    def entry(self) -> int:
        """The block at whose start the model can be cut to reach this hook (``start_at_layer``)."""
        return self.resid_layer if self.resid_layer is not None else self.layer

    def select(self, activation: torch.Tensor) -> torch.Tensor:
        """The activation as SAE Lens feeds it to the SAE (one head, or all heads flattened)."""
        if self.head_index is not None:
            return activation[:, :, self.head_index]
        if self.has_head_dim:
            return activation.flatten(-2, -1)
        return activation

    def write_back(self, activation: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        """``activation`` with the SAE-facing part replaced by ``replacement`` (inverse of ``select``)."""
        if self.head_index is not None:
            out = activation.clone()
            out[:, :, self.head_index] = replacement
            return out
        if self.has_head_dim:
            return replacement.reshape(activation.shape)
        return replacement


@dataclass(frozen=True)
class ModulePoint:
    """A point in a PyTorch module tree (a Hugging Face model): what flows into or out of one module.

    ``path`` is the module's dotted name as ``model.named_modules()`` gives it (``"model.layers.12"``,
    ``"model.layers.12.pre_feedforward_layernorm"``). ``io="output"`` is the module's output (the first element
    when it returns a tuple, as decoder layers do); ``io="input"`` is its first positional argument (the hidden
    states). ``layer`` is the index of the decoder layer the point belongs to, or ``None`` outside the layers.
    This is the one description of a read or write point that the hook-point resolver produces and that a
    module-based model backend consumes.
    """

    path: str
    io: Literal["input", "output"]
    layer: int | None

    def __str__(self) -> str:
        return f"{self.path}.{self.io}"


def resolve_hook(
    hook_name: str, head_index: int | None, n_layers: int, hook_names: list[str], n_heads: int | None = None
) -> HookSite:
    """Parse and validate ``hook_name`` (and ``head_index``, against the model's ``n_heads`` when given) against
    the model's hook points."""
    if hook_name not in hook_names:
        close = difflib.get_close_matches(hook_name, hook_names, n=3, cutoff=0.6)
        hint = f" Closest hook names: {', '.join(close)}." if close else ""
        raise HookNotFoundError(
            f"The SAE reads from hook {hook_name!r}, which this model does not have "
            f"({n_layers} layers).{hint} Check the SAE config's hook_name (metadata.hook_name) or load the "
            "model the SAE was trained on."
        )
    match = _BLOCK_HOOK.match(hook_name)
    if match is None:
        raise ConfigError(
            f"Hook {hook_name!r} is outside the transformer blocks; pytest-saecheck evaluates SAEs on "
            "blocks.<L>.* hooks (residual stream, attention, MLP)."
        )
    layer, rest = int(match.group(1)), match.group(2)
    resid_layer: int | None = None
    if rest == "hook_resid_pre":
        resid_layer = layer
    elif rest == "hook_resid_post":
        resid_layer = layer + 1
    has_head_dim = any(rest.endswith(name) for name in _HEAD_DIM_HOOKS)
    if head_index is not None and not has_head_dim:
        raise ConfigError(
            f"The SAE sets hook_head_index={head_index}, but {hook_name!r} has no head dimension; "
            "hook_head_index applies to attention hooks (hook_q/k/v/z) only."
        )
    if head_index is not None and n_heads is not None and not 0 <= head_index < n_heads:
        raise ConfigError(
            f"The SAE config's metadata.hook_head_index is {head_index}, but the model's attention layers have "
            f"{n_heads} heads (0 to {n_heads - 1}); set hook_head_index to the head the SAE was trained on"
        )
    return HookSite(hook_name, layer, resid_layer, head_index, has_head_dim)


from pytest_saecheck.hookpoints.layouts import LAYOUTS, Layout, Site  # noqa: E402
from pytest_saecheck.hookpoints.resolve import (  # noqa: E402
    BackendChoice,
    HookRecord,
    ResolvedPoint,
    ResolvedPoints,
    choose_backend,
    resolve_points,
)

__all__ = [
    "LAYOUTS",
    "BackendChoice",
    "HookRecord",
    "HookSite",
    "Layout",
    "ModulePoint",
    "ResolvedPoint",
    "ResolvedPoints",
    "Site",
    "choose_backend",
    "required_flags",
    "resolve_hook",
    "resolve_points",
]
