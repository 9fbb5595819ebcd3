"""The pass: every dictionary of a release spliced into one model, on one set of tokens, in one stream.

Per batch:

1. the original model runs **once** (``ModelCut.forward_capturing``), capturing the activation at every
   dictionary's read and write hook; its logits are computed once and shared by every dictionary;
2. each dictionary reconstructs its written activation from its read one (inside the activation normalisation
   it was trained with) and its spliced, zero- and mean-ablated continuations start from its own write hook,
   replacing the activation only at the positions the token policy keeps; each is unembedded one after
   another and CE/KL are scored a few rows at a time against the original's log-probs, computed once per batch
   in place of its logits (``pytest_saecheck.scoring``), so at most two ``[batch, pos, vocab]`` tensors are
   alive;
3. with ``joint=True``, one more run splices every dictionary at once, each reading the activation of the model
   with the dictionaries upstream of it already spliced in;
4. per-sequence sums are accumulated in float64 (``engine.accumulate``); every metric is a function of those
   sums (``pytest_saecheck.metrics``), which also gives paired bootstrap intervals over sequences.

Where the ablated continuation does not depend on the tokens (a residual write hook with at most position 0
excluded), it is computed once for one sequence and reused (``AblationPlan.templated``); with every position
replaced it is the same at every position too, and is computed for one position. The zero-ablation
template's log-probs are held through the pass within a budget (one batch of logits by default; beyond it a
member unembeds its template's final residual again per batch), and the mean-ablation template, scored by CE
only, is scored for every sequence after the pass, one member at a time.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pytest_saecheck import normalisation as norm
from pytest_saecheck.defaults import DEFAULT_BATCH_SIZE
from pytest_saecheck.engine.accumulate import Accumulator, totals
from pytest_saecheck.engine.cut import HookedTransformerCut
from pytest_saecheck.engine.grouping import group_results, resolve_labels
from pytest_saecheck.engine.member import AblationPlan, Member, Template, Variant, token_independent
from pytest_saecheck.engine.result import Evaluation, EvaluationSet
from pytest_saecheck.errors import (
    ConfigError,
    DegenerateActivationsError,
    EmptyTokenSetError,
    ModelStateError,
    SAECheckError,
    SAECheckWarning,
    ShapeMismatchError,
)
from pytest_saecheck.hookpoints import required_flags
from pytest_saecheck.metrics import (
    METRIC_NAMES,
    RATIO_DENOMINATORS,
    WHOLE_SET_METRICS,
    compute_fraction_by_preset,
    metrics_from_sums,
    ratio_denominators,
    total_variance,
)
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.scaling import DEFAULT_LAW, ScalingLaw, as_scaling_law
from pytest_saecheck.scoring import BatchScores, Original, chunk_rows_for, prepare_original, score_batch
from pytest_saecheck.stats import DEFAULT_LEVEL, bootstrap_intervals

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

PARTICIPATION_RATIO_MAX_WIDTH = 4096
"""Above this activation width the d×d covariance for the participation ratio (128 MiB in float64) is skipped."""

LOW_PARTICIPATION = 0.01
"""Preflight: R² is flagged when the participation ratio is below this share of the activation width (or below
2 directions, for narrow activations). seeds/003 measured 0.008 and 0.001 of d_model in the mid layers where R²
rose with scale while the patched loss got worse."""

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


def evaluate(
    model: HookedTransformer,
    sae: SAE | Sequence[SAE] | Mapping[str, SAE],
    tokens: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_bos: bool = True,
    exclude_special_tokens: bool = True,
    exclude_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    policy: TokenPolicy | None = None,
    activation_scaler: Any = None,
    mean_activation: Any = None,
    mean_ablation: bool = True,
    scaling_law: ScalingLaw | str | tuple[float, float] | None = DEFAULT_LAW,
    joint: bool = False,
    progress: bool | None = None,
    template_budget_bytes: int | None = None,
    token_groups: Any = None,
    group_names: Sequence[str] | None = None,
) -> Any:
    """Evaluate ``sae`` spliced into ``model`` on ``tokens`` (``[n_sequences, seq_len]`` token ids).

    ``sae`` is one SAE Lens SAE or transcoder (:mod:`pytest_saecheck.dictionaries`), returning an
    :class:`Evaluation`; or a sequence or a mapping ``name → SAE`` (a release), returning an
    :class:`EvaluationSet` in which each SAE's numbers are those of evaluating it alone, from one shared pass.
    Names default to each SAE's hook (``hook_name->hook_name_out`` for a transcoder), with ``#k`` when hooks
    repeat. ``joint=True`` (several SAEs, distinct write hooks) also splices them all at once
    (``EvaluationSet.joint``, ``EvaluationSet.compounding``). ``model`` is a TransformerLens
    ``HookedTransformer`` (:func:`check_model` says what is refused).

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
    ``Evaluation.compute_fraction_by_preset``). ``progress=None`` shows a bar only after two seconds.

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

    Raises :class:`ConfigError`, :class:`ShapeMismatchError`, :class:`HookNotFoundError`,
    :class:`UnsupportedDictionaryError`, :class:`ModelStateError`, :class:`EmptyTokenSetError`,
    :class:`NonFiniteError`, :class:`DegenerateActivationsError` (all :class:`SAECheckError`).
    """
    started = time.perf_counter()
    scaling_law = as_scaling_law(scaling_law)
    single, named = _named(sae)
    if joint and len(named) < 2:
        raise ConfigError(
            "joint=True splices several SAEs at once; give a sequence or mapping of at least two"
        )
    if isinstance(exclude_token_ids, (str, bytes)):
        raise ConfigError(
            f"exclude_token_ids must be a sequence of integer token ids, got the string {exclude_token_ids!r}; "
            "write e.g. exclude_token_ids=[5, 7] (the '5,7' form is for the command line and ini files)"
        )
    if policy is None:
        policy = TokenPolicy(exclude_bos, exclude_special_tokens, tuple(exclude_token_ids), pad_token_id)
    elif (exclude_bos, exclude_special_tokens, tuple(exclude_token_ids), pad_token_id) != (
        True,
        True,
        (),
        None,
    ):
        raise ConfigError(
            "give either policy= or exclude_bos/exclude_special_tokens/exclude_token_ids/pad_token_id, not both"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if template_budget_bytes is not None and (
        isinstance(template_budget_bytes, bool)
        or not isinstance(template_budget_bytes, int)
        or template_budget_bytes < 0
    ):
        raise ConfigError(
            f"template_budget_bytes must be a non-negative integer number of bytes (or None for the default), "
            f"got {template_budget_bytes!r}"
        )
    model_hooks = check_model(model)
    policy = policy.resolved_for(model)
    scalers = _per_member("activation_scaler", activation_scaler, named, single)
    means = _per_member("mean_activation", mean_activation, named, single)
    members = []
    for name, one in named.items():
        with _naming(name, not single):
            members.append(Member(name, one, model, norm.as_normalisation(scalers.get(name))))
    if joint:
        _check_joint(members)
    tokens = _check_tokens(model, tokens, policy)
    groups = resolve_labels(token_groups, group_names, tokens) if token_groups is not None else None
    if token_groups is None and group_names is not None:
        raise ConfigError("group_names names the groups of token_groups=; give token_groups too")
    hook_names = sorted({name for m in members for name in (m.read.hook_name, m.write.hook_name)})
    run = _Pass(
        HookedTransformerCut(model),
        members,
        policy,
        batch_size,
        mean_ablation,
        scaling_law,
        joint,
        template_budget_bytes,
    )
    run.groups = groups
    with (
        torch.inference_mode(),
        _hook_z_reshaping_off(list(named.values())),
        _hook_flags_on(model, hook_names),
    ):
        evaluations, joint_evaluation, compounding = run.run(tokens, means, progress)
    duration = time.perf_counter() - started
    for evaluation in [*evaluations.values(), *([joint_evaluation] if joint_evaluation else [])]:
        evaluation.model_hooks = list(model_hooks)
        if model_hooks:
            evaluation.warnings.insert(0, _hooks_warning(model_hooks))
        evaluation.duration_s = duration
    shown = {
        (message if single else f"SAE {name!r}: {message}"): None
        for name, evaluation in evaluations.items()
        for message in evaluation.warnings
    }
    for message in shown:
        warnings.warn(message, SAECheckWarning, stacklevel=2)
    if single:
        return next(iter(evaluations.values()))
    return EvaluationSet(evaluations, joint_evaluation, compounding)


@contextlib.contextmanager
def _naming(name: str, several: bool) -> Iterator[None]:
    """In a set, an error about one SAE names it: ``SAE 'blocks.3.hook_resid_pre': <the error>`` (same class)."""
    try:
        yield
    except SAECheckError as error:
        prefix = f"SAE {name!r}: "
        if not several or str(error).startswith(prefix):
            raise
        try:
            named = type(error)(prefix + str(error))
        except TypeError:  # an error class built from other arguments: raised as it is
            raise error from None
        raise named from error


def _named(saes: Any) -> tuple[bool, dict[str, Any]]:
    """``(single, name → SAE)``; default names are the hooks, with ``#k`` where they repeat."""
    if isinstance(saes, Mapping):
        if not saes:
            raise ConfigError("the mapping of SAEs is empty")
        for name in saes:
            if not isinstance(name, str) or not name:
                raise ConfigError(
                    f"SAEs are named by non-empty strings (report rows, test ids, EvaluationSet keys); got the "
                    f"{type(name).__name__} {name!r}: name it, e.g. {{'layer-8': sae}}"
                )
        return False, dict(saes)
    if isinstance(saes, (list, tuple)) or type(saes).__name__ == "ModuleList":
        if not len(saes):
            raise ConfigError("the sequence of SAEs is empty")
        from pytest_saecheck.dictionaries import describe

        labels = []
        for sae in saes:
            info = describe(sae)
            labels.append(
                info.hook_name if not info.is_transcoder else f"{info.hook_name}->{info.hook_name_out}"
            )
        counts: dict[str, int] = {}
        names = []
        for label in labels:
            if labels.count(label) > 1:
                names.append(f"{label}#{counts.get(label, 0)}")
                counts[label] = counts.get(label, 0) + 1
            else:
                names.append(label)
        return False, dict(zip(names, saes, strict=True))
    return True, {"": saes}


