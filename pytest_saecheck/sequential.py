"""Sequential gates: decide a threshold on a metric at planned looks, with a held wrong-verdict rate.

The rule (one home for it; the engine grows, the assertions ask, the report shows what this module decided)
==========================================================================================================

An evaluation grows by whole sequences in planned looks ``n_1 < n_2 < … < n_K`` (cumulative sequence counts;
:func:`look_sizes` doubles from a minimum, and ``n_K`` is the ceiling, ``n_tokens``). A gate ``metric ≥ low`` or
``metric ≤ high`` at confidence ``c`` is decided

* at an **interim look** (``k < K``) only when the data clear the threshold by a boundary ``b`` (below), in
  either direction: *pass* when every threshold is met with room, *fail* when one is violated with room;
* at the **ceiling** (``k = K``) by the fixed-budget rule, unchanged: the bound of the two-sided ``c`` bootstrap
  interval over sequences (:mod:`pytest_saecheck.stats`, ``assert_ce_recovery``). A gate still undecided at
  the last interim look therefore gets exactly the verdict the fixed-budget run gives.

**Error spending** (Haybittle 1971, Br. J. Radiol. 44:793; Peto et al. 1976, Br. J. Cancer 34:585; in the
alpha-spending frame of Lan & DeMets 1983, Biometrika 70:659; Jennison & Turnbull 2000, *Group Sequential
Methods*, §2.7 and ch. 7): the fixed rule errs on one side with probability ``α = (1 − c)/2`` (one bound of a
two-sided interval). The interim looks spend a further ``ε = interim_share · α`` per direction, split evenly
over the ``K − 1`` interim looks: each interim test has one-sided level ``ε/(K − 1)``, boundary
``b`` the Student ``t`` quantile (``n − 1`` degrees of freedom) at ``1 − ε/(K − 1)`` (4.0 at 32 sequences, 3.7 at
128, for ``c = 0.95``, the default share 0.02 and 3 interim looks). By the union
bound, the chance that a gate whose true value sits exactly on its threshold is decided wrongly at *some*
interim look is at most ``ε`` (up to the normal approximation below), whatever the dependence between looks and
**whatever decides which looks are examined** (other gates of the same SAE growing the shared evaluation, the
order in which tests run): this is why the boundaries are Bonferroni splits and not the exact group-sequential
ones, which assume one fixed monitoring plan. The wrong-verdict rate at the threshold is at most the fixed
rule's plus the chance of an interim verdict that the ceiling would have reversed (below ``ε``).

**The interim test** is a mean-zero test, which handles every gated metric of ``assert_ce_recovery``, ratios
included, without the delta method: each is ``g(R)`` with ``R = Σᵢ aᵢ / Σᵢ bᵢ`` a ratio of per-sequence sums and
``g`` monotone (:func:`ratio_form`; e.g. ``delta_ce``: ``a = CE_sae − CE_orig`` summed over the sequence's
predictions, ``b`` their count; ``ce_loss_score``: ``a = CE_zero − CE_sae``, ``b = CE_zero − CE_orig``). With
``E b > 0``, ``R ≥ r₀ ⇔ E[a − r₀ b] ≥ 0`` (Fieller 1954, J. R. Stat. Soc. B 16:175: the pivot of a ratio of
means), so a threshold ``r₀`` on ``R`` is a test that the per-sequence values ``dᵢ = aᵢ − r₀ bᵢ`` have mean
zero (and the denominator's own test must show ``E b > 0``). The statistic is Student's ``t`` of ``d`` with
Hall's skewness correction, whichever is nearer zero (:func:`corrected_t`), compared with ``±b``.

Why this fits per-sequence metrics that are not bounded: ΔCE per sequence has no a-priori range (one bad
sequence can add nats), so the anytime-valid confidence sequences built for bounded observations (betting
martingales, Hoeffding-type) do not apply, and any valid test of a mean of unbounded data rests on a
central-limit approximation (Bahadur & Savage 1956: no finite-sample test exists). The corrected ``t`` needs
only a finite variance; taking the more conservative of ``t`` and its skewness correction guards the direction
where the approximation fails on right-skewed data like per-sequence ΔCE and KL (a sample that has not yet met
the heavy tail has a small mean *and* a small spread: the classic false pass of a plain ``t``). Measured (the
demo, 256 sequences): per-sequence ΔCE skewness 0.0 to 1.6, KL 3.1 to 5.2. ``tests/test_sequential.py``
measures the rates on normal, gamma, log-normal and Pareto-tailed data at 2,000 repetitions: within ``2ε`` (both
directions) up to skewness 1.4; on the heavier tails the interim rate exceeds it (0.0035 to 0.005 against 0.001:
the normal approximation, not the union bound), a fifth of ``α`` at most, and the total stays within the fixed
rule's own simulation error. (Cochran's rule ``n ≥ 25 G₁²`` as a further guard changed none of these rates and
blocked every interim decision on the demo's KL, skewness 3 to 5.)

Gates that are not decided here (``decided at the ceiling``): a point-value gate (no ``confidence``), a gate on
``compute_fraction`` (its definedness needs both losses above the law's ``E``) or on a token group's metric,
and every assertion other than ``assert_ce_recovery`` — they read the evaluation grown to the ceiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pytest_saecheck.errors import ConfigError

DEFAULT_MIN_SEQUENCES = 32
"""Sequences at the first look unless told otherwise (and never fewer than 2 per look)."""

DEFAULT_INTERIM_SHARE = 0.02
"""Share of the fixed rule's one-sided error α that the interim looks may spend, per direction."""

