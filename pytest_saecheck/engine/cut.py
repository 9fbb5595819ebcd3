"""Model surgery: everything the engine asks of a model, behind one protocol.

A :class:`ModelCut` runs the original model once while capturing activations, continues a run from a hook
with replaced activations, runs with arbitrary replacement hooks (joint splicing), and unembeds. The engine
uses nothing else of the model, so a second backend (TransformerLens 4's ``TransformerBridge``, a plain Hugging
Face model) is one more implementation of this protocol. :class:`HookedTransformerCut` is TransformerLens'
``HookedTransformer``; it moves each tensor to the device of the block that uses it (``n_devices > 1``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from pytest_saecheck.errors import HookNotFoundError
from pytest_saecheck.hookpoints import HookSite

Hook = Callable[[torch.Tensor, Any], torch.Tensor | None]


class ModelCut(Protocol):
    """What the engine needs of a model (shapes: ``[batch, pos, ...]``; residuals ``[batch, pos, d_model]``)."""

    n_layers: int
    device: torch.device

    def residual_name(self, entry: int) -> str:
        """The hook holding the residual stream at the start of block ``entry`` (``n_layers``: the end)."""
        ...

    def device_at(self, site: HookSite) -> torch.device:
        """The device of the block in which ``site`` fires: where its activations live."""
        ...

    @property
    def output_device(self) -> torch.device:
        """The device of the unembedding: where logits, and every per-token score, live."""
        ...

    def forward_capturing(
        self, tokens: torch.Tensor, names: Sequence[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        """One original run: final residual (before the final norm), the activations at ``names``, firing order."""
        ...

    def continue_from(
        self, site: HookSite, base: torch.Tensor, replacements: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Final residuals of runs that replace the activation at ``site`` by each of ``replacements``.

        ``base`` is the residual stream at ``site.entry``; for a hook inside a block each replacement is the
        whole activation at that hook. All replacements run as one stacked batch.
        """
        ...

    def forward_with_hooks(self, tokens: torch.Tensor, hooks: Sequence[tuple[str, Hook]]) -> torch.Tensor:
        """Final residual of a run with ``hooks`` (name, fn) applied in order."""
        ...

    def logits(self, final_resid: torch.Tensor) -> torch.Tensor:
        """``[batch, pos, d_vocab_out]`` logits from final residuals."""
        ...


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device(model.cfg.device or "cpu")


def _module_device(module: Any, default: torch.device) -> torch.device:
    """The device of ``module``'s first parameter, or ``default`` when it has none."""
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return default


