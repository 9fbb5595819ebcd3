"""Scale study on paper: the cost model (``pytest_saecheck.engine.cost``) for two real releases on 1, 8, 64 GPUs,
and a check of the model against measured CPU rates on small configurations.

Usage::

    python benchmarks/scale_study.py              # the table (seconds) and the CPU check (minutes on 2 cores)
    python benchmarks/scale_study.py --no-check   # the table only

Assumptions, stated: an 80 GiB GPU (H100) sustains ``--gpu-tflops`` (default 300) bf16 TFLOP/s on these
matrix products; every GPU holds a replica of the model (no tensor parallelism) and runs whole passes; the
passes of a release are spread over the GPUs, largest first to the least loaded (LPT), and a group is split
when there are more GPUs than passes. Releases:

- Gemma Scope 2, Gemma 3 27B: 248 transcoders (4 per layer over 62 layers), width 262,144, d_model 5,376,
  bf16 (5.6 GB each, 1.4 TB in all); model 62 layers, d_mlp 21,504, vocabulary 262,144.
- Gemma Scope, Gemma 2 2B residual stream: 26 SAEs (one per layer), width 16,384, float32; model 26 layers,
  d_model 2,304, d_mlp 9,216, vocabulary 256,000, bf16.

Tokens: 1,048,576 in rows of 1,024, batch 8.
"""

from __future__ import annotations

import argparse
import json
import time

from pytest_saecheck.engine.cost import ModelShape, SAEShape, memory_groups, pass_cost

GIB = 2**30
N_TOKENS, SEQ_LEN, BATCH = 1_048_576, 1024, 8

RELEASES = {
    "Gemma Scope 2 27B transcoders (248 x 262k, bf16)": (
        ModelShape(n_layers=62, d_model=5376, d_mlp=21504, d_vocab=262_144, dtype_bytes=2),
        [SAEShape(d_in=5376, d_sae=262_144, layer=i // 4, dtype_bytes=2) for i in range(248)],
    ),
    "Gemma Scope 2B residual (26 x 16k, fp32)": (
        ModelShape(n_layers=26, d_model=2304, d_mlp=9216, d_vocab=256_000, dtype_bytes=2),
        [SAEShape(d_in=2304, d_sae=16_384, layer=i, dtype_bytes=4) for i in range(26)],
    ),
}


def _makespan(work: list[float], workers: int) -> float:
    """Longest worker's total when each job goes to the least loaded worker, largest first (LPT)."""
    loads = [0.0] * workers
    for job in sorted(work, reverse=True):
        loads[loads.index(min(loads))] += job
    return max(loads)


def study(gpu_tflops: float, budget_gib: float = 80.0) -> list[dict[str, object]]:
    rows = []
    for name, (model, saes) in RELEASES.items():
        groups = memory_groups(model, saes, N_TOKENS, SEQ_LEN, BATCH, int(budget_gib * GIB))
        one_at_a_time = [pass_cost(model, [s], N_TOKENS, SEQ_LEN, BATCH).flops for s in saes]
        for gpus in (1, 8, 64):
            # more GPUs than passes: split the groups so that every GPU has a pass (never more than one per SAE)
            split = groups
            if len(groups) < gpus:
                members = [i for g in groups for i in g]
                parts = min(gpus, len(members))
                split = [members[k::parts] for k in range(parts)]
            costs = [pass_cost(model, [saes[i] for i in g], N_TOKENS, SEQ_LEN, BATCH) for g in split]
            rows.append(
                {
                    "release": name,
                    "gpus": gpus,
                    "passes": len(split),
                    "saes_per_pass": max(len(g) for g in split),
                    "peak_gib_per_gpu": round(max(c.peak_bytes for c in costs) / GIB, 1),
                    "hours": round(_makespan([c.flops for c in costs], gpus) / (gpu_tflops * 1e12) / 3600, 2),
                    "hours_one_sae_per_pass": round(
                        _makespan(one_at_a_time, gpus) / (gpu_tflops * 1e12) / 3600, 2
                    ),
                }
            )
    return rows


def cpu_check(n_tokens: int = 4096) -> dict[str, float]:
    """Predicted against measured time of a 4-SAE pass, at the rate measured on a 1-SAE pass (demo model)."""
    import warnings

    from pytest_saecheck import demo, evaluate
    from pytest_saecheck.engine.cost import shapes_of

    warnings.simplefilter("ignore")
    model = demo.load_model()
    saes = [demo.load_sae(name) for name in (*demo.SAE_NAMES, "good")]
    tokens = demo.load_tokens(n_sequences=n_tokens // demo.N_CTX)
    shape, sae_shapes = shapes_of(model, saes)
    measured = {}
    for count in (1, 4):
        subject = {f"s{i}": saes[i] for i in range(count)} if count > 1 else saes[0]
        evaluate(model, subject, tokens[:16], progress=False)  # warm-up
        started = time.perf_counter()
        evaluate(model, subject, tokens, progress=False)
        measured[count] = time.perf_counter() - started
    flops = {c: pass_cost(shape, sae_shapes[:c], tokens.numel(), demo.N_CTX, 16).flops for c in (1, 4)}
    rate = flops[1] / measured[1]
    return {
        "measured_1_s": measured[1],
        "measured_4_s": measured[4],
        "predicted_4_s": flops[4] / rate,
        "ratio_predicted_over_measured": flops[4] / rate / measured[4],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-tflops", type=float, default=300.0)
    parser.add_argument("--no-check", action="store_true")
    args = parser.parse_args()
    rows = study(args.gpu_tflops)
    print("| release | GPUs | passes | SAEs/pass | peak GiB/GPU | hours | hours, one SAE per pass |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['release']} | {r['gpus']} | {r['passes']} | {r['saes_per_pass']} | {r['peak_gib_per_gpu']} | "
            f"{r['hours']} | {r['hours_one_sae_per_pass']} |"
        )
    check = {} if args.no_check else cpu_check()
    print(json.dumps({"rows": rows, "cpu_check": check}))


if __name__ == "__main__":
    main()
