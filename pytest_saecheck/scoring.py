"""Next-token cross-entropy and KL divergence from logits, computed in row chunks over the vocabulary.

Softmax, gather and KL over ``[batch, pos, vocab]`` tensors are memory-bound: done on the whole batch, every
step streams hundreds of MB through memory. Done a few rows at a time, the working set stays in cache and no
``[batch, pos, vocab]`` temporary is ever allocated (timings: ``benchmarks/``). Each row is computed exactly as on
the whole tensor.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BatchScores",
    "Original",
    "chunk_rows_for",
    "next_token_targets",
    "prepare_original",
    "score_batch",
    "score_dtype",
    "target_nll",
]

# Bytes of one float32 [rows, vocab] chunk: cache-sized on a CPU; on an accelerator, large enough that kernel
# launches do not dominate and small enough to bound the temporaries.
_CHUNK_BYTES = {"cpu": 4 * 2**20}
_ACCELERATOR_CHUNK_BYTES = 256 * 2**20


@dataclass
class BatchScores:
    """Per-token scores of one batch, float32 (float64 for a float64 model: :func:`score_dtype`).

    ``ce_orig`` and ``ce[name]`` are ``[batch, seq_len - 1]`` (position ``s`` predicts token ``s + 1``);
    ``kl[name]`` is ``[batch, seq_len]``, KL(original ‖ variant) at every position.
    """

    ce_orig: torch.Tensor
    ce: dict[str, torch.Tensor]
    kl: dict[str, torch.Tensor]

    @classmethod
    def merged(cls, parts: Sequence[BatchScores]) -> BatchScores:
        """One batch's scores from calls that each scored some of its variants."""
        if not parts:
            raise ValueError("no scores to merge")
        return cls(
            ce_orig=parts[0].ce_orig,
            ce={name: value for part in parts for name, value in part.ce.items()},
            kl={name: value for part in parts for name, value in part.kl.items()},
        )


@dataclass
class Original:
    """The original model's side of one batch, prepared once and scored against by every variant.

    ``log_probs``: ``[batch, seq_len, vocab]`` log-softmax (in :func:`score_dtype`) of the original logits; ``targets``:
    ``[batch * seq_len, 1]`` next-token ids (a dummy 0 at each sequence's last position, which has none);
    ``ce``: ``[batch, seq_len - 1]`` next-token cross-entropy (nats).
    """

    log_probs: torch.Tensor
    targets: torch.Tensor
    ce: torch.Tensor


def score_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are computed in: float64 for a float64 model (``dtype=float64`` means float64 throughout),
    float32 otherwise (bf16/fp16 logits are upcast; every sum over tokens is float64 either way)."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def next_token_targets(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The token each position predicts, ``[batch, seq_len, 1]`` int64 on ``device``, from ``[batch, seq_len]``
    tokens: position s is scored against token s + 1; the last position has none (a dummy 0, to be cut off)."""
    batch, seq_len = tokens.shape
    targets = torch.zeros((batch, seq_len, 1), dtype=torch.long, device=device)
    targets[:, :-1, 0] = tokens[:, 1:].to(device)
    return targets


def target_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row's target, −log q(target): ``log_probs`` ``[..., vocab]`` (log-softmax of the
    logits; a row may be a stride-0 expansion of one), ``targets`` ``[..., 1]`` int64 → ``[...]`` nats.

    The one next-token CE of the package: the original's (:func:`prepare_original`), each variant's
    (:func:`score_batch`) and a template's (:func:`pytest_saecheck.engine.accumulate.token_ce`)."""
    return log_probs.gather(-1, targets).squeeze(-1).neg()