RULE_INTERIM = "interim boundary"
RULE_CEILING = "fixed budget at the ceiling"
RULES = (RULE_INTERIM, RULE_CEILING)
"""How a gate was decided, as the report names it."""

PASS, FAIL = "pass", "fail"

INTERIM_METRICS: tuple[str, ...] = (
    "delta_ce",
    "kl_sae",
    "ce_loss_score",
    "ce_loss_score_mean_ablation",
    "ce_rec",
    "kl_div_score",
    "delta_ce_within_context",
    "delta_ce_beyond_context",
    "kl_sae_within_context",
    "kl_sae_beyond_context",
)
"""The metrics :func:`ratio_form` writes as ratios of per-sequence sums: decidable at an interim look."""


@dataclass(frozen=True)
class SequentialPlan:
    """The planned looks of one sequential evaluation and its interim error budget.

    ``looks``: cumulative numbers of sequences, strictly increasing; the last is the ceiling (``n_tokens`` /
    ``context_size``). ``interim_share``: the share of the fixed rule's one-sided error the interim looks spend.
    """

    looks: tuple[int, ...]
    interim_share: float = DEFAULT_INTERIM_SHARE

    def __post_init__(self) -> None:
        if not self.looks or any(n < 1 for n in self.looks):
            raise ConfigError(f"sequential looks must be positive numbers of sequences, got {self.looks!r}")
        if any(b <= a for a, b in zip(self.looks, self.looks[1:], strict=False)):
            raise ConfigError(f"sequential looks must increase strictly, got {self.looks!r}")
        if not 0.0 < self.interim_share < 1.0:
            raise ConfigError(
                f"sequential interim_share must lie strictly between 0 and 1, got {self.interim_share!r}"
            )

    @property
    def ceiling(self) -> int:
        return self.looks[-1]

    @property
    def n_interim(self) -> int:
        return len(self.looks) - 1

    def interim_level(self, confidence: float) -> float:
        """One-sided level of one interim test for a gate at ``confidence``: ``interim_share · (1 − c)/2 / (K − 1)``."""
        if not 0.0 < confidence < 1.0:
            raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")
        if self.n_interim == 0:
            return 0.0
        return self.interim_share * (1.0 - confidence) / 2.0 / self.n_interim

    def boundary(self, confidence: float, n_sequences: int) -> float:
        """The interim boundary on the corrected ``t`` of ``n_sequences``: the Student ``t`` quantile with
        ``n − 1`` degrees of freedom at ``1 − interim_level`` (inf: no interim look, or fewer than 3 sequences)."""
        level = self.interim_level(confidence)
        if level == 0.0 or n_sequences < 3:
            return math.inf
        from scipy.stats import t as student_t

        return float(student_t.ppf(1.0 - level, n_sequences - 1))

    def to_dict(self) -> dict[str, object]:
        return {"looks": list(self.looks), "ceiling": self.ceiling, "interim_share": self.interim_share}


