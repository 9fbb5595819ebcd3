"""The engine, read top to bottom: :func:`evaluate` plans (options, the model's cut, one member per
dictionary, tokens: :mod:`~pytest_saecheck.engine.plan`), runs one streaming pass
(:mod:`~pytest_saecheck.engine.passes`, every splice through :mod:`~pytest_saecheck.engine.splice`) and finishes
(metrics from float64 sums: :mod:`~pytest_saecheck.engine.finish`)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import torch

from pytest_saecheck import normalisation as norm
from pytest_saecheck.clt import CrossLayerTranscoder
from pytest_saecheck.defaults import DEFAULT_BATCH_SIZE
from pytest_saecheck.dictionaries import Dictionary
from pytest_saecheck.engine.backends import check_model, cut_for
from pytest_saecheck.engine.finish import unresolved_ratios
from pytest_saecheck.engine.grouping import resolve_labels
from pytest_saecheck.engine.member import Member, hook_z_reshaping_off
from pytest_saecheck.engine.passes import Pass
from pytest_saecheck.engine.plan import (
    check_joint,
    check_sizes,
    check_tokens,
    named_dictionaries,
    naming,
    per_member,
    token_policy,
)
from pytest_saecheck.engine.replacement import alone_view, evaluate_clt, refuse_clt_in_set
from pytest_saecheck.engine.result import Evaluation, EvaluationSet
from pytest_saecheck.errors import ConfigError, SAECheckWarning
from pytest_saecheck.models import LanguageModel
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.scaling import DEFAULT_LAW, ScalingLaw, as_scaling_law

__all__ = ["Stream", "check_model", "evaluate", "open_stream", "unresolved_ratios"]

#: A token grouping: labels ``[n_sequences, seq_len]`` (``-1`` = no group), or a callable of the tokens giving them.
TokenGroups = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
#: Sequential gates: ``[{"metric": ..., "max_value": ..., "confidence": ...}]`` (``assert_ce_recovery``'s arguments).
Gates = Sequence[Mapping[str, object]]


@overload
def evaluate(
    model: LanguageModel,
    sae: Dictionary | CrossLayerTranscoder,
    tokens: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_bos: bool = True,
    exclude_special_tokens: bool = True,
    exclude_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    policy: TokenPolicy | None = None,
    activation_scaler: object = None,
    mean_activation: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    mean_ablation: bool = True,
    scaling_law: ScalingLaw | str | tuple[float, float] | None = DEFAULT_LAW,
    joint: bool = False,
    progress: bool | None = None,
    template_budget_bytes: int | None = None,
    token_groups: TokenGroups | None = None,
    group_names: Sequence[str] | None = None,
    backend: str = "auto",
    keep_layers: Sequence[int] = (),
    sequential: Gates | None = None,
) -> Evaluation: ...


@overload
def evaluate(
    model: LanguageModel,
    sae: Sequence[Dictionary] | Mapping[str, Dictionary],
    tokens: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_bos: bool = True,
    exclude_special_tokens: bool = True,
    exclude_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    policy: TokenPolicy | None = None,
    activation_scaler: object = None,
    mean_activation: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    mean_ablation: bool = True,
    scaling_law: ScalingLaw | str | tuple[float, float] | None = DEFAULT_LAW,
    joint: bool = False,
    progress: bool | None = None,
    template_budget_bytes: int | None = None,
    token_groups: TokenGroups | None = None,
    group_names: Sequence[str] | None = None,
    backend: str = "auto",
    keep_layers: Sequence[int] = (),
    sequential: Gates | None = None,
) -> EvaluationSet: ...


def evaluate(
    model: LanguageModel,
    sae: Dictionary | CrossLayerTranscoder | Sequence[Dictionary] | Mapping[str, Dictionary],
    tokens: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_bos: bool = True,
    exclude_special_tokens: bool = True,
    exclude_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    policy: TokenPolicy | None = None,
    activation_scaler: object = None,
    mean_activation: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    mean_ablation: bool = True,
    scaling_law: ScalingLaw | str | tuple[float, float] | None = DEFAULT_LAW,
    joint: bool = False,
    progress: bool | None = None,
    template_budget_bytes: int | None = None,
    token_groups: TokenGroups | None = None,
    group_names: Sequence[str] | None = None,
    backend: str = "auto",
    keep_layers: Sequence[int] = (),
    sequential: Gates | None = None,
) -> Evaluation | EvaluationSet:
    """Evaluate ``sae`` spliced into ``model`` on ``tokens`` (``[n_sequences, seq_len]`` token ids).

    ``sae`` is one SAE Lens SAE or transcoder (:mod:`pytest_saecheck.dictionaries`), returning an
    :class:`Evaluation`; or a sequence or a mapping ``name → SAE`` (a release), returning an
    :class:`EvaluationSet` in which each SAE's numbers are those of evaluating it alone, from one shared pass.
    Names default to each SAE's hook (``hook_name->hook_name_out`` for a transcoder), with ``#k`` when hooks
    repeat. ``joint=True`` (several SAEs, distinct write hooks) also splices them all at once
    (``EvaluationSet.joint``, ``EvaluationSet.compounding``). ``model`` is a TransformerLens
    ``HookedTransformer`` or a Hugging Face causal language model, reached through ``backend``
    (:data:`~pytest_saecheck.engine.backends.BACKENDS`; :func:`check_model` says what is refused).

    Token policy (:class:`TokenPolicy`, whose docstring states the rule): ``exclude_bos`` leaves position 0
    out; ``exclude_special_tokens`` the tokenizer's BOS/EOS/PAD wherever they occur; ``exclude_token_ids``
    more ids; ``pad_token_id`` padding. Excluded positions are neither spliced, ablated nor averaged, and a
    prediction counts only if its position is kept and its target is not an excluded id. ``policy`` gives the
    whole policy instead (then none of the four may be given).

    ``activation_scaler``: the normalisation of an SAE Lens checkpoint trained with
    ``normalize_activations="expected_average_only_in"`` (a factor, an SAE Lens ``ActivationScaler``, or the
    checkpoint directory with its ``activation_scaler.json``; for a set, a mapping ``name → value``); without
    one such an SAE gets SAE Lens' estimate sqrt(d_in)/E‖x‖ on these tokens, with a warning. Metrics stay in
    the model's units.

    ``mean_activation`` fixes the mean-ablation vector ``[d_out]`` (for a set, a mapping; default: the mean over
    the evaluated positions). ``scaling_law`` is the law of ``compute_fraction``: a
    :class:`~pytest_saecheck.scaling.ScalingLaw`, a preset name (``"chinchilla"``, ``"epoch"``, ``"kaplan"``),
    ``(E, gamma)`` of ``L(C) = E + A C^-gamma``, the path of a fit file, or ``None`` (default: Chinchilla's,
    which is not fitted for your model: the result says so, with ``compute_fraction`` under every preset in
    ``Evaluation.compute_fraction_by_preset``). ``progress=None`` shows a bar only on an interactive terminal
    (never into pytest's captured output or a log file) and only after two seconds; ``True`` always shows it.

    ``template_budget_bytes`` bounds the memory of zero-ablation templates held through the pass (SAEs writing
    the residual stream with at most position 0 excluded: their ablated run is the same for every sequence and is
    computed once, ``[seq_len, d_vocab_out]`` float32 log-probs each). Default: one batch of logits,
    ``min(batch_size, n_sequences) × seq_len × d_vocab_out × 4`` bytes; SAEs beyond it unembed their template
    again for each batch instead (the same numbers, a little more time). ``0`` holds none.
    ``token_groups``: an integer tensor ``[n_sequences, seq_len]`` labelling each position with a group id
    (``-1`` = no group), or a callable of the tokens returning one (e.g. a :mod:`pytest_saecheck.groups`
    grouping); ``group_names[k]`` names group ``k``. ``Evaluation.groups[name]`` then holds the group's ΔCE, KL,
    R² (and the other :data:`~pytest_saecheck.engine.grouping.GROUP_METRICS`) with bootstrap intervals over
    sequences, and its token count (:mod:`pytest_saecheck.engine.grouping` says which position counts where).

    A cross-layer transcoder (:class:`pytest_saecheck.clt.CrossLayerTranscoder`) is evaluated as its whole
    replacement model (:func:`pytest_saecheck.engine.replacement.evaluate_replacement`: every MLP output replaced
    at once; ``keep_layers`` keeps the model's own MLP output at those layers); the returned :class:`Evaluation`
    also holds each layer spliced alone (``layers``) and the compounding.

    Raises :class:`ConfigError`, :class:`ShapeMismatchError`, :class:`HookNotFoundError`,
    :class:`UnsupportedDictionaryError`, :class:`ModelStateError`, :class:`EmptyTokenSetError`,
    :class:`NonFiniteError`, :class:`DegenerateActivationsError` (all :class:`SAECheckError`).

    ``sequential``: a list of gates (``[{"metric": "delta_ce", "max_value": 0.15, "confidence": 0.95}]``, the
    arguments of ``assert_ce_recovery``): ``tokens`` is then a ceiling, and the evaluation grows over prefixes of it
    until every gate is decided (:mod:`pytest_saecheck.engine.growth`, :mod:`pytest_saecheck.sequential`).
    """
    options = {
        key: value for key, value in locals().items() if key not in ("model", "sae", "tokens", "sequential")
    }
    if sequential is not None:  # a ceiling, grown until every gate is decided (engine.growth)
        from pytest_saecheck.engine.growth import evaluate_sequential

        return evaluate_sequential(evaluate, open_stream, model, sae, tokens, sequential, options)
    started = time.perf_counter()
    # --- plan: the options checked, the model's cut, one member per dictionary, the tokens ------------------
    scaling_law = as_scaling_law(scaling_law)
    if isinstance(sae, CrossLayerTranscoder):
        policy = token_policy(policy, exclude_bos, exclude_special_tokens, exclude_token_ids, pad_token_id)
        unsupported = {"activation_scaler": activation_scaler, "mean_activation": mean_activation}
        unsupported["token_groups"] = token_groups
        return evaluate_clt(
            model,
            sae,
            tokens,
            unsupported,
            batch_size=batch_size,
            policy=policy,
            scaling_law=scaling_law,
            keep_layers=keep_layers,
            progress=progress,
            backend=backend,
        )
    stream = _open(model, sae, tokens, {**options, "scaling_law": scaling_law}, started)
    return stream.to(stream.ceiling)


class Stream:
    """A planned evaluation over ``tokens`` (the ceiling) that runs its pass batch by batch on demand: ``to(n)``
    is the evaluation of the first ``n`` sequences, its sums merged with those of the batches already run
    (:class:`~pytest_saecheck.engine.passes.Pass`), so growing look by look costs what one pass over the furthest
    look costs. ``to(ceiling)`` is :func:`evaluate`'s result exactly."""

    def __init__(
        self,
        run: Pass,
        tokens: torch.Tensor,
        means: Mapping[str, Any],
        named: Mapping[str, Any],
        single: bool,
        model_hooks: Sequence[str],
        progress: bool | None,
        started: float,
    ) -> None:
        self.run, self.tokens, self.means, self.named = run, tokens, means, named
        self.single, self.model_hooks, self.progress, self.started = single, model_hooks, progress, started
        self._shown: set[str] = set()

    @property
    def ceiling(self) -> int:
        """The number of sequences of the token set."""
        return int(self.tokens.shape[0])

    @property
    def done(self) -> int:
        """The sequences run so far."""
        return self.run.done

    def to(self, n_sequences: int) -> Evaluation | EvaluationSet:
        """The evaluation of the first ``n_sequences`` sequences (at least those run already; whole batches, or the
        ceiling). Raises :class:`ConfigError` for a number outside [1, ceiling]."""
        if not 1 <= n_sequences <= self.ceiling:
            raise ConfigError(f"a stream grows to 1 to {self.ceiling} sequences, got {n_sequences}")
        run = self.run
        sites = [site for m in run.members for site in (m.read, m.write)]
        with torch.inference_mode(), hook_z_reshaping_off(list(self.named.values())), run.cut.prepared(sites):
            if not run.started:
                run.start(self.tokens, self.means)
            run.advance(max(n_sequences, run.done), self.progress)
            evaluations, joint_evaluation, compounding = run.results()
        return self._returned(evaluations, joint_evaluation, compounding)

    def _returned(
        self,
        evaluations: dict[str, Evaluation],
        joint_evaluation: Evaluation | None,
        compounding: dict[str, Any] | None,
    ) -> Evaluation | EvaluationSet:
        """What every result of this call shares; each warning shown once per stream."""
        duration = time.perf_counter() - self.started
        # each SAE's share of the shared pass, so that the SAEs' durations add up to the pass's wall time
        evaluations = {
            name: evaluation.finished(self.model_hooks, duration / len(evaluations))
            for name, evaluation in evaluations.items()
        }
        if joint_evaluation is not None:
            joint_evaluation = alone_view(joint_evaluation, evaluations).finished(self.model_hooks, duration)
        shown = {
            (message if self.single else f"SAE {name!r}: {message}"): None
            for name, evaluation in evaluations.items()
            for message in evaluation.warnings
        }
        for message in shown:
            if message not in self._shown:
                self._shown.add(message)
                warnings.warn(message, SAECheckWarning, stacklevel=4)
        if self.single:
            return next(iter(evaluations.values()))
        return EvaluationSet(evaluations, joint_evaluation, compounding)


def open_stream(model: Any, sae: Any, tokens: torch.Tensor, **options: Any) -> Stream:
    """A :class:`Stream` of ``evaluate(model, sae, tokens, **options)`` (the same options and defaults; not a
    cross-layer transcoder, nor ``sequential=``). Raises what :func:`evaluate` raises, and :class:`ConfigError`
    for an unknown option."""
    import inspect

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(evaluate).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "sequential"
    }
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown evaluate option(s) {', '.join(unknown)}; the options are {', '.join(defaults)}"
        )
    if isinstance(sae, CrossLayerTranscoder):
        raise ConfigError(
            "a cross-layer transcoder's replacement is evaluated whole (evaluate), not streamed"
        )
    merged = {**defaults, **options}
    merged["scaling_law"] = as_scaling_law(merged["scaling_law"])
    return _open(model, sae, tokens, merged, time.perf_counter())


