"""Streaming: the peak memory of an evaluation does not grow with the number of tokens.

Most tests count the bytes of live tensor storages created during the evaluation, exactly, with a dispatch mode
that sees every op; the last one measures the process's peak resident memory in fresh subprocesses, which also
sees numpy arrays, Python objects and the allocator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from live_bytes import LiveTensorBytes
from sae_lens import StandardSAE, StandardSAEConfig

from pytest_saecheck import evaluate

MEMORY_SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_scale.py"


def _memory_scale():
    """``benchmarks/memory_scale.py``, which holds the tiny model's shape."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_scale", MEMORY_SCALE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESIDUAL_HOOKS = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post")


def peak_bytes(
    n_sequences: int,
    n_saes: int | None = None,
    hooks: tuple[str, ...] | None = None,
    *,
    same_first_token: bool = False,
    **options: object,
) -> int:
    """Peak live tensor bytes of one evaluation; ``n_saes`` evaluates a set of that many SAEs (one per hook, or
    cycling through ``hooks``); ``same_first_token``: every sequence starts with token 1 (a BOS)."""
    model, sae = _memory_scale().random_model_and_sae(*_memory_scale().RANDOM_SUBJECTS["tiny"])
    subject: object = sae
    if n_saes is not None:
        if hooks is None:
            hooks = (*RESIDUAL_HOOKS, "blocks.0.hook_mlp_out")
            assert n_saes <= len(hooks)
        subject = {}
        for index in range(n_saes):
            cfg_i = StandardSAEConfig(d_in=32, d_sae=128)
            cfg_i.metadata.hook_name = hooks[index % len(hooks)]
            subject[f"{cfg_i.metadata.hook_name}#{index}"] = StandardSAE(cfg_i)
    tokens = torch.randint(0, 2000, (n_sequences, 32), generator=torch.Generator().manual_seed(1))
    if same_first_token:
        tokens[:, 0] = 1
    tracker = LiveTensorBytes()
    with tracker:
        result = evaluate(model, subject, tokens, batch_size=8, progress=False, **options)
    first = result if n_saes is None else next(iter(result.values()))
    assert first.n_tokens == n_sequences * (32 if options.get("exclude_bos") is False else 31)
    return tracker.peak


def test_peak_memory_does_not_grow_with_tokens():
    short, long = peak_bytes(16), peak_bytes(64)
    # One batch of log-probs is 8 x 32 x 2000 x 4 B = 2 MB; holding every sequence's logits would add 6 MB
    # for the 4x longer run. What may grow is the per-sequence sums: O(n_sequences x d_in) float64, 12 KB here.
    assert long - short < 256 * 1024, (short, long)
    assert short > 2 * 8 * 32 * 2000 * 4  # the tracker does see the per-batch logits


# exclude_bos=False: the ablations come from a one-sequence template, so only the spliced run is unembedded per
# batch. exclude_bos=True with varying first tokens: the zero- and mean-ablated runs are unembedded per batch too.
@pytest.mark.parametrize("exclude_bos", [False, True])
def test_scoring_allocates_no_vocabulary_wide_temporaries(
    monkeypatch: pytest.MonkeyPatch, exclude_bos: bool
) -> None:
    import pytest_saecheck.engine.passes as engine_module

    logits = 8 * 32 * 2000 * 4  # one batch of float32 logits
    whole = peak_bytes(16, exclude_bos=exclude_bos)
    monkeypatch.setattr(engine_module, "chunk_rows_for", lambda d_vocab, device: 16)
    chunked = peak_bytes(16, exclude_bos=exclude_bos)
    # The original logits and one variant's must coexist (2 x 2 MB); scoring 16 rows at a time adds 128 KB chunks
    # only, where scoring whole tensors needs log-probs, probabilities and a KL temporary of the batch's size.
    assert chunked < 2 * logits + logits // 2, (chunked, whole)
    assert whole - chunked > logits, (chunked, whole)


def test_a_sets_peak_memory_grows_with_saes_only_by_their_sums_not_with_tokens():
    """A release: flat in the number of tokens; the original logits are shared, so more SAEs add only their
    own per-batch work (one variant's logits at a time), not another copy of every batch's logits."""
    short, long = peak_bytes(16, n_saes=4), peak_bytes(64, n_saes=4)
    assert long - short < 512 * 1024, (short, long)
    one, four = peak_bytes(16, n_saes=1), peak_bytes(16, n_saes=4)
    logits_of_one_batch = 8 * 32 * 2000 * 4
    assert four - one < 2 * logits_of_one_batch, (one, four)


