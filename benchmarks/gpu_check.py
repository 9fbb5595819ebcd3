"""The GPU checks of the model backends, in one short run that prints one table (``benchmarks/gpu_check.sh``).

One GPT-2-small-shaped model (transformers ``GPT2LMHeadModel``, random weights, seed 0) and its TransformerLens
twin (TransformerLens' own weight conversion), one TopK SAE at the residual stream before block 6
(``blocks.6.hook_resid_pre`` on TransformerLens, ``transformer.h.5`` output on Hugging Face), the same tokens.
Rows:

- ``tl float32`` and ``hf float32``: the two backends on the same weights (their metrics should agree to 1e-5);
- ``hf bfloat16`` and ``tl bfloat16``: the forward pass in bf16, the SAE in float32, sums in float64 (how far bf16
  metrics lie from float32 ones, and the speed-up);
- ``hf float32 2-device``: the layers split over ``cuda:0`` and ``cuda:1`` by an explicit device map (accelerate)
  when two GPUs are visible (the numbers of the one-device run);
- ``hf float32 device_map=auto``: the model saved and loaded again with ``device_map="auto"`` and a ``max_memory``
  that leaves the first GPU room for half of it, so accelerate splits it over every visible GPU (the devices it
  used are named in the row; the numbers of the one-device run). The dry run splits it between the CPU and disk
  offload (weights on the meta device, computed on the CPU), what accelerate allows without a GPU.

Each row: seconds of one ``evaluate`` (median of ``--repeats`` after a warm-up), and the headline metrics with their
largest difference from ``hf float32``. ``--dry-run`` runs every row on the CPU with a two-layer model (the
two-device row on a CPU device map), to check the script itself where there is no GPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any

METRICS = ("ce_orig", "delta_ce", "kl_sae", "ce_loss_score", "explained_variance", "l0")


def build(n_layers: int, d_model: int, n_heads: int, vocab: int, n_ctx: int, device: str) -> tuple[Any, Any]:
    """The Hugging Face model and its TransformerLens twin, float32, on ``device``."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=n_ctx, vocab_size=vocab)
    hf = GPT2LMHeadModel(config).eval()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        d_mlp=4 * d_model,
        d_vocab=vocab,
        n_ctx=n_ctx,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=config.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel",
        device=device,
    )
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return hf.to(device), tl.to(device).eval()


def topk_sae(hook: str, d_in: int, device: str) -> Any:
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(1)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=16 * d_in, k=32, device=device)
    cfg.metadata.hook_name = hook
    return TopKSAE(cfg).eval()


def timed(fn: Any, repeats: int, device: str) -> tuple[float, Any]:
    import torch

    fn()  # warm-up
    seconds, result = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def two_device_map(n_layers: int, devices: tuple[str, str]) -> dict[str, str]:
    """Embeddings and the first half of the blocks on ``devices[0]``, the rest and the head on ``devices[1]``."""
    first, second = devices
    half = n_layers // 2
    return {
        "transformer.wte": first,
        "transformer.wpe": first,
        "transformer.drop": first,
        **{f"transformer.h.{i}": first if i < half else second for i in range(n_layers)},
        "transformer.ln_f": second,
        "lm_head": second,
    }


