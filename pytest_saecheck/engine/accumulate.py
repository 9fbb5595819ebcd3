"""Additive float64 sums per sequence, per position and per latent: the accumulator only sums.

Every metric is a function of these sums (``pytest_saecheck.metrics``), so the point estimate (sums over all
sequences) and every bootstrap replicate (sums over resampled sequences) come from the same formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from pytest_saecheck.engine.grouping import GROUP_PREFIX, sums_by_group_positions, sums_by_group_rows
from pytest_saecheck.metrics import nonzero_count, reconstruction_terms
from pytest_saecheck.scoring import BatchScores, next_token_targets, target_nll
from pytest_saecheck.sums import Part, Quantity, Scored, Sum, under_prefix, with_prefix


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` holds, else 0, in float64.

    ``where``, not a product: an excluded position's inf (e.g. after padding) must not become 0 x inf = NaN.
    """
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).double()


class Accumulator:
    """Sums for one dictionary: reconstruction terms, CE/KL per variant, per-position curves, latent firing."""

    def __init__(
        self,
        seq_len: int,
        d_sae: int | None,
        device: torch.device,
        sae_device: torch.device,
        *,
        context: int | None = None,
        covariance_width: int | None = None,
        n_groups: int = 0,
        n_sequences: int | None = None,
    ) -> None:
        """``context``: the SAE's training context size (sums split at it); ``covariance_width``: accumulate the
        d×d second moment of the written activation (for the participation ratio) when given; ``n_groups``: also
        sum per token group (``engine.grouping``) when the batch's labels are given; ``n_sequences``: how many
        sequences the pass holds (the per-sequence sums are allocated once; they grow by doubling without it)."""
        self.n_groups = n_groups
        self.context_given = context is not None
        self.context = context if context is not None and 0 < context < seq_len else None
        self.second_moment = (
            torch.zeros((covariance_width, covariance_width), dtype=torch.float64, device=sae_device)
            if covariance_width
            else None
        )
        self.rows = SequenceSums(n_sequences)
        self.current: dict[
            str, torch.Tensor
        ] = {}  # Sum keys, and Sum keys under GROUP_PREFIX/POSITION_PREFIX
        self._centered_sum: torch.Tensor | None = None  # Σ (x − reference) over every kept position, float64
        self._n_rec = 0.0
        self.firing = torch.zeros(d_sae, dtype=torch.float64, device=sae_device) if d_sae else None
        # CE exists for positions 0..S-2 (the prediction of the next token), KL for every position.
        lengths = {
            Sum.CE_ORIG: seq_len - 1,
            Sum.CE_SAE: seq_len - 1,
            Sum.N_CE: seq_len - 1,
            Sum.KL_SAE: seq_len,
            Sum.N_KL: seq_len,
        }
        self.position = {
            key: torch.zeros(length, dtype=torch.float64, device=device) for key, length in lengths.items()
        }
        self.reference: torch.Tensor | None = None
        self._input_norm_sum = 0.0
        self._input_count = 0

    @property
    def input_norm(self) -> float | None:
        """Mean ‖x_in‖ over the kept positions (the read activation, before any normalisation)."""
        return self._input_norm_sum / self._input_count if self._input_count else None

    def add_reconstruction(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        latents: torch.Tensor,
        kept: torch.Tensor,
        x_in: torch.Tensor,
        groups: torch.Tensor | None = None,
    ) -> None:
        """``x``: the written activation (the target), ``recon`` its reconstruction, ``x_in`` the read one;
        ``groups``: the batch's token-group labels ``[batch, seq_len]`` (with ``n_groups``)."""
        self._input_norm_sum += float(x_in[kept.to(x_in.device)].double().norm(dim=-1).sum())
        self._input_count += int(kept.sum())
        kept_r = kept.to(recon.device)
        seq_index = torch.arange(kept.shape[0], device=recon.device).unsqueeze(1).expand_as(kept_r)[kept_r]
        if bool(kept_r.all()):
            # Nothing excluded: flatten instead of boolean indexing, which would copy the [tokens, d_sae] latents.
            xs = x.to(recon.device).reshape(-1, x.shape[-1]).double()
            xh = recon.reshape(-1, recon.shape[-1]).double()
            z = latents.reshape(-1, latents.shape[-1])
        else:
            xs = x.to(recon.device)[kept_r].double()
            xh = recon[kept_r].double()
            z = latents[kept_r]
        if self.reference is None:
            # Sums are centred on the first batch's mean so Σ‖x − x̄‖² does not cancel catastrophically.
            self.reference = xs.mean(0)
        n_batch = kept.shape[0]
        group_ids = groups.to(recon.device)[kept_r] if groups is not None and self.n_groups else None
        for key, values in reconstruction_terms(xs, xh, z, self.reference).items():
            shape = (n_batch, *values.shape[1:])
            self.current[key] = torch.zeros(shape, dtype=torch.float64, device=values.device).index_add_(
                0, seq_index, values.double()
            )
            if group_ids is not None:
                self.current[GROUP_PREFIX + key] = sums_by_group_rows(
                    values, seq_index, group_ids, n_batch, self.n_groups
                )
        if self.firing is not None:
            self.firing += firing_counts(z).double()
        if self.second_moment is not None:
            centered = xs - self.reference
            self.second_moment += centered.T @ centered

    def add_scores(
        self,
        scores: BatchScores,
        kept: torch.Tensor,
        predicted: torch.Tensor,
        groups: torch.Tensor | None = None,
    ) -> None:
        """``kept``: the positions averaged into KL; ``predicted``: the predictions averaged into CE;
        ``groups``: the batch's token-group labels ``[batch, seq_len]`` (with ``n_groups``)."""
        kept = kept.to(scores.ce_orig.device)
        kept_ce = predicted.to(scores.ce_orig.device)
        ce_orig = masked(scores.ce_orig, kept_ce)
        self.current[Sum.CE_ORIG] = ce_orig.sum(1)
        self.current[Sum.N_CE] = kept_ce.double().sum(1)
        if Scored.SAE in scores.ce:  # per sequence and position, for the per-position curve's interval band
            self.current.update(
                with_prefix(
                    POSITION_PREFIX,
                    {
                        Sum.CE_ORIG: ce_orig,
                        Sum.CE_SAE: masked(scores.ce[Scored.SAE], kept_ce),
                        Sum.N_CE: kept_ce.double(),
                    },
                )
            )
        self.current[Sum.N_KL] = kept.double().sum(1)
        self._add_position(Sum.CE_ORIG, ce_orig.sum(0))
        self._add_position(Sum.N_CE, kept_ce.double().sum(0))
        self._add_position(Sum.N_KL, kept.double().sum(0))
        for name, ce in scores.ce.items():
            ce_kept = masked(ce, kept_ce)
            self.current[Sum.ce(Scored(name))] = ce_kept.sum(1)
            if name == Scored.SAE:
                self._add_position(Sum.CE_SAE, ce_kept.sum(0))
        for name, kl in scores.kl.items():
            kl_kept = masked(kl, kept)
            self.current[Sum.kl(Scored(name))] = kl_kept.sum(1)
            if name == Scored.SAE:
                self._add_position(Sum.KL_SAE, kl_kept.sum(0))
        if groups is not None and self.n_groups and Scored.SAE in scores.ce:
            self._add_group_sums(
                ce_orig,
                masked(scores.ce[Scored.SAE], kept_ce),
                kept_ce,
                masked(scores.kl[Scored.SAE], kept),
                kept,
                groups,
            )
        if self.context_given and Scored.SAE in scores.ce:
            self._add_context_sums(
                ce_orig,
                masked(scores.ce[Scored.SAE], kept_ce),
                kept_ce,
                masked(scores.kl[Scored.SAE], kept),
                kept,
            )

    def _add_context_sums(
        self,
        ce_orig: torch.Tensor,
        ce_sae: torch.Tensor,
        kept_ce: torch.Tensor,
        kl_sae: torch.Tensor,
        kept: torch.Tensor,
    ) -> None:
        """Per-sequence sums over positions t < C ("within") and t ≥ C ("beyond") the training context C."""
        split = self.context if self.context is not None else kept.shape[1]
        for part, columns in ((Part.WITHIN, slice(0, split)), (Part.BEYOND, slice(split, None))):
            self.current[Sum.ce(Scored.ORIG, part)] = ce_orig[:, columns].sum(1)
            self.current[Sum.ce(Scored.SAE, part)] = ce_sae[:, columns].sum(1)
            self.current[Sum.of(Quantity.N_CE, part=part)] = kept_ce[:, columns].double().sum(1)
            self.current[Sum.kl(Scored.SAE, part)] = kl_sae[:, columns].sum(1)
            self.current[Sum.of(Quantity.N_KL, part=part)] = kept[:, columns].double().sum(1)

    def _add_group_sums(
        self,
        ce_orig: torch.Tensor,
        ce_sae: torch.Tensor,
        kept_ce: torch.Tensor,
        kl_sae: torch.Tensor,
        kept: torch.Tensor,
        groups: torch.Tensor,
    ) -> None:
        """Per-sequence CE/KL sums by token group; the prediction made at position t counts for t's group."""
        labels = groups.to(ce_orig.device)
        labels_ce = labels[:, : ce_orig.shape[1]]
        n = self.n_groups
        by_group = {
            Sum.CE_ORIG: sums_by_group_positions(ce_orig, labels_ce, n),
            Sum.CE_SAE: sums_by_group_positions(ce_sae, labels_ce, n),
            Sum.N_CE: sums_by_group_positions(kept_ce.double(), labels_ce, n),
            Sum.KL_SAE: sums_by_group_positions(kl_sae, labels, n),
            Sum.N_KL: sums_by_group_positions(kept.double(), labels, n),
        }
        self.current.update(with_prefix(GROUP_PREFIX, by_group))

    def _add_position(self, key: Sum, values: torch.Tensor) -> None:
        # the logits live on the unembedding's device, which differs from the first block's with n_devices > 1
        self.position[key] += values.to(self.position[key].device)

    def end_batch(self) -> None:
        if Sum.SUM_X_CENTERED in self.current:
            total = self.current[Sum.SUM_X_CENTERED].sum(0)
            self._centered_sum = total if self._centered_sum is None else self._centered_sum + total
            self._n_rec += float(self.current[Sum.N_REC].sum())
        self.rows.append({key: value.detach().to("cpu").numpy() for key, value in self.current.items()})
        self.current = {}

    def mean_activation(self) -> torch.Tensor:
        """The mean written activation over every kept position so far (float64, on the CPU)."""
        assert self.reference is not None and self._centered_sum is not None
        return (self.reference + self._centered_sum / self._n_rec).to("cpu")

    def add_template_ce(
        self,
        scored: Scored,
        template: torch.Tensor,
        tokens: torch.Tensor,
        predicted_all: torch.Tensor,
        batch_size: int,
    ) -> None:
        """CE sums of a token-independent continuation ``template`` ``[seq_len, vocab]`` log-probs, afterwards,
        ``batch_size`` sequences at a time."""
        values = np.empty(len(self.rows), dtype=np.float64)
        for row in range(0, len(self.rows), batch_size):
            batch, predicted = tokens[row : row + batch_size], predicted_all[row : row + batch_size]
            ce = token_ce(template.unsqueeze(0).expand(batch.shape[0], -1, -1), batch)
            values[row : row + batch.shape[0]] = masked(ce, predicted.to(ce.device)).sum(1).cpu().numpy()
        self.rows.set(Sum.ce(scored), values)

    def per_sequence(self) -> dict[str, np.ndarray]:
        """The per-sequence sums ``name → [n_sequences, ...]`` float64 (views, not copies)."""
        return self.rows.arrays(lambda key: not key.startswith((GROUP_PREFIX, POSITION_PREFIX)))

    def position_per_sequence(self) -> dict[str, np.ndarray]:
        """Per-sequence CE sums at each position ``[n_sequences, seq_len - 1]`` (keys without the prefix)."""
        found = under_prefix(POSITION_PREFIX, self.rows.arrays(lambda key: key.startswith(POSITION_PREFIX)))
        return {Sum(key): value for key, value in found.items()}

    def group_per_sequence(self) -> dict[str, np.ndarray]:
        """The per-sequence, per-group sums ``[n_sequences, n_groups, ...]`` (keys with ``GROUP_PREFIX``)."""
        return self.rows.arrays(lambda key: key.startswith(GROUP_PREFIX))

    def participation_ratios(self) -> tuple[float, float] | None:
        """Raw and deflated participation ratios of the written activation's centred covariance, or None."""
        if self.second_moment is None or self.reference is None or self._centered_sum is None:
            return None
        from pytest_saecheck.metrics import participation_ratios

        mean_offset = (self._centered_sum / self._n_rec).to(self.second_moment.device)
        covariance = self.second_moment / self._n_rec - torch.outer(mean_offset, mean_offset)
        return participation_ratios(covariance.cpu().numpy())

    def latent_density(self) -> np.ndarray:
        assert self.firing is not None
        return (self.firing / self._n_rec).to("cpu").numpy()

    def position_curves(self) -> tuple[list[float | None], list[float | None]]:
        pos = {key: value.to("cpu").numpy() for key, value in self.position.items()}
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = (pos[Sum.CE_SAE] - pos[Sum.CE_ORIG]) / pos[Sum.N_CE]
            kl = pos[Sum.KL_SAE] / pos[Sum.N_KL]
        # Positions with no evaluated token (the excluded BOS, the last position for CE) have no value: None.
        return finite_list(delta), finite_list(kl)


