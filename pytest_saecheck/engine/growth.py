"""Sequential evaluation: an evaluation that grows look by look until every gate on it is decided.

The looks and the decision rule are :mod:`pytest_saecheck.sequential`'s. The sequences of look ``k`` are the first
``looks[k]`` sequences of the token set (``n_tokens``, the ceiling), so a sequential run's sequences are a prefix of
the fixed run's and, at the ceiling, its evaluation *is* the fixed run's (regression baselines stay paired).

Growth merges sums across looks: a look runs only the batches beyond the previous one
(:class:`~pytest_saecheck.engine.run.Stream`), so reaching look ``k`` costs one pass over ``looks[k]`` sequences.
What is a property of the whole evaluated set is handled so that the merged sums are the fixed run's:

* the centring of the variance sums is the first batch's mean, the same at every look and in the fixed run;
* the latent firing counts, the second moments of the participation ratio and every per-sequence sum add up;
* the mean-ablation vector of a member ablated by a template (a residual write point) is the mean over the
  sequences run so far, and the template's CE is scored again for every sequence at each look (one template
  forward; the fixed run's vector at the ceiling);
* the mean-ablation vector of any other member, and an estimated activation normalisation, are needed before a
  batch runs: they are fixed before the first look by the pre-pass over the whole token set, as the fixed run
  fixes them. An interim look's evaluation is then ``evaluate`` of its sequences with those given
  (``mean_activation=``, ``activation_scaler=``); the ceiling's is the fixed run's.

A cross-layer transcoder's replacement is not streamed: each look evaluates its prefix afresh (up to twice the
ceiling's sequences in all). A gate that cannot be decided before the ceiling goes there directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pytest_saecheck.engine.result import Evaluation
from pytest_saecheck.sequential import (
    INTERIM_METRICS,
    RULE_CEILING,
    RULE_INTERIM,
    GateDecision,
    SequentialPlan,
    decide_interim,
    gate_label,
)


class Growth:
    """One SAE's sequential evaluation: the evaluation at the furthest look reached, grown on demand.

    ``evaluate_prefix(n)`` evaluates the first ``n`` sequences; ``plan`` gives the looks (the last is the ceiling).
    ``merges``: ``evaluate_prefix`` merges the sequences already evaluated (a :class:`~.run.Stream`'s ``to``), so
    each sequence is evaluated once; otherwise each look evaluates its prefix afresh. ``sequences_evaluated`` and
    ``tokens_evaluated`` count the work done (prefixes evaluated afresh count again); ``decisions`` records each
    gate decided on it (plain dicts, for the report).
    """

    def __init__(
        self, evaluate_prefix: Callable[[int], Evaluation], plan: SequentialPlan, *, merges: bool = False
    ) -> None:
        self._evaluate_prefix = evaluate_prefix
        self.merges = merges
        self.plan = plan
        self.look = -1  # index into plan.looks of the evaluation held; -1: none yet
        self.evaluation: Evaluation | None = None
        self.sequences_evaluated = 0
        self.tokens_evaluated = 0
        self.decisions: list[dict[str, Any]] = []

    def at(self, look: int) -> Evaluation:
        """The evaluation at look ``look`` (0-based), or at the furthest look reached if that is later."""
        if look > self.look or self.evaluation is None:
            n = self.plan.looks[look]
            evaluation = self._evaluate_prefix(n)
            if self.merges:
                self.sequences_evaluated, self.tokens_evaluated = n, evaluation.n_tokens
            else:
                self.sequences_evaluated += n
                self.tokens_evaluated += evaluation.n_tokens
            self.look, self.evaluation = look, evaluation
        assert self.evaluation is not None
        self._stamp()
        return self.evaluation

    def ceiling(self) -> Evaluation:
        """The evaluation at the ceiling: the fixed run's."""
        return self.at(len(self.plan.looks) - 1)

    def decide(
        self, metric: str, low: float | None, high: float | None, confidence: float | None, label: str = ""
    ) -> tuple[Evaluation, GateDecision]:
        """Grow until the gate ``low ≤ metric ≤ high`` is decided at an interim look, else to the ceiling.

        Returns the evaluation the gate is read from and the decision; at the ceiling ``verdict`` is None: the
        fixed-budget rule (the caller's) decides. A point-value gate (``confidence=None``) goes to the ceiling.
        """
        last = len(self.plan.looks) - 1
        look = max(self.look, 0)
        while confidence is not None and metric in INTERIM_METRICS and look < last:
            evaluation = self.at(look)
            n = evaluation.n_sequences
            verdict = (
                decide_interim(
                    metric, evaluation.per_sequence, low=low, high=high, confidence=confidence, plan=self.plan
                )
                if metric in evaluation.metrics
                else None
            )
            if verdict is not None:
                return self._record(
                    GateDecision(verdict, look + 1, n, RULE_INTERIM, self.plan.boundary(confidence, n)),
                    metric,
                    label,
                )
            look = max(look + 1, self.look)
        evaluation = self.ceiling()
        boundary = float("inf")
        return self._record(
            GateDecision(None, last + 1, evaluation.n_sequences, RULE_CEILING, boundary), metric, label
        )

    def _record(self, decision: GateDecision, metric: str, label: str) -> tuple[Evaluation, GateDecision]:
        """The evaluation held, stamped with this decision among the others, and the decision."""
        self.decisions.append({"metric": metric, "gate": label, **decision.to_dict()})
        self._stamp()
        assert self.evaluation is not None
        return self.evaluation, decision

    def summary(self) -> dict[str, Any]:
        """Plain values for the report: the plan, the look reached, the sequences and tokens evaluated, the gates."""
        return {
            **self.plan.to_dict(),
            "look": self.look + 1,
            "n_sequences": self.plan.looks[self.look] if self.look >= 0 else 0,
            "sequences_evaluated": self.sequences_evaluated,
            "tokens_evaluated": self.tokens_evaluated,
            "decisions": [dict(d) for d in self.decisions],
        }

    def _stamp(self) -> None:
        if self.evaluation is not None:
            self.evaluation = replace(self.evaluation, sequential=self.summary())


def plan_for(n_sequences: int, batch_size: int, min_sequences: int | None = None) -> SequentialPlan:
    """The plan of a sequential run over ``n_sequences`` (the ceiling): looks doubling from ``min_sequences``
    (default :data:`~pytest_saecheck.sequential.DEFAULT_MIN_SEQUENCES`) in whole batches."""
    from pytest_saecheck.sequential import DEFAULT_MIN_SEQUENCES, look_sizes

    minimum = DEFAULT_MIN_SEQUENCES if min_sequences is None else min_sequences
    return SequentialPlan(look_sizes(n_sequences, minimum, multiple=batch_size))


def evaluate_sequential(
    evaluate: Callable[..., Evaluation],
    open_stream: Callable[..., Any],
    model: Any,
    sae: Any,
    tokens: Any,
    gates: Any,
    options: dict[str, Any],
) -> Evaluation:
    """``evaluate(model, sae, tokens, sequential=gates, **options)``: grow until every gate is decided.

    ``evaluate`` and ``open_stream``: the engine's :func:`~pytest_saecheck.engine.run.evaluate` and
    :func:`~pytest_saecheck.engine.run.open_stream` (passed in: ``evaluate`` calls this function); a stream grows
    look by look, a cross-layer transcoder is evaluated on each look's prefix of ``tokens``.

    ``gates``: a sequence of mappings ``{"metric": ..., "min_score": ..., "max_value": ..., "confidence": ...}``
    (``assert_ce_recovery``'s arguments). Returns the evaluation at the look where the last gate was decided (the
    ceiling when one is a point-value gate or is undecided until then), with ``Evaluation.sequential`` saying what
    happened. Raises :class:`ConfigError` for a set of SAEs, a joint splice or a malformed gate.
    """
    from collections.abc import Mapping, Sequence

    from pytest_saecheck.errors import ConfigError

    if isinstance(sae, (Mapping, list, tuple)) or options.get("joint"):
        raise ConfigError(
            "evaluate(..., sequential=...) grows one SAE's evaluation; evaluate the SAEs of a set one by one "
            "(each stops on its own gates)"
        )
    if isinstance(gates, Mapping) or not isinstance(gates, Sequence) or not gates:
        raise ConfigError(
            "sequential= takes a non-empty list of gates, e.g. "
            '[{"metric": "delta_ce", "max_value": 0.15, "confidence": 0.95}]'
        )
    parsed = []
    for gate in gates:
        if not isinstance(gate, Mapping) or set(gate) - {"metric", "min_score", "max_value", "confidence"}:
            raise ConfigError(
                f"a sequential gate is a mapping with keys metric, min_score, max_value, confidence; got {gate!r}"
            )
        metric = gate.get("metric", "ce_loss_score")
        if metric not in (*INTERIM_METRICS, "compute_fraction"):
            raise ConfigError(
                f"a sequential gate names an unknown metric {metric!r}; choose one of "
                f"{', '.join((*INTERIM_METRICS, 'compute_fraction'))}"
            )
        low, high, level = (_number(gate, key) for key in ("min_score", "max_value", "confidence"))
        if (low is None and high is None) or (level is not None and not 0.0 < level < 1.0):
            raise ConfigError(
                f"a sequential gate needs min_score= or max_value=, and a confidence strictly between 0 and 1; got {gate!r}"
            )
        parsed.append((metric, low, high, level))
    plan = plan_for(int(tokens.shape[0]), int(options.get("batch_size") or 1))
    growth = growth_of(evaluate, open_stream, model, sae, tokens, options, plan)
    for metric, low, high, level in parsed:
        growth.decide(metric, low, high, level, label=gate_label(metric, low, high, level))
    assert growth.evaluation is not None
    return growth.evaluation


def growth_of(
    evaluate: Callable[..., Evaluation],
    open_stream: Callable[..., Any],
    model: Any,
    sae: Any,
    tokens: Any,
    options: dict[str, Any],
    plan: SequentialPlan,
) -> Growth:
    """The growing evaluation of ``evaluate(model, sae, tokens, **options)`` over ``plan``'s looks: a stream whose
    sums merge across looks, or, for a cross-layer transcoder, its prefixes evaluated afresh."""
    from pytest_saecheck.engine.replacement import is_clt

    if is_clt(sae):
        return Growth(lambda n: evaluate(model, sae, tokens[:n], **options), plan)
    stream = open_stream(model, sae, tokens, **options)

    def to(n: int) -> Evaluation:
        evaluation = stream.to(n)
        assert isinstance(evaluation, Evaluation)
        return evaluation

    return Growth(to, plan, merges=True)


def _number(gate: Any, key: str) -> float | None:
    """A gate's number (None when absent), else :class:`ConfigError`."""
    import math

    from pytest_saecheck.errors import ConfigError

    value = gate.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"a sequential gate's {key} must be a finite number, got {value!r}")
    return float(value)
