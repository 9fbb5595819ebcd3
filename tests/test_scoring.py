"""Chunked CE / KL scoring against a direct whole-tensor float64 computation."""

from __future__ import annotations

import pytest
import torch

from pytest_saecheck.scoring import BatchScores, chunk_rows_for, prepare_original, score_batch

BATCH, SEQ, VOCAB = 3, 7, 53


def direct(logits_orig, tokens, logits_other):
    """CE of both and KL(orig || other), whole tensors, float64; no chunking."""
    log_p = torch.log_softmax(logits_orig.double(), -1)
    log_q = torch.log_softmax(logits_other.double(), -1)
    target = tokens[:, 1:, None]
    ce_p = -log_p[:, :-1].gather(-1, target).squeeze(-1)
    ce_q = -log_q[:, :-1].gather(-1, target).squeeze(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return ce_p, ce_q, kl


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(BATCH, SEQ, VOCAB, generator=generator)
    other = logits + torch.randn(BATCH, SEQ, VOCAB, generator=generator)
    template = 2 * torch.randn(SEQ, VOCAB, generator=generator)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return logits, other, template, tokens


# 1 row at a time, a size that does not divide batch x seq (21), exactly it, and more than it.
@pytest.mark.parametrize("chunk_rows", [1, 4, 21, 1000])
def test_chunked_scores_equal_direct_computation(data, chunk_rows):
    logits, other, template, tokens = data
    scores = score_batch(
        prepare_original(logits, tokens),
        {"sae": other},
        {"zero": torch.log_softmax(template, -1)},
        kl_for=("sae", "zero"),
        chunk_rows=chunk_rows,
    )
    ce_p, ce_q, kl = direct(logits, tokens, other)
    _, ce_z, kl_z = direct(logits, tokens, template.expand(BATCH, -1, -1))
    assert scores.ce_orig.shape == (BATCH, SEQ - 1) and scores.kl["sae"].shape == (BATCH, SEQ)
    torch.testing.assert_close(scores.ce_orig.double(), ce_p, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.ce["sae"].double(), ce_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.kl["sae"].double(), kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.ce["zero"].double(), ce_z, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.kl["zero"].double(), kl_z, atol=1e-5, rtol=0)


def test_kl_only_where_asked_and_identical_variant_has_zero_kl(data):
    logits, _, template, tokens = data
    scores = score_batch(
        prepare_original(logits, tokens),
        {"sae": logits.clone()},
        {"mean": template},
        kl_for=("sae",),
        chunk_rows=5,
    )
    assert set(scores.kl) == {"sae"} and set(scores.ce) == {"sae", "mean"}
    torch.testing.assert_close(scores.kl["sae"], torch.zeros(BATCH, SEQ), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores.ce["sae"], scores.ce_orig, atol=0, rtol=0)


def test_chunk_size_does_not_change_the_scores(data):
    logits, other, _, tokens = data
    whole = score_batch(
        prepare_original(logits, tokens, chunk_rows=BATCH * SEQ),
        {"sae": other},
        {},
        kl_for=("sae",),
        chunk_rows=BATCH * SEQ,
    )
    rows = score_batch(
        prepare_original(logits, tokens, chunk_rows=1), {"sae": other}, {}, kl_for=("sae",), chunk_rows=1
    )
    assert torch.equal(whole.ce_orig, rows.ce_orig)
    assert torch.equal(whole.ce["sae"], rows.ce["sae"])
    torch.testing.assert_close(whole.kl["sae"], rows.kl["sae"], atol=1e-6, rtol=0)


def test_low_precision_logits_are_scored_in_float32(data):
    logits, other, _, tokens = data
    scores = score_batch(
        prepare_original(logits.bfloat16(), tokens),
        {"sae": other.bfloat16()},
        {},
        kl_for=("sae",),
        chunk_rows=4,
    )
    ce_p, ce_q, kl = direct(logits.bfloat16().float(), tokens, other.bfloat16().float())
    assert scores.ce_orig.dtype == torch.float32
    torch.testing.assert_close(scores.ce_orig.double(), ce_p, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.ce["sae"].double(), ce_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.kl["sae"].double(), kl, atol=1e-5, rtol=0)


def test_chunk_rows_fit_the_budget():
    cpu = torch.device("cpu")
    assert chunk_rows_for(50257, cpu) * 50257 * 4 <= 4 * 2**20
    assert chunk_rows_for(50257, cpu) >= 16
    assert chunk_rows_for(10**9, cpu) == 1  # a huge vocabulary still makes progress
    assert chunk_rows_for(50257, torch.device("meta")) > chunk_rows_for(50257, cpu)


def test_scores_of_variants_scored_separately_merge_into_one(data):
    logits, other, template, tokens = data
    together = score_batch(
        prepare_original(logits, tokens),
        {"sae": other},
        {"zero": template},
        kl_for=("sae", "zero"),
        chunk_rows=4,
    )
    parts = [
        score_batch(
            prepare_original(logits, tokens), {"sae": other}, {}, kl_for=("sae", "zero"), chunk_rows=4
        ),
        score_batch(
            prepare_original(logits, tokens), {}, {"zero": template}, kl_for=("sae", "zero"), chunk_rows=4
        ),
    ]
    merged = BatchScores.merged(parts)
    assert merged.ce.keys() == together.ce.keys() and merged.kl.keys() == together.kl.keys()
    for name in together.ce:
        assert torch.equal(merged.ce[name], together.ce[name])
        assert torch.equal(merged.kl[name], together.kl[name])
    assert torch.equal(merged.ce_orig, together.ce_orig)
    with pytest.raises(ValueError, match="no scores"):
        BatchScores.merged([])


def test_the_original_is_prepared_once_in_place_only_when_asked(data):
    logits, _, _, tokens = data
    kept = logits.clone()
    copied = prepare_original(logits, tokens, chunk_rows=4)
    assert torch.equal(logits, kept)  # not in place: the caller's logits are untouched
    torch.testing.assert_close(copied.log_probs, torch.log_softmax(kept, -1), atol=1e-6, rtol=0)
    ce_p, _, _ = direct(kept, tokens, kept)
    torch.testing.assert_close(copied.ce.double(), ce_p, atol=1e-5, rtol=0)
    overwritten = prepare_original(logits, tokens, in_place=True, chunk_rows=4)
    assert overwritten.log_probs.data_ptr() == logits.data_ptr()  # no second [batch, pos, vocab] tensor
    assert torch.equal(overwritten.log_probs, copied.log_probs)
    assert torch.equal(overwritten.ce, copied.ce)
    low = kept.bfloat16()
    from_low = prepare_original(low, tokens, in_place=True)  # not float32: a float32 copy, the input kept
    assert from_low.log_probs.dtype == torch.float32 and low.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_a_template_of_one_row_scores_as_that_row_at_every_position(data, chunk_rows):
    """A template the same at every position is one row expanded (stride 0): read as that row, it scores
    exactly as the same row written out at every position."""
    logits, _, template, tokens = data
    row = torch.log_softmax(template[:1], -1)
    expanded = row.expand(SEQ, -1)
    assert expanded.stride(0) == 0
    written_out = expanded.clone()
    one = score_batch(
        prepare_original(logits, tokens), {}, {"zero": expanded}, kl_for=("zero",), chunk_rows=chunk_rows
    )
    full = score_batch(
        prepare_original(logits, tokens), {}, {"zero": written_out}, kl_for=("zero",), chunk_rows=chunk_rows
    )
    assert torch.equal(one.ce["zero"], full.ce["zero"])
    torch.testing.assert_close(one.kl["zero"], full.kl["zero"], atol=1e-6, rtol=0)
    _, ce_z, kl_z = direct(logits, tokens, template[:1].expand(BATCH, SEQ, -1))
    torch.testing.assert_close(one.ce["zero"].double(), ce_z, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.kl["zero"].double(), kl_z, atol=1e-5, rtol=0)


def test_one_next_token_ce_for_the_original_the_variants_and_a_template(data):
    """The original's, a variant's and a template's CE all come from ``target_nll``; each equals PyTorch's
    float64 cross-entropy (an independent formula: log-sum-exp minus the target logit)."""
    from pytest_saecheck.engine.accumulate import token_ce
    from pytest_saecheck.scoring import next_token_targets, target_nll

    logits, other, template, tokens = data
    reference = {
        name: torch.nn.functional.cross_entropy(
            values.double()[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none"
        ).reshape(BATCH, SEQ - 1)
        for name, values in (("orig", logits), ("other", other))
    }
    original = prepare_original(logits.double(), tokens)
    scores = score_batch(original, {"other": other.double()}, {}, kl_for=())
    assert torch.allclose(original.ce, reference["orig"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(scores.ce["other"], reference["other"], rtol=1e-12, atol=1e-12)
    # the template's CE (accumulate.token_ce) is bit-identical to scoring its rows as a variant
    template_log_probs = torch.log_softmax(template.double(), -1)
    as_variant = score_batch(original, {}, {"template": template_log_probs}, kl_for=())
    expanded = template_log_probs.unsqueeze(0).expand(BATCH, -1, -1)
    assert torch.equal(token_ce(expanded, tokens), as_variant.ce["template"])
    # the targets: position s predicts token s + 1; the last position's is a dummy 0
    targets = next_token_targets(tokens, tokens.device)
    assert targets.shape == (BATCH, SEQ, 1) and targets.dtype == torch.long
    assert torch.equal(targets[:, :-1, 0], tokens[:, 1:]) and not targets[:, -1].any()
    log_probs = torch.log_softmax(logits.double(), -1)
    assert torch.equal(
        target_nll(log_probs, targets)[:, :-1], -log_probs[:, :-1].gather(-1, targets[:, :-1]).squeeze(-1)
    )
