"""After the pass: metrics from the float64 sums, the reasons a metric is undefined, warnings, and the
:class:`~pytest_saecheck.engine.result.Evaluation` of each dictionary and of the joint splice."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from pytest_saecheck.engine.accumulate import Accumulator, totals
from pytest_saecheck.engine.compounding import compounding as compounding_of
from pytest_saecheck.engine.grouping import group_results
from pytest_saecheck.engine.member import Member
from pytest_saecheck.engine.result import Evaluation
from pytest_saecheck.errors import DegenerateActivationsError
from pytest_saecheck.metrics import (
    METRIC_NAMES,
    RATIO_DENOMINATORS,
    WHOLE_SET_METRICS,
    ablation_needed,
    compute_fraction_by_preset,
    metrics_from_sums,
    ratio_denominators,
    total_variance,
)
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.scaling import ScalingLaw
from pytest_saecheck.stats import DEFAULT_LEVEL, bootstrap_intervals
from pytest_saecheck.sums import Scored, Sum

PARTICIPATION_RATIO_MAX_WIDTH = 4096
"""Above this activation width the d×d covariance for the participation ratio (128 MiB in float64) is skipped."""

LOW_PARTICIPATION = 0.01
"""Preflight: R² is flagged when the participation ratio is below this share of the activation width (or below
2 directions, for narrow activations). A user's sweep of TopK SAEs on pythia-70m and pythia-410m measured 0.008 and
0.001 of d_model at mid-layer ``hook_resid_post``, where R² rose with scale while the patched loss got worse."""

SCALE_MISMATCH_FACTOR = 10.0
"""Preflight: an activation norm (or reconstruction norm) this many times off what the SAE expects is flagged."""

JOINT_METRICS = ("ce_orig", "ce_sae", "delta_ce", "ce_rec", "kl_sae", "compute_fraction")
"""The metrics a joint splice defines as a whole; reconstruction metrics are per member."""

RECONSTRUCTION_METRICS = (
    "explained_variance",
    "explained_variance_legacy",
    "explained_variance_about_zero",
    "mse",
    "cosine_sim",
    "relative_error_norm",
    "l2_ratio",
    "l0",
    "l1",
)


@dataclass
class Finish:
    """What every evaluation of one pass shares, and the step from a member's sums to its evaluation.

    ``groups``: the token-group labels ``[n_sequences, seq_len]`` and group names, when groups were asked for.
    """

    policy: TokenPolicy
    scaling_law: ScalingLaw | None
    batch_size: int
    model_dtype: str
    device: str
    backend: str
    groups: tuple[torch.Tensor, tuple[str, ...]] | None = None

    def _with_breakdowns(self, evaluation: Evaluation, acc: Accumulator) -> Evaluation:
        """The evaluation with its token groups and its per-sequence, per-position CE sums."""
        groups = group_results(acc.group_per_sequence(), self.groups[1]) if self.groups is not None else {}
        return replace(evaluation, per_position=acc.position_per_sequence(), groups=groups)

    def member(self, m: Member, tokens: torch.Tensor, notes: Sequence[str]) -> Evaluation:
        """The evaluation of one member from its sums."""
        assert m.acc is not None
        per_sequence = m.acc.per_sequence()
        sums = totals(per_sequence)
        variance = total_variance(sums)
        scale = float(sums[Sum.SUM_SQ_CENTERED]) / max(float(sums[Sum.N_REC]), 1.0)
        if not variance > 1e-12 * max(scale, 1e-30):
            raise DegenerateActivationsError(
                f"the activations at {m.write.hook_name!r} have zero variance over the {int(sums[Sum.N_REC])} "
                "evaluated positions, so explained variance is undefined; evaluate more varied tokens"
            )
        metrics, undefined = self._defined(metrics_from_sums(sums, self.scaling_law), METRIC_NAMES)
        settle_compute_fraction(metrics, undefined, self.scaling_law)
        for name, reason in unresolved_ratios(per_sequence, sums).items():
            if name in metrics:
                del metrics[name]
                undefined[name] = reason
        density = m.acc.latent_density()
        metrics["alive_fraction"] = float(np.mean(density > 0))
        ratios = m.acc.participation_ratios()
        if ratios is None:
            for name in ("participation_ratio", "participation_ratio_deflated"):
                undefined[name] = (
                    f"not computed: the activation width {m.info.d_out} exceeds {PARTICIPATION_RATIO_MAX_WIDTH} "
                    "(its d×d covariance would be too large)"
                )
        else:
            for name, value in zip(
                ("participation_ratio", "participation_ratio_deflated"), ratios, strict=True
            ):
                if math.isfinite(value):
                    metrics[name] = value
                else:
                    undefined[name] = "the covariance has fewer than two nonzero eigenvalues"
        for name, reason in context_reasons(m, tokens.shape[1]).items():
            metrics.pop(name, None)
            undefined[name] = reason
        evaluation = Evaluation(
            **self._common(tokens, metrics, undefined, per_sequence, m.acc.position_curves()),
            n_tokens=int(sums[Sum.N_REC]),
            hook_name=m.read.hook_name,
            hook_head_index=m.read.head_index,
            latent_density=density.tolist(),
            hook_name_out=m.write.hook_name,
            dictionary=m.info.to_dict(),
            normalisation=m.normalisation.to_dict(),
            sae_dtype=m.dtype_name,
        )
        evaluation = replace(evaluation, warnings=[*notes, *preflight(m, evaluation)])
        return self._with_breakdowns(note_compute_fraction(evaluation), m.acc)

    def _common(
        self,
        tokens: torch.Tensor,
        metrics: Mapping[str, float],
        undefined: dict[str, str],
        per_sequence: dict[str, np.ndarray],
        curves: tuple[list[float | None], list[float | None]],
    ) -> dict[str, Any]:
        """The fields every evaluation of this pass shares (metrics in catalogue order)."""
        return {
            "metrics": {name: metrics[name] for name in METRIC_NAMES if name in metrics},
            "undefined": undefined,
            "n_sequences": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1]),
            "token_policy": self.policy,
            "delta_ce_by_position": curves[0],
            "kl_by_position": curves[1],
            "per_sequence": per_sequence,
            "scaling_law": self.scaling_law,
            "batch_size": self.batch_size,
            "model_dtype": self.model_dtype,
            "backend": self.backend,
            "device": self.device,
        }

    def _defined(
        self, raw: Mapping[str, np.ndarray], names: Sequence[str]
    ) -> tuple[dict[str, float], dict[str, str]]:
        metrics: dict[str, float] = {}
        undefined: dict[str, str] = {}
        for name in names:
            if name in WHOLE_SET_METRICS:
                continue
            if name not in raw:
                undefined[name] = (
                    "not computed (mean ablation disabled)"
                    if ablation_needed(name) is Scored.MEAN
                    else "not computed"
                )
                continue
            value = float(raw[name])
            if math.isfinite(value):
                metrics[name] = value
            else:
                undefined[name] = why_undefined(name)
        return metrics, undefined

    def joint(self, members: Sequence[Member], joint_acc: Accumulator, tokens: torch.Tensor) -> Evaluation:
        """The evaluation of the joint splice (its reconstruction metrics per member)."""
        per_sequence = joint_acc.per_sequence()
        metrics, undefined = self._defined(
            metrics_from_sums(totals(per_sequence), self.scaling_law), JOINT_METRICS
        )
        settle_compute_fraction(metrics, undefined, self.scaling_law)
        for name in METRIC_NAMES:
            if name not in metrics and name not in undefined:
                undefined[name] = joint_reason(name)
        by_member: dict[str, dict[str, float]] = {}
        for m in members:
            assert m.joint_acc is not None
            sums = totals({**per_sequence, **m.joint_acc.per_sequence()})
            raw = metrics_from_sums(sums, None)
            values = {
                name: float(raw[name]) for name in RECONSTRUCTION_METRICS if math.isfinite(float(raw[name]))
            }
            values["alive_fraction"] = float(np.mean(m.joint_acc.latent_density() > 0))
            by_member[m.name] = values
        evaluation = Evaluation(
            **self._common(tokens, metrics, undefined, per_sequence, joint_acc.position_curves()),
            n_tokens=int(totals(per_sequence)[Sum.N_KL]),
            hook_name=" + ".join(m.read.hook_name for m in members),
            hook_head_index=None,
            latent_density=[],
            hook_name_out=" + ".join(m.write.hook_name for m in members),
            dictionary={"kind": "joint", "members": [m.name for m in members]},
            normalisation={m.name: m.normalisation.to_dict() for m in members},
            members=by_member,
        )
        return self._with_breakdowns(note_compute_fraction(evaluation), joint_acc)


def joint_reason(name: str) -> str:
    """Why metric ``name`` is not defined for a joint splice as a whole (it is for each SAE)."""
    if name in RECONSTRUCTION_METRICS or name in (
        "alive_fraction",
        "participation_ratio",
        "participation_ratio_deflated",
    ):
        return (
            "a reconstruction metric is one SAE's: each SAE's value inside the joint model is in "
            "evaluation.members[name]"
        )
    if name in RATIO_DENOMINATORS or name in ("ce_zero", "ce_mean", "kl_zero"):
        return (
            "an ablation baseline ablates one hook, and a joint splice has several: read it in each SAE's isolated "
            "evaluation"
        )
    if "_context" in name:
        return (
            "split at one SAE's training context size, which the SAEs of a joint splice need not share: read it in "
            "each SAE's isolated evaluation"
        )
    return "defined per SAE, not for a joint splice as a whole: read it in each SAE's isolated evaluation"


def compounding(members: Sequence[Member], joint_acc: Accumulator | None) -> dict[str, Any]:
    """Joint ΔCE against the sum of the isolated ΔCEs (:func:`pytest_saecheck.engine.compounding.compounding`)."""
    assert joint_acc is not None
    return compounding_of(joint_acc.per_sequence(), [m.acc.per_sequence() for m in members if m.acc])


def context_reasons(m: Member, seq_len: int) -> dict[str, str]:
    """Why the within/beyond-context metrics are undefined for this SAE and these tokens (empty when defined)."""
    context = m.info.context_size
    names = (
        "delta_ce_within_context",
        "delta_ce_beyond_context",
        "kl_sae_within_context",
        "kl_sae_beyond_context",
    )
    if context is None:
        return dict.fromkeys(
            names, "the SAE's config names no training context size (cfg.metadata.context_size)"
        )
    if seq_len <= context:
        return dict.fromkeys(
            ("delta_ce_beyond_context", "kl_sae_beyond_context"),
            f"every evaluated position lies inside the SAE's training context ({context} tokens); evaluate with "
            f"context_size above {context} (up to the model's n_ctx) to measure beyond it",
        )
    return {}


def preflight(m: Member, result: Evaluation) -> list[str]:
    """Warnings when the activations are grossly off the scale the SAE expects (checked, not guessed)."""
    assert m.acc is not None
    found: list[str] = []
    causes = (
        "likely causes: the model was loaded with weight processing the SAE was not trained with "
        "(fold_ln / center_writing_weights; SAE Lens trains on from_pretrained_no_processing), activation "
        "normalisation not applied, or the wrong hook or model"
    )
    factor = m.normalisation.scaling_factor
    if factor is not None and m.acc.input_norm is not None:
        ratio = m.acc.input_norm * factor / math.sqrt(m.info.d_in)
        if not 1 / SCALE_MISMATCH_FACTOR <= ratio <= SCALE_MISMATCH_FACTOR:
            found.append(
                f"scaled activations at {m.read.hook_name!r} have mean norm {ratio:.3g} × sqrt(d_in), where "
                f"the SAE's normalisation expects about 1; {causes}"
            )
    participation = result.metrics.get("participation_ratio")
    if participation is not None and participation < max(2.0, LOW_PARTICIPATION * m.info.d_out):
        found.append(
            f"the activations at {m.write.hook_name!r} have a participation ratio of {participation:.3g} out of "
            f"{m.info.d_out} dimensions: a few high-variance directions dominate, so explained_variance "
            f"({result.metrics.get('explained_variance', float('nan')):.4f}) is inflated there; read cosine_sim "
            f"({result.metrics.get('cosine_sim', float('nan')):.4f}) and relative_error_norm "
            f"({result.metrics.get('relative_error_norm', float('nan')):.4f}), which do not divide by the variance"
        )
    l2_ratio = result.metrics.get("l2_ratio")
    if l2_ratio is not None and not 1 / SCALE_MISMATCH_FACTOR <= l2_ratio <= SCALE_MISMATCH_FACTOR:
        found.append(
            f"the reconstruction's norm is {l2_ratio:.3g} × the activation's at {m.write.hook_name!r} "
            f"(l2_ratio): the SAE does not see the activations it was trained on; {causes}"
        )
    return found


def unresolved_ratios(
    per_sequence: Mapping[str, np.ndarray], totals: Mapping[str, np.ndarray], level: float = DEFAULT_LEVEL
) -> dict[str, str]:
    """The ratio scores whose denominator is not resolved from zero on this data, with the reason.

    A ratio such as ``ce_loss_score = (L_zero − L_sae) / (L_zero − L_orig)`` divides by noise when its
    denominator's bootstrap interval over sequences includes 0, or when the denominator is smaller than the
    interval's half-width: the score then swings by orders of magnitude between resamples (-6.9 with an
    interval [-1.5, 3.6] at a hook_z hook where zero ablation barely changes the loss). Such a score is
    undefined, not a number a threshold may pass. With fewer than 2 sequences nothing can be judged.
    """
    if len(next(iter(per_sequence.values()))) < 2:
        return {}
    point = ratio_denominators(totals)
    intervals = bootstrap_intervals(per_sequence, ratio_denominators, level=level)
    reasons = {}
    for name, (low, high) in intervals.items():
        value = float(point[name])
        label = RATIO_DENOMINATORS[name]
        if high < 0 and abs(value) > (high - low) / 2:
            reasons[name] = (
                f"its denominator {label} = {value:.3g} is negative on this data (its {level:.0%} bootstrap "
                f"interval over sequences is [{low:.3g}, {high:.3g}]): the ablated model does better than the "
                "original, so the score is no fraction of anything (often tokens the model does not know, e.g. "
                "text of another tokenizer); read delta_ce and kl_sae instead"
            )
            continue
        if low > 0 and value > (high - low) / 2:
            continue
        reasons[name] = (
            f"its denominator {label} = {value:.3g} is not resolved from zero on this data (its {level:.0%} "
            f"bootstrap interval over sequences is [{low:.3g}, {high:.3g}]), so the score divides by noise; "
            "read delta_ce and kl_sae instead, or evaluate more tokens"
        )
    return reasons


def note_compute_fraction(evaluation: Evaluation) -> Evaluation:
    """Record ``compute_fraction`` under every preset (the sensitivity band that reports show beside a law not
    fitted for this model): the evaluation with them. A value above 1 (the splice lowered the loss) is marked by
    ``compute_law()`` where it is shown, not warned about: nobody gated on it."""
    law, metrics = evaluation.scaling_law, evaluation.metrics
    if law is None or "ce_orig" not in metrics or "ce_sae" not in metrics:
        return evaluation
    return replace(
        evaluation,
        compute_fraction_by_preset=compute_fraction_by_preset(metrics["ce_orig"], metrics["ce_sae"]),
    )


def settle_compute_fraction(
    metrics: dict[str, float], undefined: dict[str, str], scaling_law: ScalingLaw | None
) -> None:
    """Move ``compute_fraction`` from ``metrics`` to ``undefined``, with the reason, where ``scaling_law`` cannot
    place these losses (:meth:`~pytest_saecheck.scaling.ScalingLaw.undefined_reason`: below its floor, or near
    the floor of a law not fitted for this model)."""
    if scaling_law is None or "ce_orig" not in metrics or "ce_sae" not in metrics:
        return
    reason = scaling_law.undefined_reason(metrics["ce_orig"], metrics["ce_sae"])
    if reason is not None:
        metrics.pop("compute_fraction", None)
        undefined["compute_fraction"] = reason


def why_undefined(name: str) -> str:
    """Why a ratio metric is NaN on this data (``compute_fraction``'s reason is :func:`settle_compute_fraction`'s)."""
    if name in ("ce_loss_score", "kl_div_score"):
        return "the zero-ablated model is exactly as good as the original (zero denominator)"
    if name == "ce_loss_score_mean_ablation":
        return "the mean-ablated model is exactly as good as the original (zero denominator)"
    return "a denominator is zero on this data"


def under_law(evaluation: Evaluation, scaling_law: ScalingLaw | None) -> Evaluation:
    """``evaluation`` with ``compute_fraction`` under another scaling law, from the same per-sequence sums.

    The law changes no measured number, only this derived one (its value, its undefined reason, its note),
    so a setting that differs only in the law reuses the pass. Returns ``evaluation`` itself when the law is the
    same.
    """
    if scaling_law == evaluation.scaling_law:
        return evaluation
    metrics = {name: value for name, value in evaluation.metrics.items() if name != "compute_fraction"}
    undefined = {name: why for name, why in evaluation.undefined.items() if name != "compute_fraction"}
    if scaling_law is None:
        undefined["compute_fraction"] = "not computed (no scaling law)"
    elif "ce_orig" in evaluation.metrics and "ce_sae" in evaluation.metrics:
        metrics["compute_fraction"] = float(
            metrics_from_sums(totals(evaluation.per_sequence), scaling_law)["compute_fraction"]
        )
        settle_compute_fraction(metrics, undefined, scaling_law)
    ordered = {name: metrics[name] for name in METRIC_NAMES if name in metrics}
    ordered.update({name: value for name, value in metrics.items() if name not in ordered})
    derived = replace(
        evaluation,
        metrics=ordered,
        undefined=undefined,
        scaling_law=scaling_law,
        compute_fraction_by_preset={},
        warnings=list(evaluation.warnings),
        _interval_cache={},
        _position_cache=evaluation._position_cache,
    )
    return note_compute_fraction(derived)
