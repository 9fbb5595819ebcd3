"""The keys of the additive per-sequence sums every metric is computed from: one typed key per sum.

An evaluation keeps float64 sums per sequence (:class:`pytest_saecheck.engine.accumulate.Accumulator`) and
computes every metric from them (:func:`pytest_saecheck.metrics.metrics_from_sums`). Each sum is named by a
:class:`Sum`: the quantity summed (:class:`Quantity`), the model scored (:class:`Scored`, for CE and KL) and the
part of the context (:class:`Part`, for the within/beyond-training-context split). A :class:`Sum` is a ``str``
whose value is the name a baseline file stores (``per_sequence.<name>``), so stored documents keep their names.

Sums kept for a subset of the positions (a token group, one position, one side of a paired comparison) live in
the same mapping under a prefix: :func:`with_prefix` and :func:`under_prefix` are the one place that spells it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["Part", "Quantity", "Scored", "Sum", "under_prefix", "with_prefix"]


class _Name(str, enum.Enum):
    """A str enumeration whose members read, print and format as their value (``enum.StrEnum`` of 3.11)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str(self), spec)


class Scored(_Name):
    """The model whose next-token CE or KL is summed: the original, or the model spliced with the SAE's
    reconstruction, zeros (zero ablation) or the mean activation (mean ablation) at the written hook."""

    ORIG = "orig"
    SAE = "sae"
    ZERO = "zero"
    MEAN = "mean"


class Part(_Name):
    """Positions t < C (``WITHIN``) or t ≥ C (``BEYOND``) the SAE's training context size C."""

    WITHIN = "within"
    BEYOND = "beyond"


class Quantity(enum.Enum):
    """What a sum adds up over the kept positions of one sequence."""

    CE = "next-token cross-entropy (nats), over the counted predictions"
    KL = "KL(original ‖ spliced) (nats), over the kept positions"
    N_CE = "number of counted predictions"
    N_KL = "number of kept positions"
    RECONSTRUCTION = "a per-token reconstruction term (metrics.reconstruction_terms)"


class Sum(_Name):
    """One additive per-sequence sum; the value is its stored name."""

    N_CE = "n_ce"
    N_KL = "n_kl"
    CE_ORIG = "ce_sum_orig"
    CE_SAE = "ce_sum_sae"
    CE_ZERO = "ce_sum_zero"
    CE_MEAN = "ce_sum_mean"
    KL_SAE = "kl_sum_sae"
    KL_ZERO = "kl_sum_zero"
    CE_ORIG_WITHIN = "ce_sum_orig_within"
    CE_SAE_WITHIN = "ce_sum_sae_within"
    N_CE_WITHIN = "n_ce_within"
    KL_SAE_WITHIN = "kl_sum_sae_within"
    N_KL_WITHIN = "n_kl_within"
    CE_ORIG_BEYOND = "ce_sum_orig_beyond"
    CE_SAE_BEYOND = "ce_sum_sae_beyond"
    N_CE_BEYOND = "n_ce_beyond"
    KL_SAE_BEYOND = "kl_sum_sae_beyond"
    N_KL_BEYOND = "n_kl_beyond"
    # per-token reconstruction terms (metrics.reconstruction_terms); SUM_X_CENTERED is [d] per sequence
    N_REC = "n_rec"
    SSE = "sse"
    SUM_SQ_NORM = "sum_sq_norm"
    SUM_SQ_CENTERED = "sum_sq_centered"
    SUM_X_CENTERED = "sum_x_centered"
    COS = "cos_sum"
    RELATIVE_ERROR = "rel_err_sum"
    L2_RATIO = "l2_ratio_sum"
    L2_NORM_IN = "l2_norm_in_sum"
    L2_NORM_OUT = "l2_norm_out_sum"
    SUM_SQ_NORM_OUT = "sum_sq_norm_out"
    X_DOT_X_HAT = "x_dot_x_hat_sum"
    EV_LEGACY = "ev_legacy_sum"
    L0 = "l0_sum"
    L1 = "l1_sum"

    @property
    def quantity(self) -> Quantity:
        return _MEANING[self][0]

    @property
    def scored(self) -> Scored | None:
        """The model scored (CE and KL sums), else None."""
        return _MEANING[self][1]

    @property
    def part(self) -> Part | None:
        """The part of the context summed over (the within/beyond split), else None (every position)."""
        return _MEANING[self][2]

    @classmethod
    def of(cls, quantity: Quantity, scored: Scored | None = None, part: Part | None = None) -> Sum:
        """The key of ``quantity`` for ``scored`` over ``part``; ``KeyError`` names a sum no evaluation keeps."""
        try:
            return _KEYS[(quantity, scored, part)]
        except KeyError:
            raise KeyError(
                f"no sum of {quantity.name} for scored={scored} part={part}: an evaluation keeps "
                + ", ".join(sorted(key.value for key in cls))
            ) from None

    @classmethod
    def ce(cls, scored: Scored, part: Part | None = None) -> Sum:
        return cls.of(Quantity.CE, scored, part)

    @classmethod
    def kl(cls, scored: Scored, part: Part | None = None) -> Sum:
        return cls.of(Quantity.KL, scored, part)


