"""Benchmark: pytest-saecheck's engine against SAE Lens' own evaluation, on the same tokens, in one process.

Usage::

    python benchmarks/bench_engine.py                      # configurations 1, 2, 3 (minutes on 2 CPU cores)
    python benchmarks/bench_engine.py --quick              # smoke run: few tokens, 2 repetitions
    python benchmarks/bench_engine.py --configs 1,3 --n-tokens 4096 --repeats 5 --device cuda
    python benchmarks/bench_engine.py --configs release    # configuration 4: 12 SAEs (30 min on 2 busy cores)
    python benchmarks/bench_engine.py --sequential 256     # sequential gates: 12 SAEs, gates of mixed difficulty
    python benchmarks/bench_engine.py --configs hf,replacement   # configurations 5 and 6

Configuration 5 (``hf``) is configuration 1's model and SAE on the Hugging Face backend (a transformers
``GPT2LMHeadModel``, the SAE at the module path ``transformer.h.5``, its output) against its bound and floor in plain
transformers calls and against SAE Lens' own evaluation on its Hugging Face path: ``run_evals`` with the same
``EvalConfig`` on the same batches, the SAME model object wrapped in ``sae_lens.load_model.HookedProxyLM`` (hook point
at the module path only; its hook is removed after each anchor run, so ours, floor and bound time the bare model). The
metrics both define are compared and MSE, L1, the CEs and ``ce_loss_score`` recomputed in float64 with plain torch
forward hooks; where ``run_evals`` fails on ``HookedProxyLM``, the output names the exception instead of a time.
Configuration 6 (``replacement``)
is a cross-layer transcoder's replacement model (every MLP replaced at once, ``evaluate_replacement``) against the
exact bound (the original pass and one replaced pass in plain ``run_with_hooks``, nothing scored) and a forward
pass; SAE Lens cannot evaluate a CLT, so the bound is its anchor. Its CLT is also streamed under a quarter of its
decoders' bytes, and the weight peak reported.

Four things are timed on identical token batches:

``ours``    ``pytest_saecheck.evaluate(..., exclude_bos=False, exclude_special_tokens=False,
            mean_ablation=False)``: CE (original, spliced,
            zero-ablated), KL, explained variance (both formulas), MSE, cosine, L2 ratio, L0, L1, latent density.
``anchor``  SAE Lens' ``run_evals`` with the equivalent ``EvalConfig`` (KL, CE, L2 norms, sparsity, variance,
            featurewise density), ``exclude_special_tokens=False``, fed the same batches by a minimal stand-in for
            the ActivationsStore. Every position is spliced, ablated and scored by both.
``floor``   one plain forward pass of the model (logits) over the same batches.
``bound``   the least work of any exact evaluation: the original forward pass, one SAE pass and the spliced
            run's blocks after the hook with its unembedding (inside a block, the zero-ablated run's too),
            nothing scored. ``anchor / bound`` is the largest speedup any implementation computing exact CE
            and KL over the full vocabulary can reach.

Configuration 4 (``release``, opt-in) is a release: 12 TopK SAEs on the GPT-2-small-shaped model, one per
layer at ``blocks.L.hook_resid_pre``. ``ours`` is ONE ``evaluate`` call on the mapping ``name -> SAE`` (one shared
pass); ``anchor`` is ``run_evals`` called once per SAE on the same batches; ``joint`` is the same call with
``joint=True`` (every SAE also spliced at once); ``bound`` is the original forward pass once plus, per SAE, one
SAE pass and its spliced suffix with its unembedding. Forward passes are reported per SAE (time / floor / 12);
the metric difference is the largest over all 12 SAEs. ``--release-saes N`` spreads N SAEs over the layers
instead (``--quick``: 3).

Method: one warm-up batch of each, then ``--repeats`` interleaved repetitions (the order rotates every
repetition); medians and min-max of each; the speedup (anchor / ours) and the forward-pass count (ours / floor)
are taken repetition by repetition, so slow drifts of a shared machine cancel. Peak memory is the peak of live
tensor bytes created during one evaluation, counted exactly by a TorchDispatchMode on CPU (RSS is too noisy on a
shared machine), or ``torch.cuda.max_memory_allocated`` above the baseline on CUDA. The last line of the output
is one JSON object keyed by configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pytest_saecheck.checks.pipeline_adapters import (  # noqa: F401  (TokenStore: re-exported for the tests)
    AS_RUN_EVALS,
    SHARED_METRICS,
    TokenStore,
    run_sae_lens_evals,
    sae_lens_eval_config,
)

DENSITY_ROW = "latent_density (worst latent)"

RELEASE_KEY = "4"
HF_KEY = "5"
REPLACEMENT_KEY = "6"
CONFIG_KEYS = ("1", "2", "3", RELEASE_KEY, HF_KEY, REPLACEMENT_KEY)
CONFIG_ALIASES = {"release": RELEASE_KEY, "hf": HF_KEY, "replacement": REPLACEMENT_KEY}
OWN_MEASURES = (HF_KEY, REPLACEMENT_KEY)
"""Configurations measured by their own function (a model that is not a ``HookedTransformer``, or no SAE Lens
anchor at all: configuration 6's anchor is its bound)."""
HF_HOOK = "transformer.h.5"
"""Configuration 5's point: the output of GPT-2's block 5, the residual stream TransformerLens calls
``blocks.6.hook_resid_pre`` (configuration 1's hook)."""

GPT2_SHAPE = {
    "n_layers": 12,
    "d_model": 768,
    "n_heads": 12,
    "d_head": 64,
    "d_mlp": 3072,
    "d_vocab": 50257,
    "n_ctx": 128,
    "act_fn": "gelu_new",
    "normalization_type": "LN",
}


@dataclass
class Case:
    key: str
    title: str
    model: Any
    sae: Any
    tokens: Any  # [n_sequences, seq_len] token ids, on CPU
    name: str = ""  # short name for the JSON record (default: the key)


@dataclass
class ReleaseCase:
    """Several SAEs on one model and one token set, evaluated together (configuration 4)."""

    key: str
    title: str
    model: Any
    saes: dict[str, Any]  # name -> SAE, in the order of their hooks
    tokens: Any  # [n_sequences, seq_len] token ids, on CPU
    name: str = ""


@dataclass
class Timings:
    """Wall-clock seconds (the measurement) and process CPU seconds (a cross-check on a shared machine)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, wall: float, cpu: float = math.nan) -> None:
        self.seconds.setdefault(name, []).append(wall)
        self.cpu_seconds.setdefault(name, []).append(cpu)


# --- pure helpers (tested in tests/test_benchmarks.py) ------------------------------------------------------


def parse_configs(text: str) -> list[str]:
    """``"1,3"`` -> ``["1", "3"]``; 1 to 5 exist, ``release`` names 4 and ``hf`` names 5."""
    keys = [CONFIG_ALIASES.get(part.strip(), part.strip()) for part in text.split(",") if part.strip()]
    unknown = [key for key in keys if key not in CONFIG_KEYS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            "--configs takes a comma-separated subset of 1,2,3,4,5,6 (4 = release, 5 = hf, 6 = replacement), got "
            f"{text!r}"
        )
    return list(dict.fromkeys(keys))


def release_layers(n_layers: int, n_saes: int) -> list[int]:
    """``n_saes`` distinct layers spread evenly from the first to the last (all of them when equal)."""
    if not 1 <= n_saes <= n_layers:
        raise ValueError(f"a release of {n_saes} SAEs, one per layer, needs 1 to {n_layers} of them")
    if n_saes == 1:
        return [0]
    step = (n_layers - 1) / (n_saes - 1)  # >= 1, so the rounded layers are distinct
    return [math.floor(index * step + 0.5) for index in range(n_saes)]


def n_sequences_for(n_tokens: int, seq_len: int, batch_size: int) -> int:
    """Whole batches of whole sequences, at least one batch (run_evals only takes full batches)."""
    n_batches = max(1, round(n_tokens / (seq_len * batch_size)))
    return n_batches * batch_size


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def pairwise_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    if len(numerators) != len(denominators):
        raise ValueError("ratios are taken repetition by repetition: both lists need the same length")
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def anchor_flat(all_metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {name: float(all_metrics[group][name]) for _, group, name in SHARED_METRICS}


def formula_values(evaluation: Any) -> dict[str, float]:
    """Every metric's formula on the evaluation's totals, the undefined ones included.

    On a random model zero ablation barely changes the loss, so ``ce_loss_score`` divides by noise and the
    engine leaves it undefined; the benchmark still compares the formula's value with SAE Lens'.
    """
    from pytest_saecheck.metrics import metrics_from_sums

    totals = {key: value.sum(axis=0) for key, value in evaluation.per_sequence.items()}
    raw = {name: float(value) for name, value in metrics_from_sums(totals, evaluation.scaling_law).items()}
    return {**raw, **evaluation.metrics}


def compare_metrics(
    ours: dict[str, float],
    anchor: dict[str, float],
    ours_density: Sequence[float],
    anchor_density: Sequence[float],
) -> tuple[list[tuple[str, float, float, float]], float]:
    """Rows (ours name, ours, anchor, |diff|) of every shared metric and the largest |diff| among them."""
    rows = []
    for ours_name, _, anchor_name in SHARED_METRICS:
        a, b = float(ours[ours_name]), float(anchor[anchor_name])
        rows.append((ours_name, a, b, abs(a - b)))
    if len(ours_density) != len(anchor_density) or not len(ours_density):
        raise ValueError("latent density vectors are empty or differ in length")
    density = [
        (abs(float(a) - float(b)), float(a), float(b))
        for a, b in zip(ours_density, anchor_density, strict=True)
    ]
    diff, a, b = max(density)
    rows.append((DENSITY_ROW, a, b, diff))
    worst = max(row[3] for row in rows)
    return rows, worst


def float32_ulps(value: float, reference: float) -> float:
    """|value - reference| in units in the last place of ``reference`` stored as float32 (SAE Lens' dtype)."""
    import numpy as np

    ulp = (
        float(np.spacing(np.float32(abs(reference)))) if reference != 0 else float(np.spacing(np.float32(0)))
    )
    return abs(value - reference) / ulp


def fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def summary_record(
    timings: Timings,
    worst_diff: float,
    peak: dict[str, float | None],
    rows: Sequence[tuple] = (),
    per_sae: int = 1,
) -> dict[str, Any]:
    """The JSON record of one configuration; forward-pass counts are per SAE when ``per_sae`` SAEs share
    the timings (a release)."""
    s = timings.seconds
    speed = pairwise_ratios(s["anchor"], s["ours"])
    passes = [v / per_sae for v in pairwise_ratios(s["ours"], s["floor"])]
    anchor_passes = [v / per_sae for v in pairwise_ratios(s["anchor"], s["floor"])]
    bound_speed = pairwise_ratios(s["anchor"], s["bound"]) if "bound" in s else []
    bound_passes = [v / per_sae for v in pairwise_ratios(s["bound"], s["floor"])] if "bound" in s else []
    c = timings.cpu_seconds
    cpu_speed = [v for v in pairwise_ratios(c["anchor"], c["ours"]) if math.isfinite(v)]
    return {
        "speedup": round(statistics.median(speed), 3),
        "speedup_min": round(min(speed), 3),
        "speedup_max": round(max(speed), 3),
        "forward_passes": round(statistics.median(passes), 3),
        "anchor_forward_passes": round(statistics.median(anchor_passes), 3),
        "bound_forward_passes": round(statistics.median(bound_passes), 3) if bound_passes else None,
        "speedup_bound": round(statistics.median(bound_speed), 3) if bound_speed else None,
        "speedup_cpu_time": round(statistics.median(cpu_speed), 3) if cpu_speed else None,
        "max_abs_diff": float(f"{worst_diff:.3g}"),
        "peak_bytes_ours": peak.get("ours"),
        "peak_bytes_anchor": peak.get("anchor"),
        "peak_bytes_floor": peak.get("floor"),
        "seconds_ours": round(statistics.median(s["ours"]), 3),
        "seconds_anchor": round(statistics.median(s["anchor"]), 3),
        "seconds_floor": round(statistics.median(s["floor"]), 3),
        "seconds_bound": round(statistics.median(s["bound"]), 3) if "bound" in s else None,
        **_defaults_record(timings, per_sae),
        **worst_metric(rows),
    }


def _defaults_record(timings: Timings, per_sae: int) -> dict[str, Any]:
    """The default settings' time and forward passes (per SAE), where they were timed; nothing otherwise."""
    s = timings.seconds
    if "defaults" not in s:
        return {}
    passes = [v / per_sae for v in pairwise_ratios(s["defaults"], s["floor"])]
    return {
        "seconds_defaults": round(statistics.median(s["defaults"]), 3),
        "defaults_forward_passes": round(statistics.median(passes), 3),
        "defaults_over_ours": round(statistics.median(pairwise_ratios(s["defaults"], s["ours"])), 3),
    }


def worst_metric(rows: Sequence[tuple]) -> dict[str, Any]:
    """Which metric has the largest |diff|, and the largest difference in float32 ulps of SAE Lens' value."""
    if not rows:
        return {}
    name = max(rows, key=lambda row: row[3])[0]
    ulps = max(float32_ulps(a, b) for _, a, b, _ in rows)
    return {"max_abs_diff_metric": name, "max_float32_ulps": round(ulps, 2)}


# --- the three implementations -------------------------------------------------------------------------------


def run_ours(model: Any, sae: Any, tokens: Any, batch_size: int, *, joint: bool = False) -> Any:
    """One ``evaluate`` call; ``sae`` may be a mapping ``name -> SAE`` (one shared pass, ``joint`` allowed)."""
    from pytest_saecheck import evaluate

    result = evaluate(model, sae, tokens, batch_size=batch_size, joint=joint, progress=False, **AS_RUN_EVALS)
    # Both sides must score every position: a token policy that left some out would compare other averages.
    evaluations = [result] if hasattr(result, "n_tokens") else list(result.values())
    for evaluation in evaluations:
        if evaluation.n_tokens != tokens.numel():
            raise RuntimeError(
                f"ours evaluated {evaluation.n_tokens} of {tokens.numel()} positions; the comparison needs all"
            )
    return result


def run_ours_defaults(model: Any, sae: Any, tokens: Any, batch_size: int) -> Any:
    """One ``evaluate`` call with the product's default settings (BOS and special tokens left out, mean ablation
    on): what a user's test runs, beside :func:`run_ours`'s settings matched to SAE Lens. The tokens get a BOS
    column (:func:`with_bos`), as tokenized text has: the default leaves position 0 out."""
    from pytest_saecheck import evaluate

    return evaluate(model, sae, with_bos(model, tokens), batch_size=batch_size, progress=False)


def with_bos(model: Any, tokens: Any) -> Any:
    """``tokens`` with position 0 set to the model's BOS id (its tokenizer's, else the last id of the vocabulary,
    GPT-2's ``<|endoftext|>``), the same in every sequence as in text tokenized with a BOS."""
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        cfg = getattr(model, "cfg", None)
        bos = (cfg.d_vocab if cfg is not None else model.config.vocab_size) - 1
    out = tokens.clone()
    out[:, 0] = bos
    return out


def anchor_config(batch_size: int, n_batches: int) -> Any:
    return sae_lens_eval_config(batch_size, n_batches)


def run_anchor(model: Any, sae: Any, tokens: Any, batch_size: int, eval_config: Any) -> Any:
    return run_sae_lens_evals(model, sae, tokens, batch_size, eval_config)


def run_floor(model: Any, tokens: Any, batch_size: int) -> None:
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            model(tokens[start : start + batch_size].to(device))


def suffix_start(model: Any, hook_name: str) -> tuple[int, bool]:
    """First block of the spliced run that an exact evaluation must recompute after the hook, and whether the
    hook lies inside a block (then the zero-ablated run depends on the tokens and needs its own suffix)."""
    from pytest_saecheck.hookpoints import resolve_hook

    site = resolve_hook(hook_name, None, model.cfg.n_layers, list(model.hook_dict))
    if site.resid_layer is not None:
        return site.resid_layer, False
    # Inside a block, the rest of that block is left out too, so this stays a lower bound.
    return site.layer + 1, True


def run_bound(
    model: Any, sae: Any, tokens: Any, batch_size: int, start: int, *, zero_suffix: bool = False
) -> None:
    """The least work any exact evaluation does: the original forward pass, one SAE pass, the spliced suffix,
    and with ``zero_suffix`` the zero-ablated suffix too.

    Original CE and KL need every original logit (one forward pass); spliced CE and KL need every spliced logit
    (the blocks after the hook and the unembedding). Zero ablation inside a block depends on the tokens, so it
    needs its own suffix; at a residual hook every zeroed position is alike and can be shared. The residual at
    ``start`` stands in for the SAE's input: same shape, so the same cost. Nothing is scored: this times the
    model and SAE calls alone.
    """
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        for first in range(0, tokens.shape[0], batch_size):
            resid = model(tokens[first : first + batch_size].to(device), stop_at_layer=start)
            model(resid, start_at_layer=start)
            model(sae.decode(sae.encode(resid)), start_at_layer=start)
            if zero_suffix:
                model(resid, start_at_layer=start)


def run_anchor_release(
    model: Any, saes: dict[str, Any], tokens: Any, batch_size: int, eval_config: Any
) -> dict[str, Any]:
    """SAE Lens evaluates a release one SAE at a time: ``run_evals`` once per SAE, on the same batches."""
    return {name: run_anchor(model, sae, tokens, batch_size, eval_config) for name, sae in saes.items()}


def sums_bytes(sae: Any, seq_len: int) -> int:
    """Bytes of the sums one SAE keeps through a pass (``engine.accumulate.Accumulator``): the d×d float64 second
    moment of its written activation (for the participation ratio, up to
    ``PARTICIPATION_RATIO_MAX_WIDTH``), its float64 firing count per latent, the reference vector its sums are
    centred on and its per-position curves (5 float64 vectors of ``seq_len``). Per-sequence sums are left out:
    a few hundred float64 numbers per sequence."""
    from pytest_saecheck.engine.finish import PARTICIPATION_RATIO_MAX_WIDTH

    d_out = int(getattr(sae.cfg, "d_out", None) or sae.cfg.d_in)
    second_moment = d_out * d_out * 8 if d_out <= PARTICIPATION_RATIO_MAX_WIDTH else 0
    return second_moment + int(sae.cfg.d_sae) * 8 + d_out * 8 + 5 * seq_len * 8


def run_release_bound(model: Any, saes: dict[str, Any], tokens: Any, batch_size: int) -> dict[str, float]:
    """The least work of any exact evaluation of a release of residual-stream SAEs: the original forward pass
    once (run in stages that stop at each SAE's layer) and, per SAE, one SAE pass and its spliced suffix with
    the unembedding. Zero ablation at a residual hook does not depend on the tokens, so, as in
    :func:`run_bound`, it is left out. Nothing is scored.

    Returns the wall seconds of the parts: ``original`` (the whole original forward pass with its
    unembedding), ``sae`` (every SAE pass) and ``suffix`` (every spliced suffix with its unembedding). Raises
    ``ValueError`` for an SAE inside a block (its zero-ablated run would need a suffix of its own).
    """
    import torch

    device = next(model.parameters()).device
    by_start: dict[int, list[Any]] = {}
    for sae in saes.values():
        start, inside_block = suffix_start(model, sae.cfg.metadata.hook_name)
        if inside_block:
            raise ValueError("the release bound covers residual-stream hooks only")
        by_start.setdefault(start, []).append(sae)
    parts = dict.fromkeys(("original", "sae", "suffix"), 0.0)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    with torch.inference_mode():
        for first in range(0, tokens.shape[0], batch_size):
            tick = clock()
            at = min(by_start)
            resid = model(tokens[first : first + batch_size].to(device), stop_at_layer=at)
            parts["original"] += clock() - tick
            for start in sorted(by_start):
                tick = clock()
                if start > at:
                    resid = model(resid, start_at_layer=at, stop_at_layer=start)
                    at = start
                parts["original"] += clock() - tick
                for sae in by_start[start]:
                    tick = clock()
                    recon = sae.decode(sae.encode(resid))
                    parts["sae"] += clock() - tick
                    tick = clock()
                    model(recon, start_at_layer=start)
                    parts["suffix"] += clock() - tick
            tick = clock()
            model(resid, start_at_layer=at)
            parts["original"] += clock() - tick
    return parts


def float64_reference(
    model: Any, sae: Any, tokens: Any, batch_size: int, forward: Callable[..., Any] | None = None
) -> dict[str, float]:
    """The metrics most exposed to rounding, recomputed from the model's logits and the hook activations with
    float64 log-softmax and float64 sums: the arbiter when the two sides differ. ``forward`` is a
    :func:`tl_forward` or :func:`hf_forward` (default: ``tl_forward``, TransformerLens hook names)."""
    import torch

    forward = forward or tl_forward(model, sae.cfg.metadata.hook_name)
    device = next(model.parameters()).device
    sums = dict.fromkeys(("sse", "l1", "ce_orig", "ce_sae", "ce_zero"), 0.0)
    n_rec = n_ce = 0

    def ce_sum(logits: Any, batch: Any) -> float:
        log_probs = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
        return float(-log_probs.gather(-1, batch[:, 1:, None]).sum())

    with torch.inference_mode():
        for first in range(0, tokens.shape[0], batch_size):
            batch = tokens[first : first + batch_size].to(device)
            logits, x = forward(batch, None)
            latents = sae.encode(x)
            recon = sae.decode(latents).to(x.dtype)
            spliced, _ = forward(batch, lambda act, recon=recon: recon)
            zeroed, _ = forward(batch, torch.zeros_like)
            sums["sse"] += float((x.double() - recon.double()).pow(2).sum())
            sums["l1"] += float(latents.double().abs().sum())
            sums["ce_orig"] += ce_sum(logits, batch)
            sums["ce_sae"] += ce_sum(spliced, batch)
            sums["ce_zero"] += ce_sum(zeroed, batch)
            n_rec += batch.numel()
            n_ce += batch.shape[0] * (batch.shape[1] - 1)
    ce = {name: sums[name] / n_ce for name in ("ce_orig", "ce_sae", "ce_zero")}
    return {
        "mse": sums["sse"] / n_rec,
        "l1": sums["l1"] / n_rec,
        **ce,
        "ce_loss_score": (ce["ce_zero"] - ce["ce_sae"]) / (ce["ce_zero"] - ce["ce_orig"]),
    }


def tl_forward(model: Any, hook_name: str) -> Callable[[Any, Callable[[Any], Any] | None], tuple[Any, Any]]:
    """``forward(batch, replace) -> (logits, activation)`` on a ``HookedTransformer``: the activation at
    ``hook_name`` as computed, replaced by ``replace(activation)`` downstream unless ``replace`` is None."""

    def forward(batch: Any, replace: Callable[[Any], Any] | None) -> tuple[Any, Any]:
        seen: dict[str, Any] = {}

        def hook(act: Any, hook: Any) -> Any:
            seen["x"] = act
            return None if replace is None else replace(act)

        return model.run_with_hooks(batch, fwd_hooks=[(hook_name, hook)]), seen["x"]

    return forward


def hf_forward(model: Any, module_path: str) -> Callable[[Any, Callable[[Any], Any] | None], tuple[Any, Any]]:
    """:func:`tl_forward` on a transformers causal LM, with a plain torch forward hook on the module at
    ``module_path`` (its output, the first element where the module returns a tuple)."""
    module = model.get_submodule(module_path)

    def forward(batch: Any, replace: Callable[[Any], Any] | None) -> tuple[Any, Any]:
        seen: dict[str, Any] = {}

        def hook(module: Any, args: Any, output: Any) -> Any:
            act = output[0] if isinstance(output, tuple) else output
            seen["x"] = act
            if replace is None:
                return None
            return (replace(act), *output[1:]) if isinstance(output, tuple) else replace(act)

        handle = module.register_forward_hook(hook)
        try:
            logits = model(input_ids=batch, use_cache=False).logits
        finally:
            handle.remove()
        return logits, seen["x"]

    return forward


def float64_errors(rows: Sequence[tuple], reference: dict[str, float]) -> dict[str, dict[str, float]]:
    """|ours - reference| and |SAE Lens - reference| of each metric :func:`float64_reference` recomputes."""
    values = {name: (a, b) for name, a, b, _ in rows}
    return {
        name: {
            "ours": float(f"{abs(values[name][0] - exact):.3g}"),
            "anchor": float(f"{abs(values[name][1] - exact):.3g}"),
        }
        for name, exact in reference.items()
    }


def float64_lines(errors: dict[str, dict[str, float]]) -> list[str]:
    return [
        f"  {name} against a float64 recomputation: ours off by {e['ours']:.2g}, SAE Lens off by {e['anchor']:.2g}"
        for name, e in errors.items()
    ]


# --- measurement -------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result)."""
    gc.collect()
    _sync(device)
    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu, out


def live_tensor_peak(fn: Callable[[], Any], device: str) -> float:
    """Peak bytes of tensors created by ``fn`` and alive at the same time."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    tracker = _live_tensor_bytes()
    with tracker:
        fn()
    return float(tracker.peak)


def _live_tensor_bytes() -> Any:
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.tracked: dict[int, tuple[Any, int]] = {}
            self.live = 0
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (ref, _) in self.tracked.items() if ref.expired()]:
                self.live -= self.tracked.pop(key)[1]
            # Views and in-place results alias an input (e.g. W_U.T of a parameter): they allocate nothing.
            inputs = {
                t.untyped_storage().data_ptr()
                for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and not t.is_sparse
            }
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and not tensor.is_sparse:
                    storage = tensor.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in self.tracked and key not in inputs:
                        self.tracked[key] = (StorageWeakRef(storage), storage.nbytes())
                        self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            return out

    return LiveTensorBytes()


def measure_case(
    case: Case, batch_size: int, repeats: int, device: str, memory: bool, log: Callable[[str], None]
) -> tuple[Timings, dict[str, Any], Any, dict[str, float | None]]:
    tokens = case.tokens
    n_batches = tokens.shape[0] // batch_size
    eval_config = anchor_config(batch_size, n_batches)
    warm_tokens = tokens[:batch_size]
    warm_config = anchor_config(batch_size, 1)
    start, inside_block = suffix_start(case.model, case.sae.cfg.metadata.hook_name)
    impls: dict[str, Callable[[], Any]] = {
        "ours": lambda: run_ours(case.model, case.sae, tokens, batch_size),
        "defaults": lambda: run_ours_defaults(case.model, case.sae, tokens, batch_size),
        "anchor": lambda: run_anchor(case.model, case.sae, tokens, batch_size, eval_config),
        "floor": lambda: run_floor(case.model, tokens, batch_size),
        "bound": lambda: run_bound(case.model, case.sae, tokens, batch_size, start, zero_suffix=inside_block),
    }
    one_batch: dict[str, Callable[[], Any]] = {
        "ours": lambda: run_ours(case.model, case.sae, warm_tokens, batch_size),
        "defaults": lambda: run_ours_defaults(case.model, case.sae, warm_tokens, batch_size),
        "anchor": lambda: run_anchor(case.model, case.sae, warm_tokens, batch_size, warm_config),
        "floor": lambda: run_floor(case.model, warm_tokens, batch_size),
        "bound": lambda: run_bound(
            case.model, case.sae, warm_tokens, batch_size, start, zero_suffix=inside_block
        ),
    }
    timings, results, peak = interleaved(impls, one_batch, repeats, device, memory, log)
    return timings, results["ours"], results["anchor"], peak


def interleaved(
    impls: dict[str, Callable[[], Any]],
    one_batch: dict[str, Callable[[], Any]],
    repeats: int,
    device: str,
    memory: bool,
    log: Callable[[str], None],
) -> tuple[Timings, dict[str, Any], dict[str, float | None]]:
    """Warm-up (and peak memory) on ``one_batch``, then ``repeats`` timed repetitions of ``impls`` in an order
    that rotates every repetition. Returns the timings, each implementation's first result, and the peaks
    (``None`` without ``memory``)."""
    peak: dict[str, float | None] = dict.fromkeys(one_batch)
    if memory:
        # All of them stream batch by batch, so the peak is reached within a batch: it is measured on the first
        # batch, and these runs double as the warm-up.
        log("  warm-up and peak memory (first batch of each)")
        for name, fn in one_batch.items():
            peak[name] = live_tensor_peak(fn, device)
        log("  peak memory: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in peak.items()))
    else:
        log("  warm-up (first batch of each)")
        for fn in one_batch.values():
            fn()

    timings = Timings()
    results: dict[str, Any] = {}
    order = list(impls)
    for rep in range(repeats):
        shift = rep % len(order)
        rotated = order[shift:] + order[:shift]
        line = []
        for name in rotated:
            seconds, cpu, out = timed(impls[name], device)
            timings.add(name, seconds, cpu)
            results.setdefault(name, out)
            line.append(f"{name} {seconds:6.2f} s")
        log(f"  repetition {rep + 1}/{repeats}: " + ", ".join(line))
    return timings, results, peak


def measure_release(
    case: ReleaseCase, batch_size: int, repeats: int, device: str, memory: bool, log: Callable[[str], None]
) -> tuple[Timings, dict[str, Any], dict[str, float | None]]:
    """Times ``ours`` (one ``evaluate`` call on the whole set), ``joint`` (the same with ``joint=True``),
    ``anchor`` (``run_evals`` once per SAE), ``floor`` and ``bound`` (:func:`run_release_bound`). With
    ``memory``, the peak of ``ours_one_sae`` (the first SAE evaluated alone) is measured too, for how memory
    grows with the number of SAEs."""
    model, saes, tokens = case.model, case.saes, case.tokens
    eval_config = anchor_config(batch_size, tokens.shape[0] // batch_size)
    warm_tokens = tokens[:batch_size]
    warm_config = anchor_config(batch_size, 1)
    impls: dict[str, Callable[[], Any]] = {
        "ours": lambda: run_ours(model, saes, tokens, batch_size),
        "joint": lambda: run_ours(model, saes, tokens, batch_size, joint=True),
        "anchor": lambda: run_anchor_release(model, saes, tokens, batch_size, eval_config),
        "floor": lambda: run_floor(model, tokens, batch_size),
        "bound": lambda: run_release_bound(model, saes, tokens, batch_size),
    }
    one_batch: dict[str, Callable[[], Any]] = {
        "ours": lambda: run_ours(model, saes, warm_tokens, batch_size),
        "joint": lambda: run_ours(model, saes, warm_tokens, batch_size, joint=True),
        "anchor": lambda: run_anchor_release(model, saes, warm_tokens, batch_size, warm_config),
        "floor": lambda: run_floor(model, warm_tokens, batch_size),
        "bound": lambda: run_release_bound(model, saes, warm_tokens, batch_size),
    }
    if memory:
        one_sae = next(iter(saes.values()))
        one_batch["ours_one_sae"] = lambda: run_ours(model, one_sae, warm_tokens, batch_size)
    timings, results, peak = interleaved(impls, one_batch, repeats, device, memory, log)
    log("  ours once more, under cProfile, part by part")
    results["ours_parts"] = ours_parts(impls["ours"], device)
    return timings, results, peak


OURS_PARTS = {
    ("engine/cut.py", "capture"): "original forward pass, capturing every hook",
    ("engine/cut.py", "continue_from"): "continuations from each hook (spliced, templates)",
    ("engine/cut.py", "logits"): "unembeddings",
    ("engine/member.py", "reconstruct"): "SAE passes",
    ("engine/accumulate.py", "add_reconstruction"): "reconstruction sums",
    ("scoring.py", "prepare_original"): "the original's log-softmax",
    ("scoring.py", "score_batch"): "scoring CE and KL",
    ("engine/finish.py", "member"): "metrics, intervals, participation ratios",
}
"""The engine's parts that ``ours_parts`` times: (file suffix, function) -> label. None calls another, so their
cumulative times add up; what they leave is bookkeeping."""


def ours_parts(fn: Callable[[], Any], device: str) -> dict[str, float]:
    """Wall seconds of one more run of ``fn`` under cProfile (``total``) and the cumulative seconds of each of
    :data:`OURS_PARTS` in it (profiling adds some overhead to the small calls; the shares are what matter)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    _sync(device)
    start = time.perf_counter()
    profiler.runcall(fn)
    _sync(device)
    total = time.perf_counter() - start
    parts = dict.fromkeys(OURS_PARTS.values(), 0.0)
    for (filename, _, function), row in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        for (suffix, name), label in OURS_PARTS.items():
            if function == name and filename.replace(os.sep, "/").endswith("pytest_saecheck/" + suffix):
                parts[label] += row[3]
    return {"total": total, **parts}


# --- configurations -----------------------------------------------------------------------------------------------


def gpt2_shaped_model(device: str) -> Any:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(**GPT2_SHAPE, seed=0, device=device)
    return HookedTransformer(cfg).eval()


def topk_sae(hook: str, d_in: int, device: str, *, expansion: int = 16, k: int = 32, seed: int = 1) -> Any:
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=expansion * d_in, k=k, device=device)
    cfg.metadata.hook_name = hook
    sae = TopKSAE(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random encoder and biases too (SAE Lens initialises b_enc/b_dec to zero)
        sae.b_enc.copy_(0.01 * torch.randn(sae.b_enc.shape, generator=generator))
        sae.b_dec.copy_(0.01 * torch.randn(sae.b_dec.shape, generator=generator))
    return sae.eval()


def release_saes(model: Any, n_saes: int, device: str, *, expansion: int = 16, k: int = 32) -> dict[str, Any]:
    """``n_saes`` random TopK SAEs at ``blocks.L.hook_resid_pre``, spread over the layers (one per layer when
    ``n_saes`` equals the number of layers), each with its own seed; named by their hooks."""
    saes = {}
    for layer in release_layers(int(model.cfg.n_layers), n_saes):
        hook = f"blocks.{layer}.hook_resid_pre"
        saes[hook] = topk_sae(hook, int(model.cfg.d_model), device, expansion=expansion, k=k, seed=1 + layer)
    return saes


def random_tokens(n_sequences: int, seq_len: int, vocab: int, seed: int = 2) -> Any:
    import torch

    return torch.randint(0, vocab, (n_sequences, seq_len), generator=torch.Generator().manual_seed(seed))


def build_cases(
    keys: list[str],
    n_tokens: int | None,
    batch_size: int,
    device: str,
    log: Callable[[str], None],
    seq_len: int | None = None,
    n_release: int = GPT2_SHAPE["n_layers"],
) -> tuple[list[Case | ReleaseCase], dict[str, str]]:
    cases: list[Case | ReleaseCase] = []
    skipped: dict[str, str] = {}
    gpt2 = None
    if "1" in keys or "2" in keys or RELEASE_KEY in keys:
        log("building the GPT-2-small-shaped model (random weights, seed 0)")
        gpt2 = gpt2_shaped_model(device)
        gpt2_len = min(seq_len or GPT2_SHAPE["n_ctx"], GPT2_SHAPE["n_ctx"])
        n_seq = n_sequences_for(n_tokens or 1024, gpt2_len, batch_size)
        tokens = random_tokens(n_seq, gpt2_len, GPT2_SHAPE["d_vocab"])
        shape = "GPT-2-small-shaped random model (12 layers, d_model 768, vocab 50257, context 128)"
        sae_desc = "TopK SAE (k 32, d_sae 12288 = 16 x 768, random weights)"
        hooks = []
        if "1" in keys:
            hooks.append(("1", "blocks.6.hook_resid_pre"))
        if "2" in keys:
            hooks += [("2a", "blocks.10.hook_resid_pre"), ("2b", "blocks.6.hook_mlp_out")]
        for key, hook in hooks:
            cases.append(
                Case(key, f"{shape} + {sae_desc} at {hook}", gpt2, topk_sae(hook, 768, device), tokens, hook)
            )
        if RELEASE_KEY in keys:
            saes = release_saes(gpt2, n_release, device)
            layers = [name.split(".")[1] for name in saes]
            title = (
                f"{shape} + a release of {len(saes)} {sae_desc.replace('TopK SAE', 'TopK SAEs')}, one at "
                f"blocks.L.hook_resid_pre for L = {', '.join(layers)}"
            )
            name = f"release: {len(saes)} SAEs at blocks.{{{','.join(layers)}}}.hook_resid_pre"
            cases.append(ReleaseCase(RELEASE_KEY, title, gpt2, saes, tokens, name))
    if "3" in keys:
        try:
            cases.append(demo_case(n_tokens, batch_size, device, seq_len))
        except Exception as exc:  # the demo package or its built assets may be missing
            skipped["3"] = f"the demo model could not be loaded ({type(exc).__name__}: {exc})"
            log(f"SKIPPED configuration 3: {skipped['3']}")
    return cases, skipped


def demo_case(n_tokens: int | None, batch_size: int, device: str, seq_len: int | None = None) -> Case:
    from pytest_saecheck.demo import load_model, load_sae, load_tokens

    model = load_model(device=device)
    sae = load_sae("good", device=device)
    seq_len = min(seq_len or int(model.cfg.n_ctx), int(model.cfg.n_ctx))
    n_seq = n_sequences_for(n_tokens or 64 * seq_len, seq_len, batch_size)
    tokens = load_tokens(n_sequences=n_seq, seq_len=seq_len, device="cpu")
    hook = sae.cfg.metadata.hook_name
    title = (
        f"demo model ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, vocab {model.cfg.d_vocab}, "
        f"context {seq_len}) + its 'good' SAE ({sae.cfg.architecture()}, d_sae {sae.cfg.d_sae}) at {hook}"
    )
    return Case("3", title, model.eval(), sae.eval(), tokens, f"demo 'good' SAE at {hook}")


# --- configuration 5: the Hugging Face backend -----------------------------------------------------------------------


def hf_gpt2_shaped_model(device: str) -> Any:
    """A GPT-2-small-shaped transformers ``GPT2LMHeadModel`` (random weights, seed 0), float32, eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=GPT2_SHAPE["n_layers"],
        n_embd=GPT2_SHAPE["d_model"],
        n_head=GPT2_SHAPE["n_heads"],
        n_positions=GPT2_SHAPE["n_ctx"],
        vocab_size=GPT2_SHAPE["d_vocab"],
    )
    return GPT2LMHeadModel(config).to(device).eval()


def run_hf_floor(model: Any, tokens: Any, batch_size: int) -> None:
    """One plain forward pass of the Hugging Face model (logits) over the batches."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)


def run_hf_bound(model: Any, sae: Any, tokens: Any, batch_size: int, start: int) -> None:
    """The least work of an exact evaluation on the Hugging Face model, in plain transformers calls: the original
    forward pass (logits), one SAE pass, and the spliced run's blocks from ``start`` with the final norm and head
    (the zero-ablated run at a residual point is the same at every position: one position, left out)."""
    import torch

    device = next(model.parameters()).device
    blocks, ln_f, head = model.transformer.h, model.transformer.ln_f, model.lm_head
    with torch.inference_mode():
        for first in range(0, tokens.shape[0], batch_size):
            batch = tokens[first : first + batch_size].to(device)
            hidden = model(input_ids=batch, use_cache=False, output_hidden_states=True).hidden_states[start]
            hidden = sae.decode(sae.encode(hidden))
            for block in blocks[start:]:
                hidden = block(hidden)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            head(ln_f(hidden))


@contextmanager
def sae_lens_proxy(model: Any, hook_name: str) -> Iterator[Any]:
    """SAE Lens' own wrapper of a transformers model, ``sae_lens.load_model.HookedProxyLM``, around the SAME model
    object (it holds the model as a submodule: no second copy of the weights), with a hook point only at the module
    path ``hook_name`` (its ``hook_names=``), the way SAE Lens names hooks on Hugging Face models.

    ``HookedProxyLM`` registers a forward hook on that module and keeps no handle; on exit the hooks it added are
    removed, so the other implementations time the bare model (our engine warns about foreign hooks, rightly).
    No tokenizer is given: ``run_evals`` reads it only to list special tokens, and the benchmark passes
    ``exclude_special_tokens=False``.
    """
    from sae_lens.load_model import HookedProxyLM

    module = model.get_submodule(hook_name)
    before = set(module._forward_hooks)
    proxy = HookedProxyLM(model, None, hook_names=[hook_name])  # type: ignore[arg-type]
    added = set(module._forward_hooks) - before  # its hooks alone (transformers may add its own during a run)
    try:
        yield proxy
    finally:
        for hooks in (
            module._forward_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_hooks_always_called,
        ):
            for key in added:
                hooks.pop(key, None)


def run_hf_anchor(model: Any, sae: Any, tokens: Any, batch_size: int, eval_config: Any) -> Any:
    """SAE Lens' ``run_evals`` on its Hugging Face path: the model wrapped in ``HookedProxyLM`` (wrapping included
    in the time; it registers one hook), the SAE's ``metadata.hook_name`` a module path."""
    with sae_lens_proxy(model, sae.cfg.metadata.hook_name) as proxy:
        return run_anchor(proxy, sae, tokens, batch_size, eval_config)


def hf_ours(model: Any, sae: Any, tokens: Any, batch_size: int) -> Any:
    """Our ``evaluate`` on the Hugging Face backend, scoring what ``run_evals`` scores."""
    from pytest_saecheck import evaluate

    return evaluate(model, sae, tokens, batch_size=batch_size, progress=False, backend="hf", **AS_RUN_EVALS)


def measure_hf(
    n_tokens: int | None,
    batch_size: int,
    repeats: int,
    device: str,
    seq_len: int | None,
    log: Callable[[str], None],
) -> tuple[list[str], dict[str, Any]]:
    """Configuration 5: ours on the Hugging Face backend (``backend="hf"``) against SAE Lens' ``run_evals`` on
    ``HookedProxyLM``, the floor and the bound, on the GPT-2-small-shaped ``GPT2LMHeadModel``."""
    model = hf_gpt2_shaped_model(device)
    sae = topk_sae(HF_HOOK, GPT2_SHAPE["d_model"], device)
    length = min(seq_len or GPT2_SHAPE["n_ctx"], GPT2_SHAPE["n_ctx"])
    tokens = random_tokens(
        n_sequences_for(n_tokens or 1024, length, batch_size), length, GPT2_SHAPE["d_vocab"]
    )
    title = "GPT-2-small-shaped transformers GPT2LMHeadModel (random weights) + TopK SAE (k 32, d_sae 12288)"
    return measure_hf_case(model, sae, tokens, batch_size, repeats, device, log, title)


def measure_hf_case(
    model: Any,
    sae: Any,
    tokens: Any,
    batch_size: int,
    repeats: int,
    device: str,
    log: Callable[[str], None],
    title: str = "",
) -> tuple[list[str], dict[str, Any]]:
    """Times ``ours`` (:func:`hf_ours`), ``anchor`` (:func:`run_hf_anchor`), ``floor`` and ``bound`` on a
    ``GPT2LMHeadModel`` and an SAE Lens SAE at a block's output (``transformer.h.L``), interleaved; compares the
    metrics both define. Where ``run_evals`` fails on ``HookedProxyLM``, the exception is reported instead of
    its time and the rest is still measured."""
    hook = sae.cfg.metadata.hook_name
    start = int(hook.rsplit(".", 1)[1]) + 1
    n_batches = tokens.shape[0] // batch_size
    warm = tokens[:batch_size]
    eval_config, warm_config = anchor_config(batch_size, n_batches), anchor_config(batch_size, 1)
    impls: dict[str, Callable[[], Any]] = {
        "ours": lambda: hf_ours(model, sae, tokens, batch_size),
        "anchor": lambda: run_hf_anchor(model, sae, tokens, batch_size, eval_config),
        "floor": lambda: run_hf_floor(model, tokens, batch_size),
        "bound": lambda: run_hf_bound(model, sae, tokens, batch_size, start),
    }
    one_batch: dict[str, Callable[[], Any]] = {
        "ours": lambda: hf_ours(model, sae, warm, batch_size),
        "anchor": lambda: run_hf_anchor(model, sae, warm, batch_size, warm_config),
        "floor": lambda: run_hf_floor(model, warm, batch_size),
        "bound": lambda: run_hf_bound(model, sae, warm, batch_size, start),
    }
    anchor_error = None
    try:
        one_batch["anchor"]()
    except Exception as exc:  # reported in the output: SAE Lens' HF path is what is measured here
        anchor_error = f"{type(exc).__name__}: {exc}"
        log(f"  SAE Lens' run_evals on HookedProxyLM failed: {anchor_error}")
        del impls["anchor"], one_batch["anchor"]
    timings, results, _ = interleaved(impls, one_batch, repeats, device, False, log)
    s = timings.seconds
    ratio = statistics.median(pairwise_ratios(s["ours"], s["bound"]))
    evaluation = results["ours"]
    n_seq, seq_len = tokens.shape
    lines = [
        f"\nConfiguration {HF_KEY}: {title or type(model).__name__} at {hook} (its output), backend hf",
        f"  {n_seq * seq_len} tokens ({n_seq} sequences x {seq_len}), batch {batch_size}, {repeats} repetitions; "
        "anchor = SAE Lens run_evals on HookedProxyLM (the same model object, hook at the module path)",
        *timing_lines(timings, {}),
        f"  ours / bound, pair by pair: median {ratio:.3f}",
    ]
    record: dict[str, Any] = {"name": f"hf: {hook}"}
    if anchor_error is None:
        all_metrics, feature_metrics = results["anchor"]
        rows, worst = compare_metrics(
            formula_values(evaluation),
            anchor_flat(all_metrics),
            evaluation.latent_density,
            feature_metrics["feature_density"],
        )
        record.update(summary_record(timings, worst, {}, rows))
        speed = spread(pairwise_ratios(s["anchor"], s["ours"]))
        lines.append(
            "  speedup anchor/ours, pair by pair: median {:.2f}x (min {:.2f}x, max {:.2f}x)".format(*speed)
        )
        lines.append(
            f"  no exact evaluation can beat anchor/bound: median {record['speedup_bound']:.2f}x (bound = 1 forward "
            f"pass + 1 SAE pass + the spliced blocks after the hook = {record['bound_forward_passes']:.2f} forward "
            "passes)"
        )
        lines += metric_lines(rows, record)
        reference = float64_reference(model, sae, tokens, batch_size, hf_forward(model, hook))
        record["error_vs_float64"] = float64_errors(rows, reference)
        lines += float64_lines(record["error_vs_float64"])
        record["max_abs_diff_by_metric"] = {name: float(f"{diff:.3g}") for name, _, _, diff in rows}
    else:
        lines.append(f"  anchor: SAE Lens' run_evals on HookedProxyLM did not run: {anchor_error}")
        record["anchor_error"] = anchor_error
        record["forward_passes"] = round(statistics.median(pairwise_ratios(s["ours"], s["floor"])), 3)
        record.update({f"seconds_{name}": round(statistics.median(s[name]), 3) for name in s})
        lines.append(
            f"  delta_ce {evaluation.metrics['delta_ce']:.6g}, kl_sae {evaluation.metrics['kl_sae']:.6g}, "
            f"explained_variance {evaluation.metrics['explained_variance']:.6g}"
        )
    record["ours_over_bound"] = round(ratio, 3)
    return lines, record


# --- configuration 6: a cross-layer transcoder's replacement model ----------------------------------------------------

REPLACEMENT_SHAPE = {"n_layers": 4, "d_model": 128, "d_sae": 1024, "d_vocab": 2048, "n_ctx": 128}
"""Configuration 6's model and CLT: a random 4-layer TransformerLens model (ReLU MLPs, LayerNorm) and a random ReLU
CLT of 1024 features per layer over every MLP (--quick: 256)."""


def replacement_case(folder: Any, d_sae: int, device: str) -> tuple[Any, Any]:
    """The model and a random CLT written in circuit-tracer's folder layout under ``folder`` and loaded from it."""
    import torch
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from pytest_saecheck.loading.clt import load_clt

    n, d = REPLACEMENT_SHAPE["n_layers"], REPLACEMENT_SHAPE["d_model"]
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=n,
        d_model=d,
        n_ctx=REPLACEMENT_SHAPE["n_ctx"],
        d_head=d // 4,
        n_heads=4,
        d_mlp=4 * d,
        d_vocab=REPLACEMENT_SHAPE["d_vocab"],
        act_fn="relu",
        normalization_type="LN",
        device=device,
    )
    model = HookedTransformer(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(
        "model_name: bench\nmodel_kind: cross_layer_transcoder\n"
        "feature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"
    )
    for layer in range(n):
        save_file(
            {
                f"W_enc_{layer}": torch.randn(d_sae, d) / d**0.5,
                f"b_enc_{layer}": torch.full((d_sae,), -0.5),
                f"b_dec_{layer}": torch.zeros(d),
            },
            str(folder / f"W_enc_{layer}.safetensors"),
        )
        save_file(
            {f"W_dec_{layer}": torch.randn(d_sae, n - layer, d) * 0.02},
            str(folder / f"W_dec_{layer}.safetensors"),
        )
    return model, load_clt(folder)


def run_replacement_bound(model: Any, folder: Any, tokens: Any, batch_size: int) -> None:
    """The least work of an exact replacement evaluation in plain TransformerLens calls, nothing scored: the original
    forward pass (logits) and ONE forward pass with every MLP output replaced by the CLT's reconstruction (features
    read ``ln2.hook_normalized``, each layer's output the sum of the decoders of the layers at or below it)."""
    import torch
    from safetensors.torch import load_file

    n = REPLACEMENT_SHAPE["n_layers"]
    device = next(model.parameters()).device
    enc = [load_file(str(folder / f"W_enc_{layer}.safetensors"), device=str(device)) for layer in range(n)]
    dec = [load_file(str(folder / f"W_dec_{layer}.safetensors"), device=str(device)) for layer in range(n)]
    w_enc = [enc[s][f"W_enc_{s}"].T for s in range(n)]
    b_enc = [enc[s][f"b_enc_{s}"] for s in range(n)]
    b_dec = [enc[s][f"b_dec_{s}"] for s in range(n)]
    w_dec = [dec[s][f"W_dec_{s}"] for s in range(n)]
    latents: dict[int, Any] = {}

    def read(layer: int) -> Any:
        return lambda x, hook: latents.__setitem__(layer, torch.relu(x @ w_enc[layer] + b_enc[layer]))

    def write(layer: int) -> Any:
        return lambda y, hook: (
            b_dec[layer] + sum(latents[s] @ w_dec[s][:, layer - s] for s in range(layer + 1))
        )

    hooks = [(f"blocks.{layer}.ln2.hook_normalized", read(layer)) for layer in range(n)]
    hooks += [(f"blocks.{layer}.hook_mlp_out", write(layer)) for layer in range(n)]
    with torch.inference_mode():
        for first in range(0, tokens.shape[0], batch_size):
            batch = tokens[first : first + batch_size].to(device)
            model(batch)
            model.run_with_hooks(batch, fwd_hooks=hooks)


def measure_replacement(
    n_tokens: int | None,
    batch_size: int,
    repeats: int,
    device: str,
    seq_len: int | None,
    quick: bool,
    log: Callable[[str], None],
) -> tuple[list[str], dict[str, Any]]:
    """Configuration 6: ours (``evaluate_replacement``, one pass with every MLP replaced; and with each layer alone
    too) against the exact bound and a plain forward pass; the CLT streamed under a quarter of its decoders' bytes."""
    import statistics
    import tempfile
    from pathlib import Path

    from pytest_saecheck.engine.replacement import evaluate_replacement
    from pytest_saecheck.loading.clt import load_clt

    d_sae = 256 if quick else REPLACEMENT_SHAPE["d_sae"]
    n, d = REPLACEMENT_SHAPE["n_layers"], REPLACEMENT_SHAPE["d_model"]
    length = min(seq_len or REPLACEMENT_SHAPE["n_ctx"], REPLACEMENT_SHAPE["n_ctx"])
    tokens = random_tokens(
        n_sequences_for(n_tokens or 4096, length, batch_size), length, REPLACEMENT_SHAPE["d_vocab"]
    )
    warm = tokens[:batch_size]
    options = {"batch_size": batch_size, "progress": False}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clt"
        model, clt = replacement_case(folder, d_sae, device)

        def floor(batch: Any) -> None:
            import torch

            with torch.inference_mode():
                for first in range(0, batch.shape[0], batch_size):
                    model(batch[first : first + batch_size].to(device))

        impls = {
            "ours": lambda: evaluate_replacement(model, clt, tokens, alone=False, **options),
            "ours_alone": lambda: evaluate_replacement(model, clt, tokens, alone=True, **options),
            "bound": lambda: run_replacement_bound(model, folder, tokens, batch_size),
            "floor": lambda: floor(tokens),
        }
        one_batch = {
            "ours": lambda: evaluate_replacement(model, clt, warm, alone=False, **options),
            "ours_alone": lambda: evaluate_replacement(model, clt, warm, alone=True, **options),
            "bound": lambda: run_replacement_bound(model, folder, warm, batch_size),
            "floor": lambda: floor(warm),
        }
        timings, results, _ = interleaved(impls, one_batch, repeats, device, False, log)
        decoder_bytes = sum(4 * d_sae * (n - s) * d for s in range(n))
        streamed = evaluate_replacement(
            model, load_clt(folder, weight_budget_bytes=decoder_bytes // 4), tokens, alone=False, **options
        )
    seconds = {name: statistics.median(values) for name, values in timings.seconds.items()}

    def per_pair(name: str, over: str) -> float:
        return statistics.median(pairwise_ratios(timings.seconds[name], timings.seconds[over]))

    ours = results["ours"]
    record = {
        "name": f"replacement: {n}-layer CLT, {d_sae} features per layer",
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "ours_over_bound": round(per_pair("ours", "bound"), 3),
        "forward_passes": round(per_pair("ours", "floor"), 3),
        "forward_passes_alone": round(per_pair("ours_alone", "floor"), 3),
        "forward_passes_by_design": {"ours": 2, "ours_alone": 2 + n, "bound": 2},
        "bound_forward_passes": round(per_pair("bound", "floor"), 3),
        "decoder_bytes": decoder_bytes,
        "streamed_peak_bytes": streamed.dictionary["weight_peak_bytes"],
        "streamed_delta_ce_difference": abs(streamed.metrics["delta_ce"] - ours.metrics["delta_ce"]),
    }
    lines = [
        f"\nConfiguration {REPLACEMENT_KEY}: random {n}-layer TransformerLens model (d_model {d}) + random ReLU CLT "
        f"({d_sae} features per layer, circuit-tracer folder), every MLP replaced at once; {tokens.numel()} tokens",
        f"  ours {seconds['ours']:.2f} s (with each layer alone {seconds['ours_alone']:.2f} s), bound "
        f"{seconds['bound']:.2f} s, floor {seconds['floor']:.2f} s (medians)",
        f"  ours / bound, pair by pair: median {record['ours_over_bound']:.3f}; ours = "
        f"{record['forward_passes']:.2f} forward passes (2 by design; bound {record['bound_forward_passes']:.2f}), "
        f"with each layer alone {record['forward_passes_alone']:.2f} ({2 + n} by design)",
        f"  delta_ce {ours.metrics['delta_ce']:.6g}, kl_sae {ours.metrics['kl_sae']:.6g}; streamed under "
        f"{decoder_bytes / 4 / 2**20:.2f} MiB: weight peak {record['streamed_peak_bytes'] / 2**20:.2f} MiB of "
        f"{decoder_bytes / 2**20:.2f} MiB of decoders, |delta_ce streamed - resident| "
        f"{record['streamed_delta_ce_difference']:.1e}",
        "  SAE Lens cannot evaluate a CLT (it sums each layer's decoders): the anchor is the exact bound",
    ]
    return lines, record


# --- report --------------------------------------------------------------------------------------------------------


def describe_machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads{load}"
    )


TIMING_LABELS = {
    "floor": "floor (1 forward pass)",
    "bound": "exact minimum (bound)",
    "ours": "ours (pytest-saecheck)",
    "defaults": "ours, default settings",
    "anchor": "anchor (SAE Lens)",
}


def timing_lines(timings: Timings, peak: dict[str, float | None]) -> list[str]:
    """The table of median, min and max seconds, peak memory and forward passes (time / floor, pair by pair) of
    each implementation in :data:`TIMING_LABELS` that was timed."""
    floor = timings.seconds["floor"]
    out = [f"  {'':24}{'median':>10}{'min':>10}{'max':>10}{'peak memory':>14}{'forward passes':>16}"]
    for name, label in TIMING_LABELS.items():
        if name not in timings.seconds:
            continue
        med, lo, hi = spread(timings.seconds[name])
        passes = statistics.median(pairwise_ratios(timings.seconds[name], floor))
        out.append(
            f"  {label:24}{med:9.2f}s{lo:9.2f}s{hi:9.2f}s{fmt_bytes(peak.get(name)):>14}{passes:>16.2f}"
        )
    return out


def metric_lines(rows: Sequence[tuple], record: dict[str, Any]) -> list[str]:
    """The table of shared metrics (ours, SAE Lens, |diff|, float32 ulps) and its worst row, from
    :func:`compare_metrics` rows and a :func:`summary_record`."""
    out = [f"  {'metric':32}{'ours':>16}{'SAE Lens':>16}{'|diff|':>10}{'f32 ulps':>10}"]
    for name, a, b, d in rows:
        out.append(f"  {name:32}{a:16.8g}{b:16.8g}{d:10.2g}{float32_ulps(a, b):10.1f}")
    worst = max(row[3] for row in rows)
    out.append(
        f"  max |diff| over shared metrics: {worst:.2g} ({record['max_abs_diff_metric']}); "
        f"at most {record['max_float32_ulps']:.1f} float32 ulps of SAE Lens' value"
    )
    return out


def case_report(
    case: Case,
    timings: Timings,
    ours: Any,
    anchor: Any,
    peak: dict[str, float | None],
    batch_size: int,
) -> tuple[list[str], dict[str, Any]]:
    all_metrics, feature_metrics = anchor
    rows, worst = compare_metrics(
        formula_values(ours),
        anchor_flat(all_metrics),
        ours.latent_density,
        feature_metrics["feature_density"],
    )
    record = {"name": case.name or case.key, **summary_record(timings, worst, peak, rows)}
    reference = float64_reference(case.model, case.sae, case.tokens, batch_size)
    record["error_vs_float64"] = float64_errors(rows, reference)
    n_seq, seq_len = case.tokens.shape
    out = [
        "",
        f"Configuration {case.key}: {case.title}",
        f"  {n_seq * seq_len} tokens ({n_seq} sequences x {seq_len}), batch {batch_size}, "
        f"{len(timings.seconds['ours'])} repetitions",
        *timing_lines(timings, peak),
    ]
    speed = pairwise_ratios(timings.seconds["anchor"], timings.seconds["ours"])
    med, lo, hi = spread(speed)
    out.append(f"  speedup anchor/ours, pair by pair: median {med:.2f}x (min {lo:.2f}x, max {hi:.2f}x)")
    if record.get("speedup_bound"):
        out.append(
            f"  no exact evaluation can beat anchor/bound: median {record['speedup_bound']:.2f}x "
            f"(bound = 1 forward pass + 1 SAE pass + the spliced suffix [+ the zero-ablated suffix inside a block] "
            f"= {record['bound_forward_passes']:.2f} forward passes)"
        )
    if record.get("speedup_cpu_time"):
        out.append(f"  (same ratio in process CPU time: {record['speedup_cpu_time']:.2f}x)")
    out += metric_lines(rows, record)
    out += float64_lines(record["error_vs_float64"])
    return out, record


def release_report(
    case: ReleaseCase,
    timings: Timings,
    results: dict[str, Any],
    peak: dict[str, float | None],
    batch_size: int,
) -> tuple[list[str], dict[str, Any]]:
    """The text and JSON record of a release: speedup and forward passes per SAE, the largest metric
    difference over every SAE (each arbitrated against a float64 recomputation), the cost of the joint
    splice, and how peak memory grows from one SAE to the set."""
    n = len(case.saes)
    ours_set, joint_set, anchors = results["ours"], results["joint"], results["anchor"]
    all_rows: list[tuple[str, float, float, float]] = []
    per_sae: dict[str, dict[str, Any]] = {}
    sae_rows: dict[str, list[tuple[str, float, float, float]]] = {}
    errors: dict[str, dict[str, float]] = {}
    for name, sae in case.saes.items():
        evaluation = ours_set[name]
        all_metrics, feature_metrics = anchors[name]
        rows, diff = compare_metrics(
            formula_values(evaluation),
            anchor_flat(all_metrics),
            evaluation.latent_density,
            feature_metrics["feature_density"],
        )
        all_rows += rows
        sae_rows[name] = rows
        values = {metric: (a, b) for metric, a, b, _ in rows}
        reference = float64_reference(case.model, sae, case.tokens, batch_size)
        sae_errors = {
            metric: {"ours": abs(values[metric][0] - exact), "anchor": abs(values[metric][1] - exact)}
            for metric, exact in reference.items()
        }
        for metric, pair in sae_errors.items():
            worst_so_far = errors.setdefault(metric, {"ours": 0.0, "anchor": 0.0})
            for side in ("ours", "anchor"):
                worst_so_far[side] = max(worst_so_far[side], pair[side])
        per_sae[name] = {
            "max_abs_diff": float(f"{diff:.3g}"),
            **worst_metric(rows),
            "max_error_vs_float64_ours": float(f"{max(e['ours'] for e in sae_errors.values()):.3g}"),
            "max_error_vs_float64_anchor": float(f"{max(e['anchor'] for e in sae_errors.values()):.3g}"),
        }
    worst_name = max(per_sae, key=lambda name: per_sae[name]["max_abs_diff"])
    worst = max(row[3] for row in all_rows)

    s = timings.seconds
    joint_ratio = pairwise_ratios(s["joint"], s["ours"])
    joint_passes = [v / n for v in pairwise_ratios(s["joint"], s["floor"])]
    joint_extra = [(j - o) / f for j, o, f in zip(s["joint"], s["ours"], s["floor"], strict=True)]
    # joint=True must leave every isolated evaluation as it is without it.
    isolated_drift = max(
        abs(value - joint_set[name].metrics.get(metric, math.inf))
        for name, evaluation in ours_set.items()
        for metric, value in evaluation.metrics.items()
    )
    compounding = dict(joint_set.compounding or {})
    one_sae, whole_set = peak.get("ours_one_sae"), peak.get("ours")
    growth = (
        (whole_set - one_sae) / (n - 1) if one_sae is not None and whole_set is not None and n > 1 else None
    )
    # The target: the set's peak exceeds one SAE's by no more than one variant's logits (one batch of float32
    # logits: the engine's template budget) besides the SAEs' own sums; their weights exist before and are not
    # counted here.
    logits_bytes = float(
        min(batch_size, case.tokens.shape[0]) * case.tokens.shape[1] * case.model.cfg.d_vocab_out * 4
    )
    growth_in_logits = (
        (whole_set - one_sae) / logits_bytes if one_sae is not None and whole_set is not None else None
    )
    sums = sum(sums_bytes(sae, case.tokens.shape[1]) for sae in list(case.saes.values())[1:])
    beyond_sums = (
        (whole_set - one_sae - sums) / logits_bytes if one_sae is not None and whole_set is not None else None
    )
    parts = results["bound"]
    record: dict[str, Any] = {
        "name": case.name or case.key,
        "n_saes": n,
        **summary_record(timings, worst, peak, all_rows, per_sae=n),
        "forward_passes_total": round(statistics.median(pairwise_ratios(s["ours"], s["floor"])), 3),
        "max_abs_diff_sae": worst_name,
        "error_vs_float64": {
            metric: {side: float(f"{value:.3g}") for side, value in pair.items()}
            for metric, pair in errors.items()
        },
        "seconds_joint": round(statistics.median(s["joint"]), 3),
        "joint_ratio": round(statistics.median(joint_ratio), 3),
        "joint_ratio_min": round(min(joint_ratio), 3),
        "joint_ratio_max": round(max(joint_ratio), 3),
        "joint_forward_passes": round(statistics.median(joint_passes), 3),
        "joint_extra_forward_passes": round(statistics.median(joint_extra), 3),
        "joint_isolated_max_diff": float(f"{isolated_drift:.3g}"),
        "joint_metrics": {
            metric: joint_set.joint.metrics[metric]
            for metric in ("ce_orig", "ce_sae", "delta_ce", "kl_sae")
            if joint_set.joint is not None and metric in joint_set.joint.metrics
        },
        "compounding": compounding,
        "peak_bytes_joint": peak.get("joint"),
        "peak_bytes_bound": peak.get("bound"),
        "peak_bytes_ours_one_sae": one_sae,
        "peak_bytes_per_extra_sae": growth,
        "peak_bytes_one_batch_of_logits": logits_bytes,
        "peak_growth_in_batches_of_logits": round(growth_in_logits, 3)
        if growth_in_logits is not None
        else None,
        "peak_bytes_sums_of_extra_saes": sums,
        "peak_growth_beyond_sums_in_batches_of_logits": round(beyond_sums, 3)
        if beyond_sums is not None
        else None,
        "bound_parts_seconds": {name: round(value, 3) for name, value in parts.items()},
        "per_sae": per_sae,
    }

    n_seq, seq_len = case.tokens.shape
    floor = s["floor"]
    out = [
        "",
        f"Configuration {case.key}: {case.title}",
        f"  {n_seq * seq_len} tokens ({n_seq} sequences x {seq_len}), batch {batch_size}, {len(floor)} "
        f"repetitions; ours = ONE evaluate() call on the {n} SAEs, SAE Lens = run_evals once per SAE",
        f"  {'':30}{'median':>10}{'min':>10}{'max':>10}{'peak memory':>14}{'fwd passes/SAE':>16}",
    ]
    for name, label in (
        ("floor", "floor (1 forward pass)"),
        ("bound", "exact minimum (bound)"),
        ("ours", f"ours ({n} SAEs, one pass)"),
        ("joint", "ours with joint=True"),
        ("anchor", f"anchor (SAE Lens, {n} calls)"),
    ):
        med, lo, hi = spread(s[name])
        passes = statistics.median(pairwise_ratios(s[name], floor)) / n
        out.append(
            f"  {label:30}{med:9.2f}s{lo:9.2f}s{hi:9.2f}s{fmt_bytes(peak.get(name)):>14}{passes:>16.2f}"
        )
    med, lo, hi = spread(pairwise_ratios(s["anchor"], s["ours"]))
    out.append(f"  speedup anchor/ours, pair by pair: median {med:.2f}x (min {lo:.2f}x, max {hi:.2f}x)")
    out.append(
        f"  no exact evaluation can beat anchor/bound: median {record['speedup_bound']:.2f}x (bound = 1 forward "
        f"pass + per SAE 1 SAE pass and its spliced suffix = {record['bound_forward_passes']:.2f} forward "
        "passes per SAE)"
    )
    if record.get("speedup_cpu_time"):
        out.append(f"  (same ratio in process CPU time: {record['speedup_cpu_time']:.2f}x)")
    med, lo, hi = spread(joint_ratio)
    out.append(
        f"  joint=True: {record['seconds_joint']:.2f} s, {med:.2f}x the set alone (min {lo:.2f}x, max {hi:.2f}x), "
        f"{record['joint_extra_forward_passes']:.2f} forward passes more in all; the isolated metrics it returns "
        f"differ from the set's by at most {isolated_drift:.2g}"
    )
    if compounding:
        ratio = compounding.get("ratio")
        interval = compounding.get("excess_interval")
        out.append(
            f"  compounding: joint delta CE {compounding['delta_ce_joint']:.4g} nats/token against the sum of the "
            f"isolated ones {compounding['delta_ce_isolated_sum']:.4g} (excess {compounding['excess']:.4g}"
            + (f", 95% interval [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "")
            + (f", ratio {ratio:.3g}" if ratio is not None else "")
            + ")"
        )
    if growth is not None and one_sae is not None and whole_set is not None:
        out.append(
            f"  peak memory: the set of {n} {fmt_bytes(whole_set)}, one SAE alone {fmt_bytes(one_sae)}: "
            f"{fmt_bytes(growth)} per extra SAE (tensors created during the evaluation; the SAEs' weights "
            "exist before and are not counted)"
        )
        out.append(
            f"  the set's peak exceeds one SAE's by {growth_in_logits:.2f} x one batch of logits "
            f"({fmt_bytes(logits_bytes)}); the {n - 1} extra SAEs' own sums are {fmt_bytes(sums)} "
            f"(sums_bytes), and beyond them the growth is {beyond_sums:.2f} x one batch of logits (the target: "
            "at most 1)"
        )
    total_parts = sum(parts.values())
    share = {name: 100 * value / total_parts if total_parts else math.nan for name, value in parts.items()}
    over_bound = pairwise_ratios(s["ours"], s["bound"])
    med, lo, hi = spread(over_bound)
    record["ours_over_bound"] = round(med, 3)
    out.append(
        f"  where the exact minimum's time goes (first repetition, {total_parts:.2f} s): original forward pass "
        f"{parts['original']:.2f} s ({share['original']:.0f}%), {n} SAE passes {parts['sae']:.2f} s "
        f"({share['sae']:.0f}%), {n} spliced suffixes with their unembeddings {parts['suffix']:.2f} s "
        f"({share['suffix']:.0f}%); ours / bound, pair by pair: median {med:.2f} (min {lo:.2f}, max {hi:.2f}; "
        "the rest of ours: zero-ablation templates, scoring, bookkeeping)"
    )
    own = results.get("ours_parts")
    if own:
        total = own["total"]
        rest = total - sum(value for name, value in own.items() if name != "total")
        shares = ", ".join(
            f"{name} {value:.2f} s ({100 * value / total:.0f}%)"
            for name, value in own.items()
            if name != "total"
        )
        out.append(
            f"  where ours' time goes (one more run under cProfile, {total:.2f} s): {shares}, the rest "
            f"(bookkeeping) {rest:.2f} s ({100 * rest / total:.0f}%)"
        )
        record["ours_parts_seconds"] = {name: round(value, 3) for name, value in own.items()}
    out.append(
        f"  {'SAE':28}{'ce_sae':>12}{'kl_sae':>12}{'max |diff|':>12}  {'metric':26}{'f32 ulps':>9}"
        f"{'f64 err ours':>14}{'f64 err SAE Lens':>18}"
    )
    for name, info in per_sae.items():
        metrics = ours_set[name].metrics
        out.append(
            f"  {name:28}{formula_values(ours_set[name])['ce_sae']:12.6g}{metrics['kl_sae']:12.4g}"
            f"{info['max_abs_diff']:12.2g}  {info['max_abs_diff_metric']:26}{info['max_float32_ulps']:9.1f}"
            f"{info['max_error_vs_float64_ours']:14.2g}{info['max_error_vs_float64_anchor']:18.2g}"
        )
    out.append(f"  every shared metric of the SAE with the largest difference, {worst_name}:")
    out.append(f"  {'metric':32}{'ours':>16}{'SAE Lens':>16}{'|diff|':>10}{'f32 ulps':>10}")
    for metric, a, b, d in sae_rows[worst_name]:
        out.append(f"  {metric:32}{a:16.8g}{b:16.8g}{d:10.2g}{float32_ulps(a, b):10.1f}")
    out.append(
        f"  max |diff| over the {n} SAEs and every shared metric: {worst:.2g} ({record['max_abs_diff_metric']}, "
        f"{worst_name}); at most {record['max_float32_ulps']:.1f} float32 ulps of SAE Lens' value"
    )
    for metric, pair in errors.items():
        out.append(
            f"  {metric} against a float64 recomputation, worst of the {n} SAEs: ours off by {pair['ours']:.2g}, "
            f"SAE Lens off by {pair['anchor']:.2g}"
        )
    if hasattr(os, "getloadavg"):
        out.append("  load average after this configuration: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return out, record


SEQUENTIAL_SHAPE = {
    "n_layers": 12,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "d_mlp": 256,
    "d_vocab": 1024,
    "n_ctx": 64,
}
"""The sequential release's model (``--sequential``): twelve layers like GPT-2 small, small enough for a CPU."""

SEQUENTIAL_FACTORS = (-8.0, 8.0, -4.0, 4.0, -2.0, 2.0, 0.0, -6.0, 6.0, -1.0, 1.0, 3.0)
"""Gate ``delta_ce ≤ ΔCE + factor × h`` per SAE, ``ΔCE`` and ``h`` (the half-width of its 95% interval) at the
ceiling: far (±8, ±6), clear (±4, 3), near (±2, ±1) and on the value (0): gates of mixed difficulty measured in the
noise of the estimate (a multiple of ΔCE itself means nothing for an SAE whose ΔCE is near 0)."""


def measure_sequential(
    n_sequences: int, batch_size: int, device: str, log: Callable[[str], None]
) -> tuple[list[str], dict[str, Any]]:
    """A 12-SAE release gated on ``delta_ce ≤ threshold`` at 95% confidence: the fixed budget (one shared pass over
    ``n_sequences``, and each SAE alone) against sequential evaluation (each SAE grown until decided). Tokens and wall
    time of each; every verdict compared."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from pytest_saecheck import evaluate

    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(**SEQUENTIAL_SHAPE, act_fn="gelu", seed=0, device=device)
    ).eval()
    saes = release_saes(model, 12, device, expansion=4, k=8)
    tokens = random_tokens(n_sequences, SEQUENTIAL_SHAPE["n_ctx"], SEQUENTIAL_SHAPE["d_vocab"]).to(device)
    options = {"batch_size": batch_size, "progress": False, "mean_ablation": False}
    log("  fixed budget: one shared pass")
    start = time.perf_counter()
    fixed = evaluate(model, saes, tokens, **options)
    fixed_shared_s = time.perf_counter() - start
    log("  fixed budget: each SAE alone")
    start = time.perf_counter()
    for sae in saes.values():
        evaluate(model, sae, tokens, **options)
    fixed_alone_s = time.perf_counter() - start
    rows, verdicts_equal = [], 0
    sequential_s = 0.0
    for (name, sae), factor in zip(saes.items(), SEQUENTIAL_FACTORS, strict=True):
        value = fixed[name].metrics["delta_ce"]
        low, high = fixed[name].confidence_interval("delta_ce", 0.95)
        threshold = value + factor * (high - low) / 2
        fixed_pass = high <= threshold
        log(f"  sequential: {name}, delta_ce ≤ {threshold:.4g}")
        start = time.perf_counter()
        grown = evaluate(
            model,
            sae,
            tokens,
            **options,
            sequential=[{"metric": "delta_ce", "max_value": threshold, "confidence": 0.95}],
        )
        sequential_s += time.perf_counter() - start
        (decision,) = grown.sequential["decisions"]
        if decision["verdict"] is None:
            sequential_pass = grown.confidence_interval("delta_ce", 0.95)[1] <= threshold
        else:
            sequential_pass = decision["verdict"] == "pass"
        verdicts_equal += sequential_pass == fixed_pass
        rows.append(
            {
                "sae": name,
                "factor": factor,
                "delta_ce": value,
                "threshold": threshold,
                "fixed": "pass" if fixed_pass else "fail",
                "sequential": "pass" if sequential_pass else "fail",
                "look": decision["look"],
                "rule": decision["rule"],
                "fixed_tokens": fixed[name].n_tokens,
                "sequential_tokens": grown.sequential["tokens_evaluated"],
            }
        )
    fixed_tokens = sum(row["fixed_tokens"] for row in rows)
    sequential_tokens = sum(row["sequential_tokens"] for row in rows)
    lines = [
        "",
        f"Sequential gates: a 12-SAE release ({SEQUENTIAL_SHAPE}, TopK SAEs k=8, 4x), {n_sequences} sequences x "
        f"{SEQUENTIAL_SHAPE['n_ctx']} (the ceiling), gate delta_ce ≤ ΔCE + factor x (its interval's half-width) at 95% confidence, device {device}",
        f"{'SAE':26s} {'factor':>6s} {'ΔCE':>9s} {'fixed':>5s} {'seq':>5s} {'look':>4s} {'tokens fixed':>12s} "
        f"{'tokens seq':>10s}  rule",
    ]
    for row in rows:
        lines.append(
            f"{row['sae']:26s} {row['factor']:6.2f} {row['delta_ce']:9.4g} {row['fixed']:>5s} {row['sequential']:>5s} "
            f"{row['look']:4d} {row['fixed_tokens']:12d} {row['sequential_tokens']:10d}  {row['rule']}"
        )
    lines.append(
        f"verdicts equal: {verdicts_equal}/12; tokens: fixed {fixed_tokens}, sequential {sequential_tokens} "
        f"({fixed_tokens / sequential_tokens:.2f}x fewer); wall: fixed one shared pass {fixed_shared_s:.1f} s, fixed "
        f"each SAE alone {fixed_alone_s:.1f} s, sequential {sequential_s:.1f} s"
    )
    record = {
        "rows": rows,
        "verdicts_equal": verdicts_equal,
        "fixed_tokens": fixed_tokens,
        "sequential_tokens": sequential_tokens,
        "fixed_shared_s": fixed_shared_s,
        "fixed_alone_s": fixed_alone_s,
        "sequential_s": sequential_s,
    }
    return lines, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=["1", "2", "3"],
        help="subset of 1,2,3,4,5,6 (4 or 'release': 12 SAEs in one pass; 5 or 'hf': the Hugging Face backend; "
        "6 or 'replacement': a cross-layer transcoder's replacement model; default 1,2,3)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one batch of 32-token sequences, 2 repetitions, a release of 3 SAEs",
    )
    parser.add_argument(
        "--release-saes",
        type=int,
        default=None,
        help="SAEs in the release (configuration 4), spread over the layers (default 12, --quick 3)",
    )
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the context)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--n-tokens",
        type=int,
        default=None,
        help="tokens per configuration (default 1024 = one batch of 8 x 128; demo: 64 sequences)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3, --quick 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch for both (default 8)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--sequential",
        type=int,
        default=None,
        metavar="N_SEQUENCES",
        help="only the sequential-gates release: 12 SAEs, gates of mixed difficulty, N_SEQUENCES the ceiling",
    )
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (2 if args.quick else 3)
    seq_len = args.seq_len or (32 if args.quick else None)
    n_tokens = args.n_tokens or (args.batch_size * (seq_len or 128) if args.quick else None)
    if seq_len is not None and seq_len < 2:
        parser.error("--seq-len must be at least 2")
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    n_release = args.release_saes or (3 if args.quick else GPT2_SHAPE["n_layers"])
    if not 2 <= n_release <= GPT2_SHAPE["n_layers"]:
        parser.error(f"--release-saes must be between 2 and {GPT2_SHAPE['n_layers']}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    started = time.perf_counter()
    if args.sequential is not None:
        warnings.filterwarnings("ignore")
        text, record = measure_sequential(args.sequential, args.batch_size, device, log)
        print("\n".join([*text, f"total wall time {time.perf_counter() - started:.0f} s"]))
        print(json.dumps({"sequential": record}, sort_keys=True))
        return 0
    cases, skipped = build_cases(
        [key for key in args.configs if key not in OWN_MEASURES],
        n_tokens,
        args.batch_size,
        device,
        log,
        seq_len,
        n_release,
    )
    lines = [
        f"pytest-saecheck engine vs SAE Lens evaluation ({describe_machine(device)}, device {device})",
        "Both compute the same metric set on the same positions: every position spliced, zero-ablated and scored",
        f"(ours: {', '.join(f'{key}={value}' for key, value in AS_RUN_EVALS.items())}; SAE Lens: run_evals, "
        "exclude_special_tokens=False);",
        "the same SAE object serves both. Times are per evaluation of the whole token set.",
    ]
    records: dict[str, Any] = {}
    for case in cases:
        log(f"configuration {case.key}: {case.title}")
        if isinstance(case, ReleaseCase):
            timings, results, peak = measure_release(
                case, args.batch_size, repeats, device, not args.no_memory, log
            )
            text, records[case.key] = release_report(case, timings, results, peak, args.batch_size)
        else:
            timings, ours, anchor, peak = measure_case(
                case, args.batch_size, repeats, device, not args.no_memory, log
            )
            text, records[case.key] = case_report(case, timings, ours, anchor, peak, args.batch_size)
        lines += text
    if HF_KEY in args.configs:
        log(f"configuration {HF_KEY}: the Hugging Face backend")
        text, records[HF_KEY] = measure_hf(n_tokens, args.batch_size, repeats, device, seq_len, log)
        lines += text
    if REPLACEMENT_KEY in args.configs:
        log(f"configuration {REPLACEMENT_KEY}: a cross-layer transcoder's replacement model")
        text, records[REPLACEMENT_KEY] = measure_replacement(
            n_tokens, args.batch_size, repeats, device, seq_len, args.quick, log
        )
        lines += text
    for key, reason in skipped.items():
        lines.append(f"\nConfiguration {key}: SKIPPED - {reason}")
        records[key] = {"skipped": reason}
    lines.append(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    print(json.dumps(records, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