def look_sizes(ceiling: int, minimum: int = DEFAULT_MIN_SEQUENCES, multiple: int = 1) -> tuple[int, ...]:
    """Looks doubling from ``minimum`` sequences up to ``ceiling`` (always the last), each a multiple of
    ``multiple`` (the batch size, so a sequential run's batches are the fixed run's: the legacy R², a per-batch
    formula, stays the same). A ceiling at or below the minimum is one look: the fixed run."""
    for name, value in (("ceiling", ceiling), ("minimum", minimum), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"sequential {name} must be a positive integer number of sequences, got {value!r}"
            )
    first = max(2, -(-minimum // multiple) * multiple)
    looks: list[int] = []
    size = first
    while size < ceiling:
        looks.append(size)
        size *= 2
    looks.append(ceiling)
    return tuple(looks)


def corrected_t(d: np.ndarray) -> np.ndarray:
    """``T`` along the last axis of ``d`` ``[..., n]``: Student's ``t`` of mean zero, made conservative by Hall's
    skewness correction.

    ``t = √n d̄ / s``; with ``a = G₁/(3√n)``, ``T = t + a t² + a² t³/3 + a/2`` (Hall 1992, J. R. Stat. Soc. B 54:221,
    "On the removal of skewness by transformation": Johnson's 1978 correction made monotone), ``G₁`` the sample
    skewness; the returned ``T`` is whichever of ``t`` and the corrected value lies nearer zero (an estimated
    skewness never makes a decision easier). ``T = 0`` (undecidable) where ``s = 0`` or ``n < 3``.
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.shape[-1]
    if n < 3:
        return np.zeros(d.shape[:-1])
    mean = d.mean(-1)
    centred = d - mean[..., None]
    m2 = (centred * centred).mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(m2 * n / (n - 1))
        t = np.where(sd > 0, math.sqrt(n) * mean / np.where(sd > 0, sd, 1.0), 0.0)
        skewness = np.where(m2 > 0, (centred**3).mean(-1) / np.where(m2 > 0, m2, 1.0) ** 1.5, 0.0)
    a = skewness / (3.0 * math.sqrt(n))
    corrected = t + a * t**2 + a * a * t**3 / 3.0 + a / 2.0
    # the more conservative of t and its correction: an estimated skewness never makes a decision easier
    conservative = np.where(t > 0, np.minimum(t, corrected), np.maximum(t, corrected))
    return np.where(sd > 0, conservative, 0.0)


@dataclass(frozen=True)
class RatioForm:
    """A metric as ``g(Σa / Σb)``: ``numerator`` and ``denominator`` per sequence ``[n_sequences]``;
    ``increasing`` says whether ``g`` increases, ``ratio_of(threshold)`` is ``g⁻¹`` (the threshold on the ratio)."""

    numerator: np.ndarray
    denominator: np.ndarray
    increasing: bool
    ratio_of: Callable[[float], float]


def _identity(value: float) -> float:
    return value


def _two_minus(value: float) -> float:
    return 2.0 - value


def ratio_form(metric: str, per_sequence: Mapping[str, np.ndarray]) -> RatioForm | None:
    """The per-sequence ratio form of ``metric`` (formulas of :func:`pytest_saecheck.metrics.metrics_from_sums`),
    or None when the metric is decided at the ceiling only (or its sums are absent)."""
    s = per_sequence

    def has(*keys: str) -> bool:
        return all(key in s for key in keys)

    if metric == "delta_ce" and has("ce_sum_sae", "ce_sum_orig", "n_ce"):
        return RatioForm(s["ce_sum_sae"] - s["ce_sum_orig"], s["n_ce"], True, _identity)
    if metric == "kl_sae" and has("kl_sum_sae", "n_kl"):
        return RatioForm(s["kl_sum_sae"], s["n_kl"], True, _identity)
    for variant, name in (("zero", "ce_loss_score"), ("mean", "ce_loss_score_mean_ablation")):
        key = f"ce_sum_{variant}"
        if metric == name and has(key, "ce_sum_sae", "ce_sum_orig"):
            return RatioForm(s[key] - s["ce_sum_sae"], s[key] - s["ce_sum_orig"], True, _identity)
    if metric == "ce_rec" and has("ce_sum_sae", "ce_sum_orig"):
        # ce_rec = 2 − Σ CE_sae / Σ CE_orig: decreasing in the ratio
        return RatioForm(s["ce_sum_sae"], s["ce_sum_orig"], False, _two_minus)
    if metric == "kl_div_score" and has("kl_sum_zero", "kl_sum_sae"):
        return RatioForm(s["kl_sum_zero"] - s["kl_sum_sae"], s["kl_sum_zero"], True, _identity)
    for part in ("within", "beyond"):
        if metric == f"delta_ce_{part}_context" and has(
            f"ce_sum_sae_{part}", f"ce_sum_orig_{part}", f"n_ce_{part}"
        ):
            return RatioForm(
                s[f"ce_sum_sae_{part}"] - s[f"ce_sum_orig_{part}"], s[f"n_ce_{part}"], True, _identity
            )
        if metric == f"kl_sae_{part}_context" and has(f"kl_sum_sae_{part}", f"n_kl_{part}"):
            return RatioForm(s[f"kl_sum_sae_{part}"], s[f"n_kl_{part}"], True, _identity)
    return None


def interim_verdicts(
    numerator: np.ndarray,
    denominator: np.ndarray,
    *,
    low: float | None,
    high: float | None,
    boundary: float,
) -> np.ndarray:
    """The interim verdict of the gate ``low ≤ Σa/Σb ≤ high`` (thresholds on the ratio, mapped by ``g⁻¹``).

    ``numerator``/``denominator``: ``[..., n_sequences]`` (leading axes: simulation repetitions). Returns an
    int array ``[...]``: +1 pass (every threshold met beyond the boundary), −1 fail (one violated beyond it),
    0 undecided. A denominator neither positive in every sequence nor itself beyond the boundary above zero leaves
    the gate undecided (the direction of the ratio's inequality rests on its sign).
    """
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    # a count (every b > 0, e.g. the predictions of delta_ce) is positive by construction, with no spread to test
    resolved = (b.min(-1) > 0) | (corrected_t(b) >= boundary)
    met = np.ones(a.shape[:-1], dtype=bool)
    violated = np.zeros(a.shape[:-1], dtype=bool)
    for threshold, wants_above in ((low, True), (high, False)):
        if threshold is None:
            continue
        statistic = corrected_t(a - threshold * b)  # > 0: the ratio is above the threshold
        above, below = statistic >= boundary, statistic <= -boundary
        met &= above if wants_above else below
        violated |= below if wants_above else above
    verdict = np.where(violated, -1, np.where(met, 1, 0))
    return np.where(resolved, verdict, 0).astype(np.int8)


@dataclass(frozen=True)
class GateDecision:
    """One gate at one look: ``verdict`` is ``"pass"``, ``"fail"`` or None (undecided), ``look`` the 1-based
    look index, ``n_sequences`` the sequences seen, ``rule`` one of :data:`RULES` (None while undecided)."""

    verdict: str | None
    look: int
    n_sequences: int
    rule: str | None
    statistic_boundary: float

    def to_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "look": self.look,
            "n_sequences": self.n_sequences,
            "rule": self.rule,
            "boundary": self.statistic_boundary if math.isfinite(self.statistic_boundary) else None,
        }


def decide_interim(
    metric: str,
    per_sequence: Mapping[str, np.ndarray],
    *,
    low: float | None,
    high: float | None,
    confidence: float,
    plan: SequentialPlan,
) -> str | None:
    """``"pass"``, ``"fail"`` or None: the interim verdict of ``low ≤ metric ≤ high`` on these sequences.

    None also when the metric is decided at the ceiling only (:func:`ratio_form` has no form for it).
    """
    form = ratio_form(metric, per_sequence)
    if form is None:
        return None
    boundary = plan.boundary(confidence, len(form.denominator))
    if not math.isfinite(boundary):
        return None
    ratio_low = None if low is None else form.ratio_of(low)
    ratio_high = None if high is None else form.ratio_of(high)
    if not form.increasing:  # g decreasing: metric ≥ low ⇔ R ≤ g⁻¹(low)
        ratio_low, ratio_high = ratio_high, ratio_low
    verdict = int(
        interim_verdicts(form.numerator, form.denominator, low=ratio_low, high=ratio_high, boundary=boundary)
    )
    return {1: PASS, -1: FAIL}.get(verdict)


def gate_label(metric: str, low: float | None, high: float | None, level: float | None) -> str:
    """How a gate reads in the report: ``delta_ce ≤ 0.15 at 95% confidence``."""
    parts = [
        f"{metric} ≥ {low:g}" if low is not None else "",
        f"{metric} ≤ {high:g}" if high is not None else "",
    ]
    shown = " and ".join(part for part in parts if part)
    return shown + (f" at {level:.0%} confidence" if level is not None else " (point value)")