def _per_member(option: str, value: Any, named: Mapping[str, Any], single: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if single:
        return {"": value}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{option} for a set of SAEs must be a mapping name → value (names: {', '.join(named)})"
        )
    unknown = set(value) - set(named)
    if unknown:
        raise ConfigError(f"{option} names SAEs that are not in the set: {', '.join(sorted(unknown))}")
    return dict(value)


def _check_joint(members: Sequence[Member]) -> None:
    seen: dict[str, str] = {}
    for m in members:
        other = seen.setdefault(m.write.hook_name, m.name)
        if other != m.name:
            raise ConfigError(
                f"SAEs {other!r} and {m.name!r} both write {m.write.hook_name!r}: two dictionaries cannot be "
                "spliced into the same hook at once; evaluate them jointly in separate sets"
            )


def _check_tokens(model: Any, tokens: Any, policy: TokenPolicy) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise ShapeMismatchError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ShapeMismatchError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ShapeMismatchError(
            f"tokens must be 2-D [n_sequences, seq_len], got shape {tuple(tokens.shape)}; "
            "use tokens.unsqueeze(0) for a single sequence"
        )
    n_sequences, seq_len = tokens.shape
    if n_sequences < 1 or seq_len < 2:
        raise ShapeMismatchError(
            f"tokens must hold at least 1 sequence of at least 2 positions, got shape {tuple(tokens.shape)}"
        )
    n_ctx = model.cfg.n_ctx
    if seq_len > n_ctx:
        raise ShapeMismatchError(f"seq_len {seq_len} exceeds the model's context length n_ctx={n_ctx}")
    d_vocab = model.cfg.d_vocab
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= d_vocab:
        raise ShapeMismatchError(f"token ids must lie in [0, {d_vocab}) for this model, got [{low}, {high}]")
    if not policy.prediction_mask(tokens).any():
        raise EmptyTokenSetError(
            f"no prediction is left to evaluate after the token policy {policy.to_dict()} "
            f"on tokens of shape {tuple(tokens.shape)}; use longer sequences or exclude fewer tokens"
        )
    return tokens.to(next(iter(model.parameters()), torch.empty(0)).device)