# Residual hooks with a BOS excluded (every sequence starting with the same token): every SAE's zero ablation is
# a token-independent template of [seq_len, vocab] log-probs (32 x 2000 x 4 B = 256 KB here, 25 MB for GPT-2
# at 128 tokens). With every position replaced (exclude_bos=False) it is one row: 8 KB.
TEMPLATE = 32 * 2000 * 4
PER_SAE_SUMS = 64 * 1024
"""Generous bound of what one more SAE may add besides its weights (created outside the tracker here): its
accumulator (a 32 x 32 float64 second moment, per-latent firing counts, per-sequence sums: about 20 KB) and its
template's final residual (32 x 32 x 4 B)."""
PER_POSITION = {"hooks": RESIDUAL_HOOKS, "exclude_bos": True, "same_first_token": True}


def test_templates_beyond_the_budget_are_not_held_through_the_pass():
    """With no template budget, more SAEs add only their sums: 8 more SAEs holding templates would add 2 MB."""
    few = peak_bytes(16, n_saes=4, template_budget_bytes=0, **PER_POSITION)
    many = peak_bytes(16, n_saes=12, template_budget_bytes=0, **PER_POSITION)
    assert many - few < 8 * PER_SAE_SUMS, (few, many)
    assert 8 * TEMPLATE > 2 * 8 * PER_SAE_SUMS  # the bound would catch templates held per SAE


def test_a_sets_peak_memory_is_bounded_by_one_batch_of_logits_beyond_the_sums():
    """The default budget holds templates up to one batch of logits (8 x 32 x 2000 x 4 B = 2 MB: 8 templates, or
    7 and room for one unembedded again once they spill): past it, more SAEs add only their sums; in all, the
    templates never add more than one batch of logits."""
    logits_of_one_batch = 8 * 32 * 2000 * 4
    one = peak_bytes(16, n_saes=1, **PER_POSITION)
    eight = peak_bytes(16, n_saes=8, **PER_POSITION)
    sixteen = peak_bytes(16, n_saes=16, **PER_POSITION)
    assert eight - one >= 7 * TEMPLATE  # within the budget, templates are held (no recomputation)
    assert eight - one < logits_of_one_batch + 7 * PER_SAE_SUMS, (one, eight)
    assert sixteen - one < logits_of_one_batch + 15 * PER_SAE_SUMS, (one, sixteen)


def test_a_template_the_same_at_every_position_is_held_as_one_row():
    """With every position replaced, each SAE's zero-ablation template is one row (8 KB): sixteen SAEs add their
    sums and nothing of the size of a [seq_len, vocab] template each (256 KB)."""
    one = peak_bytes(16, n_saes=1, hooks=RESIDUAL_HOOKS, exclude_bos=False)
    sixteen = peak_bytes(16, n_saes=16, hooks=RESIDUAL_HOOKS, exclude_bos=False)
    assert sixteen - one < 15 * PER_SAE_SUMS, (one, sixteen)
    assert 15 * TEMPLATE > 2 * 15 * PER_SAE_SUMS  # the bound would catch templates of every position


def _process_peak(n_tokens: int) -> dict[str, float]:
    """One evaluation in a fresh process (``benchmarks/memory_scale.py --one tiny``): its peak RSS."""
    done = subprocess.run(
        [sys.executable, str(MEMORY_SCALE), "--one", "tiny", str(n_tokens), "--batch-size", "16"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_process_peak_grows_only_by_the_documented_per_sequence_sums() -> None:
    """The process's peak resident memory (not only live tensors): 16x the tokens adds at most the per-sequence
    sums (``accumulate.per_sequence_bytes``: 1.3 KB per sequence here) and 24 MiB of allocator noise. Before the
    sums were held in one array per name (and the bootstrap's weights bounded), the process grew by about
    1.9 kB per token beyond ~131k tokens: 58 MiB for these 30k more tokens."""
    from pytest_saecheck.engine.accumulate import per_sequence_bytes

    small, large = _process_peak(2048), _process_peak(32768)
    grown_mib = (large["peak_mib"] - large["peak_before_mib"]) - (
        small["peak_mib"] - small["peak_before_mib"]
    )
    allowed = per_sequence_bytes(32, 32) * (large["n_sequences"] - small["n_sequences"]) / 2**20 + 24
    assert grown_mib < allowed, (small, large)
