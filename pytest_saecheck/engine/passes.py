"""The pass: every dictionary of a release spliced into one model, on one set of tokens, in one stream.

Per batch:

1. the original model runs **once** (``ModelCut.capture``), capturing the activation at every dictionary's read
   and write point; its logits are computed once and shared by every dictionary;
2. each dictionary is spliced (:func:`pytest_saecheck.engine.splice.splice`: its written activation reconstructed
   from its read one, inside the activation normalisation it was trained with) and its spliced, zero- and
   mean-ablated continuations start from its own write point, replacing the activation only at the positions the
   token policy keeps; each is unembedded one after another and CE/KL are scored a few rows at a time against
   the original's log-probs, computed once per batch in place of its logits (``pytest_saecheck.scoring``), so at
   most two ``[batch, pos, vocab]`` tensors are alive;
3. with ``joint=True``, one more run splices every dictionary at once, each reading the activation of the model
   with the dictionaries upstream of it already spliced in;
4. per-sequence sums are accumulated in float64 (``engine.accumulate``); every metric is a function of those
   sums (``pytest_saecheck.metrics``, :mod:`pytest_saecheck.engine.finish`), which also gives paired bootstrap
   intervals over sequences.

Where the ablated continuation does not depend on the tokens (a residual write point with at most position 0
excluded), it is computed once for one sequence and reused (``AblationPlan.templated``); with every position
replaced it is the same at every position too, and is computed for one position. The zero-ablation
template's log-probs are held through the pass within a budget (one batch of logits by default; beyond it a
member unembeds its template's final residual again per batch), and the mean-ablation template, scored by CE
only, is scored for every sequence after the pass, one member at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from pytest_saecheck import normalisation as norm
from pytest_saecheck.engine.accumulate import Accumulator
from pytest_saecheck.engine.cut import CapturedRun, ModelCut
from pytest_saecheck.engine.finish import PARTICIPATION_RATIO_MAX_WIDTH, Finish, compounding
from pytest_saecheck.engine.member import (
    AblationPlan,
    Member,
    Template,
    Variant,
    dtype_name,
    token_independent,
)
from pytest_saecheck.engine.plan import naming
from pytest_saecheck.engine.progress import progress_bar
from pytest_saecheck.engine.result import Evaluation
from pytest_saecheck.engine.splice import Observer, joint_splice, prepass, splice, written
from pytest_saecheck.errors import ShapeMismatchError
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.scaling import ScalingLaw
from pytest_saecheck.scoring import (
    BatchScores,
    Original,
    chunk_rows_for,
    prepare_original,
    score_batch,
    score_dtype,
)
from pytest_saecheck.sums import Scored


class Pass:
    """One streaming pass over the tokens for every member (and the joint splice)."""

    def __init__(
        self,
        cut: ModelCut,
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
        self.chunk_rows = chunk_rows_for(cut.d_vocab_out, cut.device)
        self.groups: tuple[torch.Tensor, tuple[str, ...]] | None = None  # token-group labels and names
        self.finish = Finish(
            policy, scaling_law, batch_size, dtype_name(cut.dtype), str(cut.device), cut.backend
        )
        self.done = 0  # sequences run so far
        self._tokens: torch.Tensor | None = None
        self._kept_all: torch.Tensor | None = None
        self._predicted_all: torch.Tensor | None = None
        self._given_means: set[str] = set()

    def _group_labels(self, rows: slice) -> torch.Tensor | None:
        return self.groups[0][rows] if self.groups is not None else None

    def run(
        self, tokens: torch.Tensor, means: Mapping[str, Any], progress: bool | None
    ) -> tuple[dict[str, Evaluation], Evaluation | None, dict[str, Any] | None]:
        """The whole pass over ``tokens`` and its evaluations (:meth:`start`, :meth:`advance`, :meth:`results`)."""
        self.start(tokens, means)
        self.advance(tokens.shape[0], progress)
        return self.results()

    @property
    def started(self) -> bool:
        return self._tokens is not None

    def start(self, tokens: torch.Tensor, means: Mapping[str, Any]) -> None:
        """Plan the pass over ``tokens`` (the whole set: a stream's ceiling). Whatever is a property of the whole set
        and needed before the batches run is fixed here, on every sequence of it: the estimated normalisation and
        the mean-ablation vector of a member not ablated by a template (the pre-pass), so that the sums of every
        batch merge into those of the whole set."""
        self._tokens = tokens
        self._kept_all = self.policy.kept_mask(tokens)
        self._predicted_all = self.policy.prediction_mask(tokens)
        self._plan(tokens, self._kept_all, means)
        self._given_means = {m.name for m in self.members if m.mean is not None}
        self._prepass(tokens, self._kept_all)
        self._zero_templates(tokens, self._kept_all)

    def advance(self, stop: int, progress: bool | None) -> None:
        """Run the batches from the sequences already run up to ``stop`` (whole batches; at most the set)."""
        tokens, kept_all, predicted_all = self._tokens, self._kept_all, self._predicted_all
        assert tokens is not None and kept_all is not None and predicted_all is not None
        stop = min(stop, tokens.shape[0])
        if stop <= self.done:
            return
        sites = [site for m in self.members for site in m.capture_sites(self.cut)]
        bar = progress_bar(
            int(kept_all[self.done : stop].sum()),
            "saecheck " + (self.members[0].write.hook_name if len(self.members) == 1 else "release"),
            progress,
        )
        try:
            for start in range(self.done, stop, self.batch_size):
                rows = slice(start, min(start + self.batch_size, stop))
                batch, kept, predicted = tokens[rows], kept_all[rows], predicted_all[rows]
                run = self.cut.capture(batch, sites)
                # The original's log-softmax, once per batch, in place of its logits.
                original = prepare_original(
                    self.cut.logits(run.take_final()), batch, in_place=True, chunk_rows=self.chunk_rows
                )
                for m in self.members:
                    with naming(m.name, len(self.members) > 1):
                        if start == 0:
                            m.check_firing_order(run.order)
                        self._member_batch(m, run, batch, kept, predicted, original, self._group_labels(rows))
                del run
                if self.joint:
                    self._joint_batch(batch, kept, predicted, original, self._group_labels(rows))
                del original
                bar.update(int(kept.sum()))
                self.done = rows.stop
        finally:
            bar.close()

    def results(self) -> tuple[dict[str, Evaluation], Evaluation | None, dict[str, Any] | None]:
        """The evaluations of the sequences run so far (the whole set's once it is all run)."""
        assert self._tokens is not None and self._kept_all is not None and self._predicted_all is not None
        tokens = self._tokens[: self.done]
        kept_all, predicted_all = self._kept_all[: self.done], self._predicted_all[: self.done]
        finished = self.done == self._tokens.shape[0]
        for m in self.members:
            assert m.acc is not None
            if finished:
                m.templates.clear()
            if m.plan.templated and self.mean_ablation:
                # Mean ablation is scored by CE only, which a template gives for every sequence afterwards: its
                # log-probs live for one member at a time, never through the pass. Its vector is the mean over
                # the sequences run so far (the whole set's at the end), unless one was given.
                if m.name not in self._given_means:
                    m.mean = m.acc.mean_activation().to(self.cut.device_at(m.write))
                final = self._template_final(m, Variant.MEAN, tokens, kept_all)
                log_probs = self._log_probs(final, tokens.shape[1])
                m.acc.add_template_ce(Scored.MEAN, log_probs, tokens, predicted_all, self.batch_size)
                del log_probs
        self.finish.groups = self.groups
        evaluations = {m.name: self.finish.member(m, tokens, self.notes[m.name]) for m in self.members}
        if not self.joint:
            return evaluations, None, None
        assert self.joint_acc is not None
        joint = self.finish.joint(self.members, self.joint_acc, tokens)
        joint = replace(joint, compounding=compounding(self.members, self.joint_acc))
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
            if not self.cut.resumes(m.write):
                self.notes[m.name].append(
                    f"the model cannot be continued from a layer at {m.write.hook_name!r} (it lies outside the "
                    "decoder layers): every variant ran the whole forward with the replacement (the same numbers, "
                    "slower)"
                )
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
                n_sequences=tokens.shape[0],
            )
            if self.joint:
                m.joint_acc = Accumulator(
                    seq_len, d_sae, self.cut.output_device, m.sae_device, n_sequences=tokens.shape[0]
                )
        if self.joint:
            self.joint_acc = Accumulator(
                seq_len,
                None,
                self.cut.output_device,
                self.cut.output_device,
                n_groups=self._n_groups,
                n_sequences=tokens.shape[0],
            )

    @property
    def _n_groups(self) -> int:
        return len(self.groups[1]) if self.groups is not None else 0

    def _prepass(self, tokens: torch.Tensor, kept_all: torch.Tensor) -> None:
        """One run to the points when a member needs E‖x_in‖ (a normalisation estimate) or the mean of x_out."""
        need_norm = [m for m in self.members if norm.needs_estimate(m.info.normalize_activations, m.given)]
        need_mean = [
            m for m in self.members if self.mean_ablation and m.mean is None and not m.plan.templated
        ]
        if not need_norm and not need_mean:
            return
        starts = range(0, tokens.shape[0], self.batch_size)
        batches = ((tokens[s : s + self.batch_size], kept_all[s : s + self.batch_size]) for s in starts)
        found = prepass(self.cut, need_norm, need_mean, batches)
        for m in need_norm:
            m.normalisation = norm.estimated(m.info.d_in, found.input_norm[m.name])
            self.notes[m.name].append(
                f"the SAE was trained with normalize_activations='{m.info.normalize_activations}' and no "
                f"activation scaler was given: estimated the factor sqrt(d_in)/E‖x‖ = "
                f"{m.normalisation.scaling_factor:.6g} on the evaluation tokens, as SAE Lens does. Give the "
                "checkpoint's activation_scaler.json (activation_scaler=) to use the training value"
            )
        for m in need_mean:
            m.mean = found.mean[m.name]

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
        d_vocab = self.cut.d_vocab_out
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
        logits = self.cut.logits(final)
        log_probs = torch.log_softmax(logits.to(score_dtype(logits.dtype)), dim=-1)[0]
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
            run = self.cut.capture(tokens[:1, :1], [m.write])
            base = torch.zeros_like(run.captured[m.write.hook_name])
            kept = kept_all[:1, :1]
        else:
            run = self.cut.capture(tokens[:1], [m.write])
            base, kept = run.captured[m.write.hook_name], kept_all[:1]
        (final,) = self.cut.continue_from(run, m.write, base, written(m, None, base, kept, [variant]))
        return final

    # --- the pass ---------------------------------------------------------------------------------------

    def _member_batch(
        self,
        m: Member,
        run: CapturedRun,
        batch: torch.Tensor,
        kept: torch.Tensor,
        predicted: torch.Tensor,
        original: Original,
        groups: torch.Tensor | None = None,
    ) -> None:
        acc = m.acc
        assert acc is not None

        def observe(
            x_in: torch.Tensor, x_out: torch.Tensor, latents: torch.Tensor, recon: torch.Tensor
        ) -> None:
            acc.add_reconstruction(x_out, recon, latents, kept, x_in, groups)

        finals = splice(self.cut, m, run, kept, m.plan.per_batch, observe)
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
        acc.add_scores(BatchScores.merged(parts), kept, predicted, groups)
        acc.end_batch()

    def _joint_batch(
        self,
        batch: torch.Tensor,
        kept: torch.Tensor,
        predicted: torch.Tensor,
        original: Original,
        groups: torch.Tensor | None = None,
    ) -> None:
        """Every member spliced at once; a transcoder reads the (already spliced) model at its read point."""
        assert self.joint_acc is not None

        def observer(acc: Accumulator) -> Observer:
            def observe(
                x_in: torch.Tensor, x_out: torch.Tensor, latents: torch.Tensor, recon: torch.Tensor
            ) -> None:
                acc.add_reconstruction(x_out, recon, latents, kept, x_in)

            return observe

        observers = {m.name: observer(m.joint_acc) for m in self.members if m.joint_acc is not None}
        final = joint_splice(self.cut, self.members, batch, kept, observers)
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
