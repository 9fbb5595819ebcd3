"""The adapter protocol: what the AuxK checks need from a training implementation, and its defaults.

This module is the bottom of the ``training`` package: it imports nothing else from it (the layers run
``checks → reference → resolve → adapters → protocol``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

__all__ = [
    "OPTIONAL_MEMBERS",
    "REQUIRED_MEMBERS",
    "SELECTIONS",
    "AuxGroups",
    "AuxLossAdapter",
    "AuxLossAdapterBase",
    "default_gradient_tensors",
    "gao_k_aux_and_scale",
]

REQUIRED_MEMBERS = (
    "decoder_bias",
    "decoder_weight",
    "aux_pre_activations",
    "reconstruction",
    "aux_loss",
    "reduce_aux_error",
)
OPTIONAL_MEMBERS = (
    "selection",
    "shift_invariant",
    "k_aux_and_scale",
    "aux_groups",
    "gradient_tensors",
    "module",
    "name",
)
SELECTIONS = ("value", "magnitude")

#: ``(start, stop, x_hat_group)`` per group of latents: latents ``start:stop`` reconstruct ``x - x_hat_group``.
AuxGroups = Sequence[tuple[int, int, torch.Tensor]]


def gao_k_aux_and_scale(num_dead: int, d_in: int) -> tuple[int, float]:
    """The documented AuxK heuristic (Gao et al. 2024, appendix B.1, as SAE Lens and sparsify implement it).

    ``k_aux = d_in // 2``; the loss is scaled by ``min(num_dead / k_aux, 1)`` and ``k_aux`` is then capped at
    ``num_dead``. Returns ``(k_aux, scale)``.
    """
    k_aux = max(d_in // 2, 1)
    scale = min(num_dead / k_aux, 1.0)
    return min(k_aux, num_dead), scale


def default_gradient_tensors(
    module: torch.nn.Module | None, decoder_bias: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The tensors the detach check compares gradients on when the adapter names none: every trainable
    parameter of ``module``, else ``{"b_dec": decoder_bias}``."""
    if module is not None:
        return {name: p for name, p in module.named_parameters() if p.requires_grad}
    return {"b_dec": decoder_bias}


@runtime_checkable
class AuxLossAdapter(Protocol):
    """What the AuxK checks need from a training implementation.

    Required members (all tensors on the implementation's device and dtype; ``x`` is a ``[batch, d_in]`` batch,
    ``dead_mask`` a boolean ``[d_sae]`` tensor):

    - ``decoder_bias()``: the decoder-bias tensor itself (normally an ``nn.Parameter``), shape ``[d_in]``. The
      checks write probe values into it in place and restore it afterwards.
    - ``decoder_weight()``: the effective decoder rows, ``[d_sae, d_in]``, such that the correct aux
      reconstruction is ``z_aux @ decoder_weight()``. Differentiable (no ``.detach()``). If the implementation
      divides activations by the decoder norms when decoding, return the normalised rows.
    - ``aux_pre_activations(x)``: ``[batch, d_sae]``, the values the implementation picks its top dead latents
      from and whose values it decodes (e.g. SAE Lens ``hidden_pre``; sparsify's post-ReLU ``pre_acts``).
      Differentiable.
    - ``reconstruction(x)``: the implementation's main reconstruction x̂ (with ``b_dec``), ``[batch, d_in]``.
      Differentiable.
    - ``aux_loss(x, dead_mask)``: the implementation's own AuxK loss (a scalar tensor), computed exactly as its
      training step computes it, with the autograd graph.
    - ``reduce_aux_error(squared_error, x)``: the implementation's normalisation of the elementwise squared
      aux error ``[batch, d_in]`` to a scalar, *without* the dead-latent scale (e.g. ``coef *
      sq.sum(-1).mean()``).

    Optional members (the resolver, :func:`pytest_saecheck.training.resolve.resolve`, fills in the defaults
    of :class:`AuxLossAdapterBase` once for an adapter that leaves them out):

    - ``selection``: ``"value"`` (top dead latents by pre-activation, the default) or ``"magnitude"`` (by
      ``|pre-activation|``, keeping the sign, as AbsTopK does).
    - ``shift_invariant``: ``True`` when the encoder sees ``x - b_dec``, so that shifting ``x`` and ``b_dec`` by
      the same vector leaves a correct aux loss unchanged (enables the metamorphic check).
    - ``k_aux_and_scale(num_dead, d_in)``: the implementation's documented ``(k_aux, scale)``;
      default :func:`gao_k_aux_and_scale`.
    - ``aux_groups(x)``: for implementations with one aux loss per group of latents (Matryoshka levels), a
      sequence of ``(start, stop, x_hat_group)``: latents ``start:stop`` reconstruct ``x - x_hat_group``. The
      group losses are summed. Default ``None``: one group, all latents, ``reconstruction(x)``.
    - ``gradient_tensors()``: ``{name: leaf tensor}`` whose aux-loss gradients the detach check compares
      (default :func:`default_gradient_tensors`).
    - ``module``: the ``torch.nn.Module`` whose state the checks snapshot and restore (default: the object
      under test, when it is a module).
    - ``name``: how failure messages name the implementation.
    """

    def decoder_bias(self) -> torch.Tensor: ...

    def decoder_weight(self) -> torch.Tensor: ...

    def aux_pre_activations(self, x: torch.Tensor) -> torch.Tensor: ...

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor: ...

    def aux_loss(self, x: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor: ...

    def reduce_aux_error(self, squared_error: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class AuxLossAdapterBase:
    """Defaults for the optional members of :class:`AuxLossAdapter`; subclass it and fill in the required
    methods (``reduce_aux_error`` defaults to ``squared_error.sum(-1).mean()``). ``training_sae`` is kept as
    ``self.training_sae`` and, if it is a module, as ``self.module``."""

    selection: str = "value"
    shift_invariant: bool = False

    def __init__(self, training_sae: Any) -> None:
        self.training_sae = training_sae
        self.module = training_sae if isinstance(training_sae, torch.nn.Module) else None

    @property
    def name(self) -> str:
        return f"{type(self.training_sae).__qualname__} (via {type(self).__qualname__})"

    if TYPE_CHECKING:  # required, so left to subclasses (an adapter that lacks it is rejected by name)

        def decoder_bias(self) -> torch.Tensor: ...

    def k_aux_and_scale(self, num_dead: int, d_in: int) -> tuple[int, float]:
        return gao_k_aux_and_scale(num_dead, d_in)

    def aux_groups(self, x: torch.Tensor) -> AuxGroups | None:
        return None

    def gradient_tensors(self) -> dict[str, torch.Tensor]:
        return default_gradient_tensors(self.module, self.decoder_bias())

    def reduce_aux_error(self, squared_error: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return squared_error.sum(dim=-1).mean()
