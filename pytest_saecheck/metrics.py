"""Metric computations: every headline number as a function of additive per-sequence sums.

What each metric means (formula, scale, direction, bounds) is the catalogue's (:mod:`pytest_saecheck.catalogue`,
re-exported here as ``METRICS``); this module computes them.

Keeping each metric a function of sums lets the same code give the point estimate (sums over all
sequences) and every bootstrap replicate (sums over resampled sequences), so the two cannot drift apart.
All arrays may carry leading batch dimensions (bootstrap replicates); the last axis of ``sum_x_centered`` is
the activation dimension.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pytest_saecheck.catalogue import (  # the catalogue of what each metric means, re-exported here
    BOOTSTRAPPABLE,
    METRIC_NAMES,
    METRICS,
    WHOLE_SET_METRICS,
    MetricInfo,
)
from pytest_saecheck.scaling import DEFAULT_LAW, PRESETS, ScalingLaw, as_scaling_law
from pytest_saecheck.sums import Part, Quantity, Scored, Sum

if TYPE_CHECKING:  # the plugin imports this module; torch is imported where a tensor is computed
    import torch

__all__ = [
    "BOOTSTRAPPABLE",
    "METRICS",
    "METRIC_NAMES",
    "WHOLE_SET_METRICS",
    "MetricInfo",
    "ablation_needed",
    "compute_fraction",
    "compute_fraction_by_preset",
    "metrics_from_sums",
    "participation_ratios",
    "ratio_denominators",
    "reconstruction_terms",
    "total_variance",
    "variance_about_mean",
]


def reconstruction_terms(
    x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor, reference: torch.Tensor
) -> dict[Sum, torch.Tensor]:
    """Per-token terms of every reconstruction metric, for float64 tensors ``x``, ``x_hat`` ``[tokens, d]`` and
    latents ``[tokens, d_sae]``; summed over tokens they are the additive sums :func:`metrics_from_sums` reads.

    ``reference`` is a fixed vector the variance sums are centred on (so Σ‖x − x̄‖² does not cancel); the
    legacy R² centres each token on the mean of the tokens passed in (SAE Lens' batch mean). Norms below 1e-4
    count as 1 in the relative terms, as a guard against division by zero at ablated or padded positions.
    """
    err = x - x_hat
    sse = (err * err).sum(-1)
    norm_x = (x * x).sum(-1).sqrt()
    norm_x_hat = (x_hat * x_hat).sum(-1).sqrt()
    safe = norm_x.where(norm_x >= 1e-4, norm_x.new_ones(()))
    centered = x - reference
    batch_centered = x - x.mean(0)
    return {
        Sum.N_REC: sse.new_ones(sse.shape),
        Sum.SSE: sse,
        Sum.SUM_SQ_NORM: norm_x * norm_x,
        Sum.SUM_SQ_CENTERED: (centered * centered).sum(-1),
        Sum.SUM_X_CENTERED: centered,
        # torch's cosine_similarity: x·x̂ / max(‖x‖‖x̂‖, eps) with eps = 1e-8
        Sum.COS: (x * x_hat).sum(-1) / (norm_x * norm_x_hat).clamp(min=1e-8),
        Sum.RELATIVE_ERROR: sse.sqrt() / safe,
        Sum.L2_RATIO: norm_x_hat / safe,
        Sum.L2_NORM_IN: norm_x,
        Sum.L2_NORM_OUT: norm_x_hat,
        Sum.SUM_SQ_NORM_OUT: norm_x_hat * norm_x_hat,
        Sum.X_DOT_X_HAT: (x * x_hat).sum(-1),
        Sum.EV_LEGACY: 1.0 - sse / (batch_centered * batch_centered).sum(-1),
        Sum.L0: nonzero_count(latents, dim=-1).double(),
        Sum.L1: latents.abs().sum(-1).double(),
    }


def nonzero_count(latents: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """How many entries of the tensor ``latents`` are nonzero, along ``dim`` (all of them when None).

    The 0-"norm" counts them (no boolean temporary, unlike summing a boolean over the last dimension), in at least
    float32 so that the count is exact up to 2**24 entries whatever the latents' dtype (bfloat16 holds integers
    exactly only up to 256).
    """
    import torch

    dtype = torch.promote_types(latents.dtype, torch.float32)
    return torch.linalg.vector_norm(latents, ord=0, dim=dim, dtype=dtype)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator != 0, numerator / np.where(denominator != 0, denominator, 1.0), np.nan)


def compute_fraction(
    ce_orig: npt.ArrayLike, ce_sae: npt.ArrayLike, scaling_law: ScalingLaw | tuple[float, float]
) -> np.ndarray:
    """The fraction of the model's training compute at which its family reaches ``ce_sae`` (nats/token).

    ``((L_sae − E) / (L_orig − E))^(−1/γ)`` for a law reduced to ``L(C) = E + G C^−γ`` on its compute frontier;
    Kaplan et al.'s ``L(C) = (C_c/C)^α_C`` is the case ``E = 0``, ``γ = α_C`` (derivation in
    :mod:`pytest_saecheck.scaling`). Arrays broadcast; NaN where either loss is not above E. A value above 1
    means the splice lowered the loss: it is not a fraction of anything.
    """
    law = as_scaling_law(scaling_law)
    assert law is not None
    irreducible, gamma = law.irreducible, law.gamma
    orig, sae = np.asarray(ce_orig, dtype=np.float64), np.asarray(ce_sae, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        reducible_ratio = _ratio(sae - irreducible, orig - irreducible)
        valid = (orig > irreducible) & (sae > irreducible)
        return np.where(valid, np.power(np.abs(reducible_ratio), -1.0 / gamma), np.nan)


def compute_fraction_by_preset(ce_orig: float, ce_sae: float) -> dict[str, float | None]:
    """``compute_fraction`` under every published preset (None where undefined, as
    :meth:`~pytest_saecheck.scaling.ScalingLaw.undefined_reason` says): the sensitivity band."""
    out: dict[str, float | None] = {}
    for name, law in PRESETS.items():
        value = float(compute_fraction(ce_orig, ce_sae, law))
        defined = np.isfinite(value) and law.undefined_reason(ce_orig, ce_sae) is None
        out[name] = value if defined else None
    return out


def metrics_from_sums(
    sums: Mapping[str, np.ndarray],
    scaling_law: ScalingLaw | tuple[float, float] | None = DEFAULT_LAW,
) -> dict[str, np.ndarray]:
    """Every bootstrappable metric from (possibly resampled) sums; undefined values come back as NaN.

    ``scaling_law`` is the law of ``compute_fraction`` (a :class:`~pytest_saecheck.scaling.ScalingLaw`, a preset
    name or ``(E, gamma)``); ``None`` leaves it out.
    """
    n_ce, n_kl = sums[Sum.N_CE], sums[Sum.N_KL]
    out: dict[str, np.ndarray] = {}
    for scored in Scored:
        if Sum.ce(scored) in sums:
            out[f"ce_{scored}"] = _ratio(sums[Sum.ce(scored)], n_ce)
    ce_orig, ce_sae = out["ce_orig"], out["ce_sae"]
    out["delta_ce"] = ce_sae - ce_orig
    if "ce_zero" in out:
        out["ce_loss_score"] = _ratio(out["ce_zero"] - ce_sae, out["ce_zero"] - ce_orig)
    if "ce_mean" in out:
        out["ce_loss_score_mean_ablation"] = _ratio(out["ce_mean"] - ce_sae, out["ce_mean"] - ce_orig)
    out["ce_rec"] = 2.0 - _ratio(ce_sae, ce_orig)
    out["kl_sae"] = _ratio(sums[Sum.KL_SAE], n_kl)
    if Sum.KL_ZERO in sums:
        out["kl_zero"] = _ratio(sums[Sum.KL_ZERO], n_kl)
        out["kl_div_score"] = _ratio(out["kl_zero"] - out["kl_sae"], out["kl_zero"])
    for part in Part:
        if Sum.of(Quantity.N_CE, part=part) in sums:
            n_part = sums[Sum.of(Quantity.N_CE, part=part)]
            out[f"delta_ce_{part}_context"] = _ratio(
                sums[Sum.ce(Scored.SAE, part)] - sums[Sum.ce(Scored.ORIG, part)], n_part
            )
            out[f"kl_sae_{part}_context"] = _ratio(
                sums[Sum.kl(Scored.SAE, part)], sums[Sum.of(Quantity.N_KL, part=part)]
            )
    if scaling_law is not None:
        out["compute_fraction"] = compute_fraction(ce_orig, ce_sae, scaling_law)

    if Sum.SSE not in sums:  # a joint splice: CE and KL only; the reconstruction is per member
        return out
    sse = sums[Sum.SSE]
    n_rec = sums[Sum.N_REC]
    out["explained_variance"] = 1.0 - _ratio(sse, variance_about_mean(sums))
    out["explained_variance_about_zero"] = 1.0 - _ratio(sse, sums[Sum.SUM_SQ_NORM])
    out["explained_variance_legacy"] = _ratio(sums[Sum.EV_LEGACY], n_rec)
    out["mse"] = _ratio(sse, n_rec)
    out["cosine_sim"] = _ratio(sums[Sum.COS], n_rec)
    out["relative_error_norm"] = _ratio(sums[Sum.RELATIVE_ERROR], n_rec)
    out["l2_ratio"] = _ratio(sums[Sum.L2_RATIO], n_rec)
    if Sum.L2_NORM_IN in sums:  # sums written before these terms existed (a stored document) lack them
        out["l2_norm_in"] = _ratio(sums[Sum.L2_NORM_IN], n_rec)
        out["l2_norm_out"] = _ratio(sums[Sum.L2_NORM_OUT], n_rec)
        # Rajamanoharan et al. 2024 (arXiv:2404.16014) eq. 10, pooled over every kept token
        out["relative_reconstruction_bias"] = _ratio(sums[Sum.SUM_SQ_NORM_OUT], sums[Sum.X_DOT_X_HAT])
    out["l0"] = _ratio(sums[Sum.L0], n_rec)
    out["l1"] = _ratio(sums[Sum.L1], n_rec)
    return out


def variance_about_mean(sums: Mapping[str, np.ndarray]) -> np.ndarray:
    """Σ‖x − x̄‖² over the kept tokens from sums centred on a reference vector c (shape: the sums' leading
    batch dimensions; NaN with no token): Σ‖x − c‖² − ‖Σ(x − c)‖²/n, exact for any c (the König–Huygens
    identity); c near x̄ keeps the subtraction from cancelling. The one home of this formula."""
    centered = sums[Sum.SUM_X_CENTERED]
    return sums[Sum.SUM_SQ_CENTERED] - _ratio(np.sum(centered * centered, axis=-1), sums[Sum.N_REC])


ABLATION_NEEDED: dict[str, Scored] = {
    "ce_zero": Scored.ZERO,
    "ce_loss_score": Scored.ZERO,
    "kl_zero": Scored.ZERO,
    "kl_div_score": Scored.ZERO,
    "ce_mean": Scored.MEAN,
    "ce_loss_score_mean_ablation": Scored.MEAN,
}
"""The metrics that need an ablated model's CE or KL sums, and which ablation."""