class SequenceSums:
    """Per-sequence float64 sums, one row per sequence, in one array per name (allocated once when the number
    of sequences is known, else grown by doubling).

    This is the only state of an evaluation that grows with the tokens: per sequence, 8 bytes for each scalar
    sum (about 30), for each of the ``d_out`` entries of ``sum_x_centered`` (the bootstrap of explained variance
    needs each sequence's sum of ``x − x̄``) and for each of the ``3 (seq_len − 1)`` per-position CE sums (the
    per-position curve's interval band): :func:`per_sequence_bytes`.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.count = 0
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    def append(self, batch: Mapping[str, np.ndarray]) -> None:
        n = next(iter(batch.values())).shape[0] if batch else 0
        if self.count + n > self._allocated:
            self._grow(self.count + n)
        for key, value in batch.items():
            if key not in self._arrays:
                self._arrays[key] = np.zeros((self._allocated, *value.shape[1:]), dtype=np.float64)
            self._arrays[key][self.count : self.count + n] = value
        self.count += n

    def set(self, key: str, values: np.ndarray) -> None:
        """Add (or replace) the whole column ``key`` ``[count, ...]``."""
        column = np.zeros((self._allocated, *values.shape[1:]), dtype=np.float64)
        column[: self.count] = values
        self._arrays[key] = column

    def arrays(self, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
        return {key: value[: self.count] for key, value in self._arrays.items() if keep(key)}

    @property
    def _allocated(self) -> int:
        return len(next(iter(self._arrays.values()))) if self._arrays else (self.capacity or 0)

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self._allocated, self.capacity or 0)
        for key, value in self._arrays.items():
            grown = np.zeros((size, *value.shape[1:]), dtype=np.float64)
            grown[: self.count] = value[: self.count]
            self._arrays[key] = grown
        if not self._arrays:
            self.capacity = size


def per_sequence_bytes(d_out: int, seq_len: int, n_groups: int = 0) -> int:
    """Bytes an evaluation keeps per sequence and per dictionary (:class:`SequenceSums`): ``8 × (32 + d_out +
    3 (seq_len − 1))``, plus ``8 × n_groups × (16 + d_out)`` with token groups. The number of scalar sums (32)
    is an upper bound of :func:`pytest_saecheck.metrics.reconstruction_terms`' scalars, the CE/KL sums and the
    within/beyond-context sums."""
    return 8 * (32 + d_out + 3 * (seq_len - 1)) + 8 * n_groups * (16 + d_out)


POSITION_PREFIX = "position/"
"""Accumulator keys of per-sequence, per-position CE sums (the per-position curve's bootstrap band)."""


def position_intervals(per_position: Mapping[str, np.ndarray], level: float) -> list[list[float] | None]:
    """The paired bootstrap interval of ΔCE at each position (None where undefined or with < 2 sequences)."""
    from pytest_saecheck.stats import bootstrap_intervals

    if not per_position or len(per_position[Sum.N_CE]) < 2:
        return []
    n_positions = per_position[Sum.N_CE].shape[1]

    def statistics(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = (sums[Sum.CE_SAE] - sums[Sum.CE_ORIG]) / sums[Sum.N_CE]
        return {str(t): delta[..., t] for t in range(n_positions)}

    found = bootstrap_intervals(per_position, statistics, level=level)
    out: list[list[float] | None] = []
    for t in range(n_positions):
        low, high = found[str(t)]
        out.append([low, high] if math.isfinite(low) and math.isfinite(high) else None)
    return out


def firing_counts(latents: torch.Tensor) -> torch.Tensor:
    """How many of the ``[tokens, d_sae]`` latents' rows each latent is nonzero in: ``[d_sae]`` int64.

    A sparse code (the usual SAE: a few dozen of thousands active) is counted from its nonzero entries' latent
    indices, less work than summing a ``[tokens, d_sae]`` boolean over tokens; a dense one (more
    than 1 in 16 active, where the index tensors would outgrow the latents) by that sum.
    """
    d_sae = latents.shape[-1]
    if latents.device.type != "cpu":
        # On an accelerator the boolean sum is cheap and, unlike nonzero() and item(), needs no synchronisation.
        return (latents != 0).sum(0)
    active = int(nonzero_count(latents).item())
    if active * 16 <= latents.numel():
        return torch.bincount(latents.nonzero(as_tuple=True)[-1], minlength=d_sae)
    return (latents != 0).sum(0)


def finite_list(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def token_ce(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy ``[batch, seq_len - 1]`` at positions 0..S-2 from ``[batch, seq_len, vocab]``
    log-probs and ``[batch, seq_len]`` tokens (:func:`pytest_saecheck.scoring.target_nll`)."""
    targets = next_token_targets(tokens, log_probs.device)[:, :-1]
    return target_nll(log_probs[:, :-1], targets)


def totals(per_sequence: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: value.sum(axis=0) for key, value in per_sequence.items()}