def has_plain_unembed(model: Any) -> bool:
    """True when the model's unembedding is TransformerLens' plain affine map ``x @ W_U + b_U``.

    False (use the model's own forward) when anything could make the result differ: another unembedding
    class, hooks on it or its hook points, or a logit soft-cap.
    """
    from transformer_lens.components import Unembed

    unembed = getattr(model, "unembed", None)
    if type(unembed) is not Unembed:
        return False
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in unembed.modules()):
        return False
    return not (getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0


class HookedTransformerCut:
    """:class:`ModelCut` for TransformerLens' ``HookedTransformer`` (``start_at_layer``/``stop_at_layer`` cuts)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.n_layers: int = int(model.cfg.n_layers)
        self.device = _model_device(model)
        self.plain_unembed = has_plain_unembed(model)
        # With n_devices > 1 TransformerLens spreads the blocks over devices (and moves the residual stream
        # between them); read where each block's parameters are instead of recomputing its placement rule.
        self.block_devices = [_module_device(block, self.device) for block in model.blocks]
        last = self.block_devices[-1] if self.block_devices else self.device
        self._output_device = _module_device(getattr(model, "unembed", None), last)

    def device_at(self, site: HookSite) -> torch.device:
        return self.block_devices[min(max(site.layer, 0), len(self.block_devices) - 1)]

    @property
    def output_device(self) -> torch.device:
        return self._output_device

    def residual_name(self, entry: int) -> str:
        if entry < self.n_layers:
            return f"blocks.{entry}.hook_resid_pre"
        return f"blocks.{entry - 1}.hook_resid_post"

    def forward_capturing(
        self, tokens: torch.Tensor, names: Sequence[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        captured: dict[str, torch.Tensor] = {}
        order: list[str] = []

        def capture(activation: torch.Tensor, hook: Any) -> None:
            captured[hook.name] = activation
            order.append(hook.name)

        wanted = sorted(set(names))
        with self.model.hooks(fwd_hooks=[(name, capture) for name in wanted]):
            final = self.model(tokens, stop_at_layer=self.n_layers)
        missing = [name for name in wanted if name not in captured]
        if missing:
            raise HookNotFoundError(
                f"hook {', '.join(map(repr, missing))} did not fire in a forward pass of the model; the model "
                "computes it only under a setting that is off, or it is not on the forward path"
            )
        return final, captured, order

    def continue_from(
        self, site: HookSite, base: torch.Tensor, replacements: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        if site.is_residual:
            stacked = torch.cat([r.to(base.device) for r in replacements], dim=0)
            return list(self._to_final(stacked, site.entry).chunk(len(replacements), dim=0))
        stacked_replacement = torch.cat(list(replacements), dim=0)

        def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            return stacked_replacement.to(activation.device)

        layer = site.layer
        batched = base.repeat(len(replacements), *([1] * (base.ndim - 1)))
        with self.model.hooks(fwd_hooks=[(site.hook_name, replace)]):
            block_out = self._blocks(batched, layer, layer + 1)
        return list(self._to_final(block_out, layer + 1).chunk(len(replacements), dim=0))

    def forward_with_hooks(self, tokens: torch.Tensor, hooks: Sequence[tuple[str, Hook]]) -> torch.Tensor:
        with self.model.hooks(fwd_hooks=list(hooks)):
            return self.model(tokens, stop_at_layer=self.n_layers)

    def _to_final(self, resid: torch.Tensor, start: int) -> torch.Tensor:
        if start >= self.n_layers:
            return resid
        return self._blocks(resid, start, self.n_layers)

    def _blocks(self, resid: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start`` to ``stop - 1`` on the residual ``[batch, pos, d_model]``. A shortformer model adds its
        positional embedding to every attention layer's queries and keys, not to the residual stream: a run that
        starts from the residual must be given it (``shortformer_pos_embed``), or its attention is position-blind.
        """
        if self.model.cfg.positional_embedding_type != "shortformer":
            return self.model(resid, start_at_layer=start, stop_at_layer=stop)
        positions = self.model.W_pos[: resid.shape[1]].to(device=resid.device, dtype=resid.dtype)
        return self.model(
            resid,
            start_at_layer=start,
            stop_at_layer=stop,
            shortformer_pos_embed=positions.unsqueeze(0).expand(resid.shape[0], -1, -1),
        )

    def logits(self, final_resid: torch.Tensor) -> torch.Tensor:
        if not self.plain_unembed:
            return self.model(final_resid, start_at_layer=self.n_layers)
        # The model's own ln_final, then one addmm: TransformerLens 3's Unembed copies the 150 MB W_U.T on every
        # call first; the product is the same at the same speed without the copy.
        unembed = self.model.unembed
        final_resid = final_resid.to(unembed.W_U.device)
        normalized = (
            final_resid if self.model.cfg.normalization_type is None else self.model.ln_final(final_resid)
        )
        logits = torch.addmm(unembed.b_U, normalized.reshape(-1, normalized.shape[-1]), unembed.W_U)
        return logits.reshape(*normalized.shape[:-1], logits.shape[-1])

    def zeros_residual(self, seq_len: int, site: HookSite) -> torch.Tensor:
        """A ``[1, seq_len, d_model]`` residual of zeros at the residual hook ``site`` (a fully ablated residual
        stream), on the device of the block where ``site`` fires."""
        d_model = int(self.model.cfg.d_model)
        return torch.zeros((1, seq_len, d_model), device=self.device_at(site), dtype=self.model.cfg.dtype)