def auto_mapped(hf: Any, n_gpus: int, dry_run: bool) -> tuple[Any, str]:
    """``hf`` saved, then loaded with ``device_map="auto"`` and a ``max_memory`` that cannot hold it on the first
    device alone: over the visible GPUs, or (dry run) the CPU and disk offload. Returns the model and the devices
    its map names."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    folder = tempfile.mkdtemp(prefix="gpu_check_")
    hf.save_pretrained(folder)
    size = sum(p.numel() * p.element_size() for p in hf.parameters())
    if dry_run:
        max_memory: dict[Any, Any] = {"cpu": size // 2}
    else:
        max_memory = {
            0: size // 2,
            **{i: torch.cuda.get_device_properties(i).total_memory for i in range(1, n_gpus)},
        }
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        device_map="auto",
        max_memory=max_memory,
        offload_folder=f"{folder}/offload",
    ).eval()
    placed = ", ".join(sorted({str(device) for device in model.hf_device_map.values()}))
    return model, placed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every row on the CPU with a tiny model")
    parser.add_argument(
        "--n-tokens", type=int, default=None, help="tokens evaluated (default 32768; dry run 256)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    import warnings

    import torch
    from accelerate import dispatch_model

    from pytest_saecheck import evaluate

    warnings.filterwarnings("ignore")
    if args.dry_run:
        device, shape, n_tokens = "cpu", (2, 64, 4, 1000, 32), args.n_tokens or 256
    else:
        if not torch.cuda.is_available():
            print(
                "no CUDA device is visible; run with --dry-run to check the script on the CPU",
                file=sys.stderr,
            )
            return 2
        device, shape, n_tokens = "cuda", (12, 768, 12, 50257, 128), args.n_tokens or 32768
    n_layers, d_model, _, vocab, n_ctx = shape
    hf, tl = build(*shape, device=device)
    block = n_layers // 2
    tl_sae = topk_sae(f"blocks.{block}.hook_resid_pre", d_model, device)
    hf_sae = copy.deepcopy(tl_sae)
    hf_sae.cfg.metadata.hook_name = f"transformer.h.{block - 1}"
    tokens = torch.randint(
        0, vocab, (max(n_tokens // n_ctx, 1), n_ctx), generator=torch.Generator().manual_seed(2)
    )
    options = {"batch_size": args.batch_size, "progress": False, "exclude_special_tokens": False}

    rows: list[tuple[str, float, dict[str, float]]] = []

    def row(label: str, model: Any, sae: Any) -> None:
        seconds, result = timed(lambda: evaluate(model, sae, tokens, **options), args.repeats, device)
        rows.append((label, seconds, dict(result.metrics)))

    row("hf float32", hf, hf_sae)
    row("tl float32", tl, tl_sae)
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    if args.dry_run or n_gpus >= 2:
        devices = ("cpu", "cpu") if args.dry_run else ("cuda:0", "cuda:1")
        spread = dispatch_model(
            copy.deepcopy(hf).to(devices[0]), device_map=two_device_map(n_layers, devices), force_hooks=True
        )
        row(f"hf float32 2-device ({devices[0]}, {devices[1]})", spread, hf_sae)
    else:
        rows.append(("hf float32 2-device: skipped (one GPU visible)", float("nan"), {}))
    if args.dry_run or n_gpus >= 2:
        auto, placed = auto_mapped(hf, n_gpus, args.dry_run)
        row(f"hf float32 device_map=auto ({placed})", auto, hf_sae)
    else:
        rows.append(("hf float32 device_map=auto: skipped (one GPU visible)", float("nan"), {}))
    bf16_ok = args.dry_run or torch.cuda.is_bf16_supported()
    if bf16_ok:
        row("hf bfloat16 (SAE float32)", copy.deepcopy(hf).to(torch.bfloat16), hf_sae)
        tl_bf16 = copy.deepcopy(tl).to(torch.bfloat16)
        tl_bf16.cfg.dtype = torch.bfloat16
        row("tl bfloat16 (SAE float32)", tl_bf16, tl_sae)

    reference = rows[0][2]
    header = ["run", "seconds", "x hf float32", *METRICS, "max |diff| vs hf float32"]
    table = [header]
    for label, seconds, metrics in rows:
        if not metrics:
            table.append([label, "-", "-", *["-"] * len(METRICS), "-"])
            continue
        diff = max(
            abs(metrics[name] - reference[name]) for name in METRICS if name in metrics and name in reference
        )
        table.append(
            [
                label,
                f"{seconds:.3f}",
                f"{rows[0][1] / seconds:.2f}",
                *[f"{metrics[name]:.6g}" if name in metrics else "undefined" for name in METRICS],
                f"{diff:.2e}",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    machine = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    print(
        f"gpu_check: {machine}, {n_gpus} GPU(s) visible; GPT-2-shaped model ({n_layers} layers, d_model {d_model}), "
        f"TopK SAE at the residual before block {block}, {tokens.numel()} tokens"
    )
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