class _Pass:
    """One streaming pass over the tokens for every member (and the joint splice)."""

    def __init__(
        self,
        cut: HookedTransformerCut,
        members: Sequence[Member],
        policy: TokenPolicy,
        batch_size: int,
        mean_ablation: bool,
        scaling_law: ScalingLaw | None,
        joint: bool,
        template_budget: int | None = None,
    ) -> None:
        self.cut = cut
        self.members = list(members)
        self.policy = policy
        self.batch_size = batch_size
        self.mean_ablation = mean_ablation
        self.scaling_law = scaling_law
        self.joint = joint
        self.template_budget = template_budget
        self.notes: dict[str, list[str]] = {m.name: [] for m in members}
        self.joint_acc: Accumulator | None = None
        self.chunk_rows = chunk_rows_for(int(cut.model.cfg.d_vocab_out), cut.device)
        self.groups: tuple[torch.Tensor, tuple[str, ...]] | None = None  # token-group labels and names

    def _group_labels(self, rows: slice) -> torch.Tensor | None:
        return self.groups[0][rows] if self.groups is not None else None

    def _with_breakdowns(self, evaluation: Evaluation, acc: Accumulator) -> Evaluation:
        """The evaluation with its token groups and its per-sequence, per-position CE sums."""
        evaluation.per_position = acc.position_per_sequence()
        if self.groups is not None:
            evaluation.groups = group_results(acc.group_per_sequence(), self.groups[1])
        return evaluation

    def run(
        self, tokens: torch.Tensor, means: Mapping[str, Any], progress: bool | None
    ) -> tuple[dict[str, Evaluation], Evaluation | None, dict[str, Any] | None]:
        from tqdm.auto import tqdm

        kept_all = self.policy.kept_mask(tokens)
        predicted_all = self.policy.prediction_mask(tokens)
        self._plan(tokens, kept_all, means)
        self._prepass(tokens, kept_all)
        self._zero_templates(tokens, kept_all)

        names = sorted({name for m in self.members for name in m.capture_names(self.cut)})
        bar = tqdm(
            total=int(kept_all.sum()),
            unit="tok",
            unit_scale=True,
            desc="saecheck " + (self.members[0].write.hook_name if len(self.members) == 1 else "release"),
            disable=progress is False,
            delay=0.0 if progress else 2.0,
            leave=False,
        )
        try:
            for start in range(0, tokens.shape[0], self.batch_size):
                rows = slice(start, start + self.batch_size)
                batch, kept, predicted = tokens[rows], kept_all[rows], predicted_all[rows]
                final, captured, order = self.cut.forward_capturing(batch, names)
                # The original's log-softmax, once per batch, in place of its logits.
                original = prepare_original(
                    self.cut.logits(final), batch, in_place=True, chunk_rows=self.chunk_rows
                )
                del final
                for m in self.members:
                    with _naming(m.name, len(self.members) > 1):
                        if start == 0:
                            m.check_firing_order(order)
                        self._member_batch(
                            m, captured, batch, kept, predicted, original, self._group_labels(rows)
                        )
                del captured
                if self.joint:
                    self._joint_batch(batch, kept, predicted, original, self._group_labels(rows))
                del original
                bar.update(int(kept.sum()))
        finally:
            bar.close()

        for m in self.members:
            assert m.acc is not None
            m.templates.clear()
            if m.plan.templated and self.mean_ablation:
                # Mean ablation is scored by CE only, which a template gives for every sequence afterwards: its
                # log-probs live for one member at a time, never through the pass.
                if m.mean is None:
                    m.mean = m.acc.mean_activation().to(self.cut.device_at(m.write))
                final = self._template_final(m, Variant.MEAN, tokens, kept_all)
                log_probs = self._log_probs(final, tokens.shape[1])
                m.acc.add_template_ce(Variant.MEAN.value, log_probs, tokens, predicted_all)
                del log_probs
        evaluations = {m.name: self._finish(m, tokens) for m in self.members}
        if not self.joint:
            return evaluations, None, None
        joint = self._finish_joint(tokens)
        joint.compounding = _compounding(self.members, self.joint_acc)
        return evaluations, joint, joint.compounding

    # --- before the pass --------------------------------------------------------------------------------

    def _plan(self, tokens: torch.Tensor, kept_all: torch.Tensor, means: Mapping[str, Any]) -> None:
        seq_len = tokens.shape[1]
        for m in self.members:
            templated = token_independent(m.write, tokens, kept_all)
            per_batch = [Variant.SAE]
            if not templated:
                per_batch.append(Variant.ZERO)
                if self.mean_ablation:
                    per_batch.append(Variant.MEAN)
            m.plan = AblationPlan(templated, tuple(per_batch))
            if (
                m.given is not None
                and m.given.active
                and m.info.normalize_activations
                not in (
                    norm.EXPECTED_AVERAGE,
                    norm.WHITENING,
                )
            ):
                self.notes[m.name].append(
                    f"an activation scaler ({m.given.source}, factor {m.given.scaling_factor}) was applied although "
                    f"the SAE's config says normalize_activations='{m.info.normalize_activations}'; a released SAE "
                    "has its normalisation folded into its weights and needs none"
                )
            given = means.get(m.name)
            if given is not None:
                mean = torch.as_tensor(given).to(self.cut.device_at(m.write)).double()
                if mean.shape != (m.info.d_out,):
                    raise ShapeMismatchError(
                        f"mean_activation must have shape ({m.info.d_out},), got {tuple(mean.shape)}"
                    )
                m.mean = mean
            d_sae = int(m.sae.cfg.d_sae)
            m.acc = Accumulator(
                seq_len,
                d_sae,
                self.cut.output_device,
                m.sae_device,
                context=m.info.context_size,
                covariance_width=m.info.d_out if m.info.d_out <= PARTICIPATION_RATIO_MAX_WIDTH else None,
                n_groups=self._n_groups,
            )
            if self.joint:
                m.joint_acc = Accumulator(seq_len, d_sae, self.cut.output_device, m.sae_device)
        if self.joint:
            self.joint_acc = Accumulator(
                seq_len, None, self.cut.output_device, self.cut.output_device, n_groups=self._n_groups
            )

    @property
    def _n_groups(self) -> int:
        return len(self.groups[1]) if self.groups is not None else 0

    def _prepass(self, tokens: torch.Tensor, kept_all: torch.Tensor) -> None:
        """One run to the hooks when a member needs E‖x_in‖ (a normalisation estimate) or the mean of x_out."""
        need_norm = [m for m in self.members if norm.needs_estimate(m.info.normalize_activations, m.given)]
        need_mean = [
            m for m in self.members if self.mean_ablation and m.mean is None and not m.plan.templated
        ]
        if not need_norm and not need_mean:
            return
        wanted = {m.name: m for m in [*need_norm, *need_mean]}.values()
        names = sorted({name for m in wanted for name in m.capture_names(self.cut)})
        norm_sums = {m.name: 0.0 for m in need_norm}
        mean_sums: dict[str, torch.Tensor] = {}
        count = 0
        for start in range(0, tokens.shape[0], self.batch_size):
            batch, kept = tokens[start : start + self.batch_size], kept_all[start : start + self.batch_size]
            _, captured, _ = self.cut.forward_capturing(batch, names)
            for m in wanted:
                _, x_in, x_out, _ = m.views(captured, self.cut)
                if m in need_norm:
                    norm_sums[m.name] += float(x_in[kept.to(x_in.device)].double().norm(dim=-1).sum())
                if m in need_mean:
                    total = x_out[kept.to(x_out.device)].double().sum(0)
                    mean_sums[m.name] = mean_sums[m.name] + total if m.name in mean_sums else total
            count += int(kept.sum())
        for m in need_norm:
            m.normalisation = norm.estimated(m.info.d_in, norm_sums[m.name] / count)
            self.notes[m.name].append(
                f"the SAE was trained with normalize_activations='{m.info.normalize_activations}' and no "
                f"activation scaler was given: estimated the factor sqrt(d_in)/E‖x‖ = "
                f"{m.normalisation.scaling_factor:.6g} on the evaluation tokens, as SAE Lens does. Give the "
                "checkpoint's activation_scaler.json (activation_scaler=) to use the training value"
            )
        for m in need_mean:
            m.mean = mean_sums[m.name] / count

    def _zero_templates(self, tokens: torch.Tensor, kept_all: torch.Tensor) -> None:
        """The zero-ablation template of every templated member (its KL needs each batch's original logits).

        Log-probs are held for the whole pass while their total stays within the template budget (default: one
        batch of float32 logits, ``min(batch_size, n_sequences) × seq_len × d_vocab_out × 4`` bytes); beyond
        it a member keeps only its template's final residual and unembeds it again for each batch, so peak
        memory grows with the number of SAEs by their weights, not by a ``[seq_len, vocab]`` tensor each. When
        templates spill, room for the one unembedded again is kept inside the budget. A template the same at
        every position (see :meth:`_template_final`) holds one row: ``d_vocab_out × 4`` bytes.
        """
        n_sequences, seq_len = tokens.shape
        d_vocab = int(self.cut.model.cfg.d_vocab_out)
        budget = self.template_budget
        if budget is None:
            budget = min(self.batch_size, n_sequences) * seq_len * d_vocab * 4
        finals = {
            m.name: self._template_final(m, Variant.ZERO, tokens, kept_all).to(self.cut.output_device)
            for m in self.members
            if m.plan.templated
        }
        sizes = {name: final.shape[1] * d_vocab * 4 for name, final in finals.items()}
        if sum(sizes.values()) > budget:
            budget -= max(sizes.values())  # the one unembedded again, per batch, while a member is scored
        spent = 0
        for m in self.members:
            if m.name not in finals:
                continue
            final, size = finals[m.name], sizes[m.name]
            if spent + size <= budget:
                m.templates[Variant.ZERO] = Template(final, self._log_probs(final, seq_len))
                spent += size
            else:
                m.templates[Variant.ZERO] = Template(final, None)

    def _log_probs(self, final: torch.Tensor, seq_len: int) -> torch.Tensor:
        """``[seq_len, vocab]`` float32 log-probs of a template's final residual ``[1, rows, d_model]``; one row
        (``rows == 1``, a template the same at every position) is expanded over the positions without a copy."""
        log_probs = torch.log_softmax(self.cut.logits(final).float(), dim=-1)[0]
        return log_probs.expand(seq_len, -1) if log_probs.shape[0] == 1 else log_probs

    def _template_final(
        self, m: Member, variant: Variant, tokens: torch.Tensor, kept_all: torch.Tensor
    ) -> torch.Tensor:
        """The final residual of an ablated continuation that is the same for every sequence.

        When every position is replaced, the residual stream at the (residual) write hook is one vector at every
        position, and so is everything computed from it: each block acts position by position except attention,
        which mixes values that are all equal, so whatever its pattern (causal mask, rotary, ALiBi) it returns
        that value. One position then stands for all: ``[1, 1, d_model]``. Otherwise (position 0 kept, e.g. an
        excluded BOS) the continuation differs by position: ``[1, seq_len, d_model]`` from the first sequence.
        """
        if bool(kept_all[:1].all()):
            base = self.cut.zeros_residual(1, m.write)
            kept = kept_all[:1, :1]
        else:
            _, captured, _ = self.cut.forward_capturing(tokens[:1], [m.write.hook_name])
            base, kept = captured[m.write.hook_name], kept_all[:1]
        (value,) = m.variant_values(base, kept, [variant], None)
        (final,) = self.cut.continue_from(m.write, base, [value])
        return final

    # --- the pass ---------------------------------------------------------------------------------------

    def _member_batch(
        self,
        m: Member,
        captured: Mapping[str, torch.Tensor],
        batch: torch.Tensor,
        kept: torch.Tensor,
        predicted: torch.Tensor,
        original: Original,
        groups: torch.Tensor | None = None,
    ) -> None:
        assert m.acc is not None
        base, x_in, x_out, x_out_full = m.views(captured, self.cut)
        m.check_widths(x_in, x_out)
        latents, recon = m.reconstruct(x_in)
        m.acc.add_reconstruction(x_out, recon, latents, kept, x_in, groups)
        values = m.variant_values(x_out, kept, m.plan.per_batch, recon)
        del latents, recon
        finals = self.cut.continue_from(m.write, base, [m.write.write_back(x_out_full, v) for v in values])
        del values
        templates = {
            variant.value: template.log_probs
            if template.log_probs is not None
            else self._log_probs(template.final, batch.shape[1])
            for variant, template in m.templates.items()
        }
        parts = []
        # One variant's logits at a time: with the original's log-probs, at most two [batch, pos, vocab] tensors.
        for index, variant in enumerate(m.plan.per_batch):
            logits = self.cut.logits(finals[index])
            parts.append(
                score_batch(
                    original,
                    {variant.value: logits},
                    templates if index == 0 else {},
                    kl_for=(Variant.SAE.value, Variant.ZERO.value),
                    chunk_rows=self.chunk_rows,
                )
            )
            del logits
        del finals, templates
        m.acc.add_scores(BatchScores.merged(parts), kept, predicted, groups)
        m.acc.end_batch()

    def _joint_batch(
        self,
        batch: torch.Tensor,
        kept: torch.Tensor,
        predicted: torch.Tensor,
        original: Original,
        groups: torch.Tensor | None = None,
    ) -> None:
        """Every member spliced at once; a transcoder reads the (already spliced) model at its read hook."""
        assert self.joint_acc is not None
        read_in: dict[str, torch.Tensor] = {}

        def write_hook(m: Member) -> Any:
            def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
                assert m.joint_acc is not None
                x_out = m.write.select(activation)
                x_in = read_in.pop(m.name) if m.info.is_transcoder else m.read.select(activation)
                latents, recon = m.reconstruct(x_in)
                m.joint_acc.add_reconstruction(x_out, recon, latents, kept, x_in)
                (value,) = m.variant_values(x_out, kept, [Variant.SAE], recon)
                return m.write.write_back(activation, value)

            return hook

        def read_hook(m: Member) -> Any:
            def hook(activation: torch.Tensor, hook: Any) -> None:
                read_in[m.name] = m.read.select(activation)

            return hook

        # Writes first: a transcoder reading a hook that another member writes reads the spliced activation.
        hooks = [(m.write.hook_name, write_hook(m)) for m in self.members]
        hooks += [(m.read.hook_name, read_hook(m)) for m in self.members if m.info.is_transcoder]
        final = self.cut.forward_with_hooks(batch, hooks)
        logits = self.cut.logits(final)
        del final
        scores = score_batch(
            original,
            {Variant.SAE.value: logits},
            {},
            kl_for=(Variant.SAE.value,),
            chunk_rows=self.chunk_rows,
        )
        del logits
        self.joint_acc.add_scores(scores, kept, predicted, groups)
        self.joint_acc.end_batch()
        for m in self.members:
            assert m.joint_acc is not None
            m.joint_acc.end_batch()

    # --- after the pass ---------------------------------------------------------------------------------

    def _finish(self, m: Member, tokens: torch.Tensor) -> Evaluation:
        assert m.acc is not None
        per_sequence = m.acc.per_sequence()
        sums = totals(per_sequence)
        variance = total_variance(sums)
        scale = float(sums["sum_sq_centered"]) / max(float(sums["n_rec"]), 1.0)
        if not variance > 1e-12 * max(scale, 1e-30):
            raise DegenerateActivationsError(
                f"the activations at {m.write.hook_name!r} have zero variance over the {int(sums['n_rec'])} "
                "evaluated positions, so explained variance is undefined; evaluate more varied tokens"
            )
        metrics, undefined = self._defined(metrics_from_sums(sums, self.scaling_law), METRIC_NAMES)
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
        for name, reason in _context_reasons(m, tokens.shape[1]).items():
            metrics.pop(name, None)
            undefined[name] = reason
        evaluation = Evaluation(
            **self._common(tokens, metrics, undefined, per_sequence, m.acc.position_curves()),
            n_tokens=int(sums["n_rec"]),
            hook_name=m.read.hook_name,
            hook_head_index=m.read.head_index,
            latent_density=density.tolist(),
            hook_name_out=m.write.hook_name,
            dictionary=m.info.to_dict(),
            normalisation=m.normalisation.to_dict(),
        )
        evaluation.warnings.extend(self.notes[m.name])
        evaluation.warnings.extend(_preflight(m, evaluation))
        _note_compute_fraction(evaluation)
        return self._with_breakdowns(evaluation, m.acc)

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
            "model_dtype": str(self.cut.model.cfg.dtype).replace("torch.", ""),
            "device": str(self.cut.device),
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
                    "not computed (mean ablation disabled)" if "mean" in name else "not computed"
                )
                continue
            value = float(raw[name])
            if math.isfinite(value):
                metrics[name] = value
            else:
                undefined[name] = _why_undefined(name, self.scaling_law)
        return metrics, undefined

    def _finish_joint(self, tokens: torch.Tensor) -> Evaluation:
        assert self.joint_acc is not None
        per_sequence = self.joint_acc.per_sequence()
        metrics, undefined = self._defined(
            metrics_from_sums(totals(per_sequence), self.scaling_law), JOINT_METRICS
        )
        for name in METRIC_NAMES:
            if name not in metrics and name not in undefined:
                undefined[name] = _joint_reason(name)
        members: dict[str, dict[str, float]] = {}
        for m in self.members:
            assert m.joint_acc is not None
            sums = totals({**per_sequence, **m.joint_acc.per_sequence()})
            raw = metrics_from_sums(sums, None)
            values = {
                name: float(raw[name]) for name in RECONSTRUCTION_METRICS if math.isfinite(float(raw[name]))
            }
            values["alive_fraction"] = float(np.mean(m.joint_acc.latent_density() > 0))
            members[m.name] = values
        evaluation = Evaluation(
            **self._common(tokens, metrics, undefined, per_sequence, self.joint_acc.position_curves()),
            n_tokens=int(totals(per_sequence)["n_kl"]),
            hook_name=" + ".join(m.read.hook_name for m in self.members),
            hook_head_index=None,
            latent_density=[],
            hook_name_out=" + ".join(m.write.hook_name for m in self.members),
            dictionary={"kind": "joint", "members": [m.name for m in self.members]},
            normalisation={m.name: m.normalisation.to_dict() for m in self.members},
            members=members,
        )
        _note_compute_fraction(evaluation)
        return self._with_breakdowns(evaluation, self.joint_acc)


