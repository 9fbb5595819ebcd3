"""Checks of TopK-family training objectives: the AuxK (dead-latent revival) loss.

The AuxK loss of Gao et al. (2024, appendix B.1) asks the top ``k_aux`` dead latents to reconstruct the
residual ``e = x - x̂`` of the live ones, through the decoder weights alone::

    ê = W_dec^T z_aux            (no b_dec: x̂ already contains it)
    L_aux = scale * ‖ê - stop_gradient(e)‖²      k_aux = d_in // 2 (capped at the number dead),
                                                 scale = min(num_dead / (d_in // 2), 1)

followed by an implementation-specific normalisation (SAE Lens: coefficient × mean over rows of the squared
norm; EleutherAI sparsify: total squared error / total variance of the batch).

Every check reads the implementation through an :class:`AuxLossAdapter`; the reference values are computed
independently, from the implementation's own encoder pre-activations and decoder weights, in float64. The
checks change the object under test while they run (they set ``b_dec`` to a probe vector, mark latents dead,
and may run a training forward pass that updates buffers) and restore every parameter, buffer, gradient and
train/eval flag on any exit, exceptions included.

The modules import one way: :mod:`.checks` (the assertions) → :mod:`.reference` (the independent reference and
state restore) → :mod:`.resolve` (finding the adapter, filling its optional members once) → :mod:`.adapters`
(the built-in adapters) → :mod:`.protocol` (what an adapter is).
"""

from __future__ import annotations

from pytest_saecheck.training.adapters import SAELensTopKAdapter, SparsifyAdapter, builtin_training_adapter
from pytest_saecheck.training.checks import (
    assert_aux_k_scaling,
    assert_aux_loss_zero_without_dead,
    assert_aux_residual_detached,
    assert_no_aux_bias_double_count,
    assert_training_objective,
)
from pytest_saecheck.training.protocol import AuxLossAdapter, AuxLossAdapterBase, gao_k_aux_and_scale
from pytest_saecheck.training.resolve import ResolvedAdapter, resolve, resolve_training_adapter

__all__ = [
    "AuxLossAdapter",
    "AuxLossAdapterBase",
    "ResolvedAdapter",
    "SAELensTopKAdapter",
    "SparsifyAdapter",
    "assert_aux_k_scaling",
    "assert_aux_loss_zero_without_dead",
    "assert_aux_residual_detached",
    "assert_no_aux_bias_double_count",
    "assert_training_objective",
    "builtin_training_adapter",
    "gao_k_aux_and_scale",
    "resolve",
    "resolve_training_adapter",
]