def chunk_rows_for(d_vocab: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES.get(device.type, _ACCELERATOR_CHUNK_BYTES)
    return max(1, budget // (4 * d_vocab))


def prepare_original(
    logits: torch.Tensor, tokens: torch.Tensor, *, in_place: bool = False, chunk_rows: int | None = None
) -> Original:
    """The original's log-probs and CE from its ``[batch, seq_len, vocab]`` logits and ``[batch, seq_len]``
    tokens, computed once per batch however many variants are scored against them.

    With ``in_place`` and ``logits`` already in :func:`score_dtype`, the log-probs overwrite ``logits`` (no second
    ``[batch, seq_len, vocab]`` tensor); otherwise they are a new tensor and ``logits`` is left as it was.
    """
    batch, seq_len, d_vocab = logits.shape
    n_rows = batch * seq_len
    device = logits.device
    dtype = score_dtype(logits.dtype)
    rows = chunk_rows or chunk_rows_for(d_vocab, device)
    targets = next_token_targets(tokens, device).reshape(
        n_rows, 1
    )  # the last position's dummy is cut off below
    if in_place and logits.dtype == dtype:
        log_probs = logits
    else:
        log_probs = torch.empty((batch, seq_len, d_vocab), dtype=dtype, device=device)
    source, flat = logits.reshape(n_rows, d_vocab), log_probs.view(n_rows, d_vocab)
    ce = torch.empty(n_rows, dtype=dtype, device=device)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        chunk = torch.log_softmax(source[start:stop].to(dtype), dim=-1)
        ce[start:stop] = target_nll(chunk, targets[start:stop])
        flat[start:stop] = chunk
    return Original(log_probs, targets, ce.reshape(batch, seq_len)[:, : seq_len - 1])


def score_batch(
    original: Original,
    variant_logits: Mapping[str, torch.Tensor],
    template_log_probs: Mapping[str, torch.Tensor],
    kl_for: Collection[str],
    chunk_rows: int | None = None,
) -> BatchScores:
    """CE of every variant, and KL(original ‖ variant) for the variants in ``kl_for``, against ``original``.

    ``variant_logits[name]`` has the shape of the original's log-probs (``[batch, seq_len, vocab]``);
    ``template_log_probs[name]`` is ``[seq_len, vocab]`` log-probabilities shared by every sequence (an expanded
    view of one row, stride 0, when they are the same at every position: it is then read as that one row).
    KL is Σ_v p_v (log p_v − log q_v), summed term by term so that a variant equal to the original scores 0.
    """
    batch, seq_len, d_vocab = original.log_probs.shape
    n_rows = batch * seq_len
    device = original.log_probs.device
    rows = chunk_rows or chunk_rows_for(d_vocab, device)
    positions = torch.arange(seq_len, device=device).repeat(batch)
    names = [*variant_logits, *template_log_probs]
    flat = {name: value.reshape(n_rows, d_vocab) for name, value in variant_logits.items()}
    log_p_all = original.log_probs.view(n_rows, d_vocab)

    dtype = original.log_probs.dtype
    ce = {name: torch.empty(n_rows, dtype=dtype, device=device) for name in names}
    kl = {name: torch.empty(n_rows, dtype=dtype, device=device) for name in names if name in kl_for}
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        target = original.targets[start:stop]
        log_p = log_p_all[start:stop]
        p = log_p.exp() if kl else None
        for name in names:
            if name in flat:
                log_q = torch.log_softmax(flat[name][start:stop].to(dtype), dim=-1)
            else:
                log_q = _template_rows(template_log_probs[name], positions[start:stop], dtype)
            ce[name][start:stop] = target_nll(log_q.expand(stop - start, -1), target)
            if name in kl:
                assert p is not None
                kl[name][start:stop] = torch.sub(log_p, log_q).mul_(p).sum(-1)

    def per_token(values: torch.Tensor, length: int) -> torch.Tensor:
        return values.reshape(batch, seq_len)[:, :length]

    return BatchScores(
        ce_orig=original.ce,
        ce={name: per_token(values, seq_len - 1) for name, values in ce.items()},
        kl={name: per_token(values, seq_len) for name, values in kl.items()},
    )


def _template_rows(template: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The template's log-probs at ``positions``: ``[len(positions), vocab]``, or ``[1, vocab]`` to broadcast
    when the template is one row expanded over every position (nothing is copied)."""
    if template.shape[0] == 1 or template.stride(0) == 0:
        return template[:1].to(dtype)
    return template.to(dtype)[positions]