def _joint_reason(name: str) -> str:
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


def _compounding(members: Sequence[Member], joint_acc: Accumulator | None) -> dict[str, Any]:
    """Joint ΔCE against the sum of the isolated ΔCEs, with a paired bootstrap interval of the excess."""
    assert joint_acc is not None
    joint = joint_acc.per_sequence()
    per_sequence = {
        "d_joint": joint["ce_sum_sae"] - joint["ce_sum_orig"],
        "d_sum": sum(
            (
                sums["ce_sum_sae"] - sums["ce_sum_orig"]
                for sums in (m.acc.per_sequence() for m in members if m.acc)
            ),
            np.zeros_like(joint["ce_sum_orig"]),
        ),
        "n_ce": joint["n_ce"],
    }
    sums = totals(per_sequence)
    joint_delta = float(sums["d_joint"] / sums["n_ce"])
    isolated = float(sums["d_sum"] / sums["n_ce"])
    out: dict[str, Any] = {
        "delta_ce_joint": joint_delta,
        "delta_ce_isolated_sum": isolated,
        "excess": joint_delta - isolated,
        # A ratio of added losses: read backwards when the isolated splices lowered the loss, so undefined there.
        "ratio": joint_delta / isolated if isolated > 0 else None,
        "excess_interval": None,
    }
    if len(per_sequence["n_ce"]) >= 2:
        (low, high) = bootstrap_intervals(
            per_sequence, lambda s: {"excess": (s["d_joint"] - s["d_sum"]) / s["n_ce"]}, level=DEFAULT_LEVEL
        )["excess"]
        out["excess_interval"] = [low, high]
    return out