def ablation_needed(metric: str) -> Scored | None:
    """The ablated model ``metric`` is computed from (zero or mean ablation), or None."""
    return ABLATION_NEEDED.get(metric)


RATIO_DENOMINATORS: dict[str, str] = {
    "ce_loss_score": "L_zero − L_orig",
    "ce_loss_score_mean_ablation": "L_mean − L_orig",
    "kl_div_score": "KL_zero",
}
"""The ratio scores and the baseline gap each divides by."""


def ratio_denominators(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The denominator of every ratio score present in ``sums`` (same shapes as :func:`metrics_from_sums`)."""
    n_ce = sums[Sum.N_CE]
    out: dict[str, np.ndarray] = {}
    ce_orig = _ratio(sums[Sum.CE_ORIG], n_ce)
    if Sum.CE_ZERO in sums:
        out["ce_loss_score"] = _ratio(sums[Sum.CE_ZERO], n_ce) - ce_orig
    if Sum.CE_MEAN in sums:
        out["ce_loss_score_mean_ablation"] = _ratio(sums[Sum.CE_MEAN], n_ce) - ce_orig
    if Sum.KL_ZERO in sums:
        out["kl_div_score"] = _ratio(sums[Sum.KL_ZERO], sums[Sum.N_KL])
    return out


def participation_ratios(covariance: np.ndarray) -> tuple[float, float]:
    """``(PR, PR without the top eigen-direction)`` of a symmetric covariance matrix ``[d, d]``.

    PR = (Σλ)² / Σλ² (the participation ratio of Gao et al. 2017, "A theory of multineuronal dimensionality,
    dynamics and measurement"), λ the eigenvalues; the deflated ratio removes the largest λ first.
    """
    eigenvalues = np.clip(np.linalg.eigvalsh(covariance), 0.0, None)
    total, squares = float(eigenvalues.sum()), float((eigenvalues**2).sum())
    top = float(eigenvalues[-1]) if eigenvalues.size else 0.0
    raw = total**2 / squares if squares > 0 else float("nan")
    rest = squares - top**2
    deflated = (total - top) ** 2 / rest if rest > 0 else float("nan")
    return raw, deflated


def total_variance(sums: Mapping[str, np.ndarray]) -> float:
    """Σ‖x − x̄‖² over every kept token of an evaluation's totals (:func:`variance_about_mean`), a float."""
    return float(variance_about_mean(sums))