def _open(model: Any, sae: Any, tokens: torch.Tensor, options: Mapping[str, Any], started: float) -> Stream:
    """The plan of :func:`evaluate` (its ``options``; ``scaling_law`` already a law): the options checked, the
    model's cut, one member per dictionary, the tokens; the pass not yet run."""
    o = options
    if o["keep_layers"]:
        raise ConfigError("keep_layers applies to a cross-layer transcoder's replacement; this is not one")
    refuse_clt_in_set(sae)
    single, named = named_dictionaries(sae)
    if o["joint"] and len(named) < 2:
        raise ConfigError(
            "joint=True splices several SAEs at once; give a sequence or mapping of at least two"
        )
    policy = token_policy(
        o["policy"], o["exclude_bos"], o["exclude_special_tokens"], o["exclude_token_ids"], o["pad_token_id"]
    )
    check_sizes(o["batch_size"], o["template_budget_bytes"])
    cut = cut_for(model, o["backend"])
    model_hooks = cut.check()
    policy = policy.resolved_for(cut)
    scalers = per_member("activation_scaler", o["activation_scaler"], named, single)
    means = per_member("mean_activation", o["mean_activation"], named, single)
    members = []
    for name, one in named.items():
        with naming(name, not single):
            members.append(Member(name, one, cut, norm.as_normalisation(scalers.get(name))))
    if o["joint"]:
        check_joint(members)
    tokens = check_tokens(cut, tokens, policy)
    token_groups, group_names = o["token_groups"], o["group_names"]
    groups = resolve_labels(token_groups, group_names, tokens) if token_groups is not None else None
    if token_groups is None and group_names is not None:
        raise ConfigError("group_names names the groups of token_groups=; give token_groups too")
    run = Pass(
        cut,
        members,
        policy,
        o["batch_size"],
        o["mean_ablation"],
        o["scaling_law"],
        o["joint"],
        o["template_budget_bytes"],
    )
    run.groups = groups
    return Stream(run, tokens, means, named, single, model_hooks, o["progress"], started)