_CONTEXT = {
    Part.WITHIN: (Sum.CE_ORIG_WITHIN, Sum.CE_SAE_WITHIN, Sum.N_CE_WITHIN, Sum.KL_SAE_WITHIN, Sum.N_KL_WITHIN),
    Part.BEYOND: (Sum.CE_ORIG_BEYOND, Sum.CE_SAE_BEYOND, Sum.N_CE_BEYOND, Sum.KL_SAE_BEYOND, Sum.N_KL_BEYOND),
}
_MEANING: dict[Sum, tuple[Quantity, Scored | None, Part | None]] = {
    Sum.N_CE: (Quantity.N_CE, None, None),
    Sum.N_KL: (Quantity.N_KL, None, None),
    Sum.CE_ORIG: (Quantity.CE, Scored.ORIG, None),
    Sum.CE_SAE: (Quantity.CE, Scored.SAE, None),
    Sum.CE_ZERO: (Quantity.CE, Scored.ZERO, None),
    Sum.CE_MEAN: (Quantity.CE, Scored.MEAN, None),
    Sum.KL_SAE: (Quantity.KL, Scored.SAE, None),
    Sum.KL_ZERO: (Quantity.KL, Scored.ZERO, None),
}
for _part, (_ce_orig, _ce_sae, _n_ce, _kl_sae, _n_kl) in _CONTEXT.items():
    _MEANING[_ce_orig] = (Quantity.CE, Scored.ORIG, _part)
    _MEANING[_ce_sae] = (Quantity.CE, Scored.SAE, _part)
    _MEANING[_n_ce] = (Quantity.N_CE, None, _part)
    _MEANING[_kl_sae] = (Quantity.KL, Scored.SAE, _part)
    _MEANING[_n_kl] = (Quantity.N_KL, None, _part)
for _key in Sum:
    _MEANING.setdefault(_key, (Quantity.RECONSTRUCTION, None, None))
_KEYS = {meaning: key for key, meaning in _MEANING.items() if meaning[0] is not Quantity.RECONSTRUCTION}

_Key = TypeVar("_Key", bound=str)
_Value = TypeVar("_Value")


def with_prefix(prefix: str, sums: Mapping[_Key, _Value]) -> dict[str, _Value]:
    """``sums`` with every key under ``prefix`` (to keep them in one mapping beside others)."""
    return {prefix + key: value for key, value in sums.items()}


def under_prefix(prefix: str, sums: Mapping[str, _Value]) -> dict[str, _Value]:
    """The entries of ``sums`` under ``prefix``, keyed without it (:func:`with_prefix` undone)."""
    return {key.removeprefix(prefix): value for key, value in sums.items() if key.startswith(prefix)}