def _context_reasons(m: Member, seq_len: int) -> dict[str, str]:
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


def _preflight(m: Member, result: Evaluation) -> list[str]:
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


def check_model(model: Any) -> list[str]:
    """Refuse a model the engine cannot measure; return the hooks already on it (``"name (kind)"``).

    Raises :class:`ModelStateError` for a TransformerLens ``TransformerBridge``, a ``HookedSAETransformer`` with
    SAEs attached, or anything that is not a ``HookedTransformer``.
    """
    kind = type(model).__name__
    if "TransformerBridge" in {cls.__name__ for cls in type(model).__mro__}:
        raise ModelStateError(
            "the model is a TransformerLens TransformerBridge, whose hooks and layer cuts differ from "
            "HookedTransformer's; load it as a HookedTransformer instead: "
            "HookedTransformer.from_pretrained_no_processing(name) (or give the model's name and let "
            "pytest-saecheck load it the way the SAE was trained)"
        )
    if not (hasattr(model, "cfg") and hasattr(model, "hook_dict") and hasattr(model, "blocks")):
        raise ModelStateError(
            f"expected a TransformerLens HookedTransformer, got {kind}; load one with "
            "HookedTransformer.from_pretrained_no_processing(name) or pytest_saecheck.load_model(spec)"
        )
    attached = getattr(model, "acts_to_saes", None)
    if attached:
        raise ModelStateError(
            f"the {kind} has SAEs attached at {', '.join(sorted(attached))}: the engine splices the SAE itself, "
            "so attached SAEs would change the 'original' model. Call model.reset_saes() first"
        )
    found = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            permanent = any(getattr(h, "is_permanent", False) for h in getattr(module, "fwd_hooks", []))
            found.append(f"{name or '(model)'} ({'permanent' if permanent else 'forward'} hook)")
    return found


