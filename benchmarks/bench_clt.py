"""Benchmark: a cross-layer transcoder's replacement model, its cost in forward passes and its weight memory.

Usage::

    python benchmarks/bench_clt.py                 # 4 layers, d_model 128, 1024 features per layer, 4096 tokens
    python benchmarks/bench_clt.py --quick         # smoke run
    python benchmarks/bench_clt.py --device cuda --n-layers 12 --d-model 768 --d-sae 8192

A random ReLU CLT over every MLP of a random TransformerLens model is written in circuit-tracer's folder layout
and loaded from disk. Timed on the same token batches (median of ``--repeats``, interleaved):

``floor``        one plain forward pass of the model over the tokens;
``replacement``  ``evaluate_replacement(..., alone=False)``: the original pass and ONE pass with every MLP
                 replaced at once, each layer's reconstruction scored inside it and on the original inputs;
``with_alone``   the same with ``alone=True``: also each layer spliced alone (one more pass per layer), for the
                 per-layer ΔCE and the compounding.

Reported in forward passes (time / floor). Memory: the weights are evaluated under a budget of a quarter of their
total (``weight_budget_bytes``): the CLT is streamed, and ``weight_peak_bytes`` is the most bytes of CLT tensors
alive at once, counted exactly by the weight cache (each tensor counted until freed); the resident run's peak is
the whole. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def build(args: argparse.Namespace, folder: Path) -> tuple[Any, torch.Tensor]:
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=args.n_layers,
        d_model=args.d_model,
        n_ctx=args.seq_len,
        d_head=args.d_model // 4,
        n_heads=4,
        d_mlp=4 * args.d_model,
        d_vocab=args.d_vocab,
        act_fn="relu",
        normalization_type="LN",
        device=args.device,
    )
    model = HookedTransformer(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(
        "model_name: bench\nmodel_kind: cross_layer_transcoder\n"
        "feature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"
    )
    n, d, f = args.n_layers, args.d_model, args.d_sae
    for layer in range(n):
        save_file(
            {
                f"W_enc_{layer}": torch.randn(f, d) / d**0.5,
                f"b_enc_{layer}": torch.full((f,), -0.5),
                f"b_dec_{layer}": torch.zeros(d),
            },
            str(folder / f"W_enc_{layer}.safetensors"),
        )
        save_file(
            {f"W_dec_{layer}": torch.randn(f, n - layer, d) * 0.02},
            str(folder / f"W_dec_{layer}.safetensors"),
        )
    tokens = torch.randint(1, args.d_vocab, (args.n_tokens // args.seq_len, args.seq_len))
    return model, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--d-vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.n_tokens, args.repeats, args.d_sae = 512, 1, 256

    from pytest_saecheck.engine.replacement import evaluate_replacement
    from pytest_saecheck.loading.clt import load_clt

    with tempfile.TemporaryDirectory() as tmp:
        model, tokens = build(args, Path(tmp) / "clt")
        tokens = tokens.to(args.device)
        clt = load_clt(Path(tmp) / "clt")
        options = {"batch_size": args.batch_size, "progress": False}

        def floor() -> None:
            with torch.inference_mode():
                for start in range(0, tokens.shape[0], args.batch_size):
                    model(tokens[start : start + args.batch_size])

        runs = {
            "floor": floor,
            "replacement": lambda: evaluate_replacement(model, clt, tokens, alone=False, **options),
            "with_alone": lambda: evaluate_replacement(model, clt, tokens, alone=True, **options),
        }
        for run in runs.values():  # warm-up (the resident CLT reads its weights once here)
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name in list(runs)[repeat % len(runs) :] + list(runs)[: repeat % len(runs)]:
                started = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - started)
        median = {name: statistics.median(values) for name, values in times.items()}
        decoder_bytes = sum(4 * args.d_sae * (args.n_layers - s) * args.d_model for s in range(args.n_layers))
        streamed = load_clt(Path(tmp) / "clt", weight_budget_bytes=decoder_bytes // 4)
        result = evaluate_replacement(model, streamed, tokens, alone=False, **options)
        resident = evaluate_replacement(model, clt, tokens, alone=False, **options)
    report = {
        "config": vars(args),
        "seconds": median,
        "forward_passes": {name: median[name] / median["floor"] for name in ("replacement", "with_alone")},
        "forward_passes_by_design": {"replacement": 2, "with_alone": 2 + args.n_layers},
        "weight_bytes": clt.weight_bytes,
        "decoder_bytes": decoder_bytes,
        "budget_bytes": decoder_bytes // 4,
        "streamed_peak_bytes": result.dictionary["weight_peak_bytes"],
        "resident_peak_bytes": resident.dictionary["weight_peak_bytes"],
        "same_delta_ce": abs(result.metrics["delta_ce"] - resident.metrics["delta_ce"]),
    }
    for name, value in report["seconds"].items():
        print(f"{name:12s} {value:8.3f} s")
    for name, value in report["forward_passes"].items():
        print(
            f"{name:12s} {value:8.2f} forward passes (by design {report['forward_passes_by_design'][name]})"
        )
    print(
        f"weights {clt.weight_bytes / 2**20:.1f} MiB, decoders {decoder_bytes / 2**20:.1f} MiB, budget "
        f"{decoder_bytes / 4 / 2**20:.1f} MiB: streamed peak {report['streamed_peak_bytes'] / 2**20:.2f} MiB, "
        f"resident peak {report['resident_peak_bytes'] / 2**20:.1f} MiB, |ΔCE streamed − resident| "
        f"{report['same_delta_ce']:.2e}"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
