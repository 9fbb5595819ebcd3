"""What an evaluation returns: :class:`Evaluation` (one dictionary, or a joint splice) and
:class:`EvaluationSet` (a release evaluated in one pass)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pytest_saecheck.engine.accumulate import position_intervals
from pytest_saecheck.engine.grouping import GroupResult
from pytest_saecheck.engine.plan import hooks_warning
from pytest_saecheck.errors import ConfigError, SAECheckWarning
from pytest_saecheck.evaluation_fields import EVALUATION_FIELDS
from pytest_saecheck.metrics import BOOTSTRAPPABLE, METRIC_NAMES, metrics_from_sums
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.scaling import ScalingLaw
from pytest_saecheck.stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, bootstrap_intervals


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate`. ``metrics`` is flat: metric name → float, never NaN.

    A metric that is undefined on this data (a zero denominator, a scaling law that does not apply) is
    absent from ``metrics`` and explained in ``undefined``. ``scaling_law`` is the law of ``compute_fraction``
    (its source, and ``fitted``: whether it was fitted for this model); ``compute_fraction_by_preset`` is
    ``compute_fraction`` under every published preset (None where undefined), the sensitivity band of an
    unfitted law. ``layers`` (a cross-layer transcoder's replacement): ``"layer l"`` → that layer spliced alone.
    ``groups`` (with ``evaluate(..., token_groups=...)``): group name →
    :class:`~pytest_saecheck.engine.grouping.GroupResult`, the metrics restricted to that group's positions.

    Frozen: an evaluation is built once; a later stage that learns more (the pass's duration, the hooks on the
    model, a sequential run's gates) makes a copy with :func:`dataclasses.replace`. What it records, and where
    reports show it, is :data:`~pytest_saecheck.evaluation_fields.EVALUATION_FIELDS` (:meth:`to_dict`).
    """

    metrics: dict[str, float]
    undefined: dict[str, str]
    n_tokens: int
    n_sequences: int
    seq_len: int
    hook_name: str
    hook_head_index: int | None
    token_policy: TokenPolicy
    latent_density: list[float]
    delta_ce_by_position: list[float | None]
    kl_by_position: list[float | None]
    per_sequence: dict[str, np.ndarray] = field(repr=False)
    scaling_law: ScalingLaw | None = None
    compute_fraction_by_preset: dict[str, float | None] = field(default_factory=dict)
    batch_size: int = 0
    model_dtype: str = ""
    device: str = ""
    sae_dtype: str = ""
    backend: str = ""
    duration_s: float = 0.0
    hook_name_out: str = ""
    dictionary: dict[str, Any] = field(default_factory=dict)
    normalisation: dict[str, Any] = field(default_factory=dict)
    model_hooks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    members: dict[str, dict[str, float]] = field(default_factory=dict)
    compounding: dict[str, Any] | None = None
    layers: dict[str, Evaluation] = field(default_factory=dict, repr=False)
    groups: dict[str, GroupResult] = field(default_factory=dict)
    per_position: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    sequential: dict[str, Any] | None = None
    _interval_cache: dict[tuple[float, int, int], dict[str, tuple[float, float]]] = field(
        default_factory=dict, repr=False
    )
    _position_cache: dict[tuple[float, int, int], list[list[float] | None]] = field(
        default_factory=dict, repr=False
    )

    def confidence_interval(
        self, name: str, level: float = DEFAULT_LEVEL, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
    ) -> tuple[float, float]:
        """BCa bootstrap interval of a metric over sequences (:mod:`pytest_saecheck.stats`), paired across variants; warns
        (:class:`SAECheckWarning`) when it is undefined or does not contain the value."""
        if name not in METRIC_NAMES:
            raise ConfigError(f"unknown metric {name!r}; known metrics: {', '.join(METRIC_NAMES)}")
        if name not in BOOTSTRAPPABLE:
            raise ConfigError(
                f"{name!r} is a property of the whole token set and has no per-sequence interval"
            )
        if name not in self.metrics:
            raise ConfigError(
                f"{name!r} is undefined for this evaluation: {self.undefined.get(name, 'not computed')}"
            )
        low, high = self.confidence_intervals(level, n_resamples=n_resamples, seed=seed, names=(name,))[name]
        # a reading of this result, not a change to it: the record of a gate's interval carries the note
        for message in interval_notes(self.metrics, {name: (low, high)}, level):
            warnings.warn(message, SAECheckWarning, stacklevel=2)
        return low, high

    def confidence_intervals(
        self,
        level: float = DEFAULT_LEVEL,
        *,
        n_resamples: int = DEFAULT_RESAMPLES,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> dict[str, tuple[float, float]]:
        """Bootstrap intervals of the metrics ``names`` (default: every defined metric that has one), NaN where
        undefined. Only the metrics asked for are resampled; each is cached, and the resamples depend on ``seed``
        alone, so a metric's interval is the same whichever others are asked for with it."""
        wanted = [name for name in (self.metrics if names is None else names) if name in BOOTSTRAPPABLE]
        wanted = [name for name in wanted if name in self.metrics]
        cache = self._interval_cache.setdefault((float(level), int(n_resamples), int(seed)), {})
        missing = [name for name in wanted if name not in cache]
        if missing:
            law = self.scaling_law

            def statistics(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                values = metrics_from_sums(sums, law if "compute_fraction" in missing else None)
                return {name: values[name] for name in missing}

            cache.update(
                bootstrap_intervals(
                    self.per_sequence, statistics, level=level, n_resamples=n_resamples, seed=seed
                )
            )
        return {name: cache[name] for name in wanted}

    def delta_ce_by_position_interval(self, level: float = DEFAULT_LEVEL) -> list[list[float] | None]:
        """The paired bootstrap interval over sequences of ``delta_ce_by_position`` at each position (None where
        no prediction is evaluated; empty with fewer than 2 sequences). Cached per level."""
        key = (float(level), -1, 0)
        if key not in self._position_cache:
            self._position_cache[key] = position_intervals(self.per_position, level)
        return list(self._position_cache[key])

    def compute_law(self) -> dict[str, Any] | None:
        """The law behind ``compute_fraction`` as plain values: the law's record (``ScalingLaw.to_dict``),
        ``label``, ``by_preset``, ``band`` (min, max over the presets where defined), ``above_one`` (the splice
        lowered the loss, so the value is not a fraction) and ``note`` (what reports print beside the value).
        None without a law."""
        law = self.scaling_law
        if law is None:
            return None
        by_preset = dict(self.compute_fraction_by_preset)
        defined = [value for value in by_preset.values() if value is not None]
        value = self.metrics.get("compute_fraction")
        above_one = value is not None and value > 1
        note = f"scaling law {law.label()}"
        if not law.fitted and by_preset:
            shown = ", ".join(
                f"{name} {'undefined' if v is None else f'{v:.3g}'}" for name, v in by_preset.items()
            )
            note += f"; under each published preset: {shown}"
        if above_one:
            note += "; above 1: the splice lowered the loss, so this is not a fraction of training compute"
        return {
            **law.to_dict(),
            "label": law.label(),
            "by_preset": by_preset,
            "band": [min(defined), max(defined)] if defined else None,
            "above_one": above_one,
            "note": note,
        }

    def scaling_law_parameters(self) -> list[float] | None:
        """``[E, gamma]`` of :attr:`scaling_law` (None without a law)."""
        law = self.scaling_law
        return None if law is None else [law.irreducible, law.gamma]

    def finished(self, model_hooks: Sequence[str], duration_s: float) -> Evaluation:
        """This evaluation with what is known once its pass is over: the hooks found on the model (with their
        warning first) and the wall time it took (seconds)."""
        hooks = list(model_hooks)
        notes = [hooks_warning(hooks)] if hooks else []
        return replace(self, model_hooks=hooks, warnings=[*notes, *self.warnings], duration_s=duration_s)

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields (:data:`~pytest_saecheck.evaluation_fields.EVALUATION_FIELDS` supplied by the
        engine) as plain Python types only (safe to put on pytest reports and into JSON)."""
        out: dict[str, Any] = {}
        for recorded in EVALUATION_FIELDS:
            if recorded.source == "engine":
                value = getattr(self, recorded.attribute or recorded.name)
                out[recorded.name] = _plain(value() if callable(value) else value)
        return out


def interval_notes(
    metrics: Mapping[str, float], intervals: Mapping[str, tuple[float, float]], level: float
) -> list[str]:
    """What reports say about bootstrap intervals at ``level`` that are undefined, or do not contain their
    metric's value (a strongly skewed resampling distribution); one line per such interval."""
    notes = []
    for name, (low, high) in intervals.items():
        value = metrics[name]
        if math.isnan(low) or math.isnan(high):
            notes.append(
                f"the {level:.0%} bootstrap interval of {name} is undefined: the metric is undefined in "
                "some resamples of the sequences (for compute_fraction, a resampled loss not above the "
                "scaling law's irreducible loss E; for a ratio, a zero denominator); evaluate more "
                "sequences, or gate on the value without confidence="
            )
        elif not low <= value <= high:
            notes.append(
                f"the {level:.0%} bootstrap interval of {name} [{low:.4g}, {high:.4g}] does not contain "
                f"its value {value:.4g}: the resampled values are strongly skewed (a near-zero "
                "denominator or a few dominant sequences); do not gate on this interval"
            )
    return notes


def _plain(value: Any) -> Any:
    """A recorded value as plain Python types: objects through their ``to_dict()``, containers item by item."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return _plain(to_dict())
    if isinstance(value, Mapping):
        return {name: _plain(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class EvaluationSet(Mapping[str, Evaluation]):
    """A release evaluated in one pass: ``name → Evaluation`` (each SAE spliced alone, as if evaluated alone).

    ``joint`` (with ``evaluate(..., joint=True)``) is every SAE spliced at once, each reading the activation of
    the model with the SAEs upstream of it spliced in: its ``metrics`` hold the joint ``ce_sae``, ``delta_ce``,
    ``kl_sae`` (paired intervals as usual) and ``members`` each SAE's reconstruction metrics inside the joint
    model. ``compounding`` compares the joint ΔCE with the sum of the isolated ΔCEs (nats/token):
    ``delta_ce_joint``, ``delta_ce_isolated_sum``, ``excess`` (joint − sum), its 95% bootstrap interval
    ``excess_interval`` over sequences (paired), and ``ratio`` (joint / sum, when the sum is not 0).
    """

    def __init__(
        self,
        evaluations: Mapping[str, Evaluation],
        joint: Evaluation | None = None,
        compounding: Mapping[str, Any] | None = None,
    ) -> None:
        self.evaluations = dict(evaluations)
        self.joint = joint
        self.compounding = dict(compounding) if compounding is not None else None

    def __getitem__(self, name: str) -> Evaluation:
        try:
            return self.evaluations[name]
        except KeyError:
            raise KeyError(
                f"no SAE named {name!r} in this set; the names are {', '.join(self.evaluations)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.evaluations)

    def __len__(self) -> int:
        return len(self.evaluations)

    def __repr__(self) -> str:
        joint = ", joint" if self.joint is not None else ""
        return f"<EvaluationSet {list(self.evaluations)}{joint}>"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only."""
        return {
            "evaluations": {name: evaluation.to_dict() for name, evaluation in self.evaluations.items()},
            "joint": self.joint.to_dict() if self.joint is not None else None,
            "compounding": dict(self.compounding) if self.compounding is not None else None,
        }