def _hooks_warning(hooks: list[str]) -> str:
    return (
        f"the model has hooks attached ({', '.join(hooks)}); they run in every variant, original included, "
        "so the numbers measure the hooked model. Remove them (model.reset_hooks(including_permanent=True)) "
        "unless that is what you intend"
    )


@contextlib.contextmanager
def _hook_flags_on(model: Any, hook_names: Sequence[str]) -> Iterator[None]:
    """Switch on the config flags that make ``hook_names`` fire (``use_hook_mlp_in``, ...), then restore them."""
    flags = {flag for name in hook_names for flag in required_flags(name)}
    previous = {flag: getattr(model.cfg, flag, False) for flag in flags}
    try:
        for flag in flags:
            setattr(model.cfg, flag, True)
        yield
    finally:
        for flag, value in previous.items():
            setattr(model.cfg, flag, value)


@contextlib.contextmanager
def _hook_z_reshaping_off(saes: Sequence[Any]) -> Iterator[None]:
    """SAE Lens SAEs on hook_z may reshape [.., heads, d_head] themselves; the engine feeds them flat input."""
    switched = [sae for sae in saes if getattr(sae, "hook_z_reshaping_mode", False)]
    try:
        for sae in switched:
            sae.turn_off_forward_pass_hook_z_reshaping()
        yield
    finally:
        for sae in switched:
            sae.turn_on_forward_pass_hook_z_reshaping()


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


def _note_compute_fraction(evaluation: Evaluation) -> None:
    """Record ``compute_fraction`` under every preset (the sensitivity band that reports show beside a law not
    fitted for this model), and say plainly when the splice lowered the loss (a "fraction" above 1)."""
    law, metrics = evaluation.scaling_law, evaluation.metrics
    if law is None or "ce_orig" not in metrics or "ce_sae" not in metrics:
        return
    evaluation.compute_fraction_by_preset = compute_fraction_by_preset(metrics["ce_orig"], metrics["ce_sae"])
    value = metrics.get("compute_fraction")
    if value is not None and metrics["ce_sae"] < metrics["ce_orig"]:
        evaluation.warnings.append(
            f"compute_fraction = {value:.4g} > 1 because the splice lowered the loss (delta_ce = "
            f"{metrics['ce_sae'] - metrics['ce_orig']:.3g} nats/token): it is not a fraction of the model's "
            "training compute; read delta_ce"
        )


def _why_undefined(name: str, scaling_law: ScalingLaw | None) -> str:
    if name == "compute_fraction" and scaling_law is not None:
        return (
            f"the scaling law's irreducible loss E={scaling_law.irreducible:.3f} ({scaling_law.spec}) is not below "
            "both ce_orig and ce_sae; fit the law for this model family (pytest_saecheck.fit_scaling_law) or "
            "choose another (scaling_law=PRESET, (E, gamma) or a fit file)"
        )
    if name in ("ce_loss_score", "kl_div_score"):
        return "the zero-ablated model is exactly as good as the original (zero denominator)"
    if name == "ce_loss_score_mean_ablation":
        return "the mean-ablated model is exactly as good as the original (zero denominator)"
    return "a denominator is zero on this data"
