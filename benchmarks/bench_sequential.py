"""Benchmark: the main job (the demo's acceptance tests in ``examples/``) at a fixed budget and sequentially.

Usage::

    python benchmarks/bench_sequential.py                   # ceiling = the examples' budget (n_tokens default)
    python benchmarks/bench_sequential.py --n-tokens 4096   # a smaller ceiling

Runs ``pytest examples/`` twice in subprocesses, with the same settings, once as it is and once with
``--saecheck-sequential=true`` (``n_tokens`` the ceiling), each writing ``--saecheck-json``. Prints, per test, both
outcomes (they must be equal), per SAE the tokens evaluated by each run, how each gate was decided, and the total
tokens and wall time of each run. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run(examples: Path, json_path: Path, extra: list[str]) -> tuple[dict[str, Any], float]:
    """One pytest run of ``examples`` writing ``json_path``: (the document, wall seconds)."""
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            str(examples),
            f"--saecheck-json={json_path}",
            *extra,
        ],
        cwd=examples,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return json.loads(json_path.read_text()), time.perf_counter() - started


def outcomes(document: dict[str, Any]) -> dict[str, str]:
    return {test["id"] if "id" in test else test["nodeid"]: test["outcome"] for test in document["tests"]}


def tokens_by_sae(document: dict[str, Any]) -> dict[str, int]:
    """Tokens evaluated per SAE: a sequential run's count over its looks, else the evaluation's own."""
    out: dict[str, int] = {}
    for sae in document["saes"]:
        if not sae.get("evaluated"):
            continue
        sequential = sae.get("sequential")
        count = sequential["tokens_evaluated"] if sequential else sae["tokens"]["n_tokens"]
        out[_key(sae)] = int(count or 0)
    return out


def _key(sae: dict[str, Any]) -> str:
    """An SAE entry's name across the two runs (their ids differ: the sequential setting is part of them)."""
    grouping = f" groups={sae['grouping']}" if sae.get("grouping") else ""
    return f"{sae['label']} @{sae['tokens'].get('requested_n_tokens')}{grouping}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n-tokens", type=int, default=None, help="ceiling (default: the examples' own budget)"
    )
    parser.add_argument("--examples", type=Path, default=ROOT / "examples")
    args = parser.parse_args(argv)
    extra = [] if args.n_tokens is None else [f"--saecheck-n-tokens={args.n_tokens}"]
    with tempfile.TemporaryDirectory() as tmp:
        fixed, fixed_s = run(args.examples, Path(tmp) / "fixed.json", extra)
        sequential, sequential_s = run(
            args.examples, Path(tmp) / "sequential.json", [*extra, "--saecheck-sequential=true"]
        )
    fixed_outcomes, sequential_outcomes = outcomes(fixed), outcomes(sequential)
    differ = {
        t: (fixed_outcomes.get(t), sequential_outcomes.get(t))
        for t in sorted(set(fixed_outcomes) | set(sequential_outcomes))
        if fixed_outcomes.get(t) != sequential_outcomes.get(t)
    }
    fixed_tokens, sequential_tokens = tokens_by_sae(fixed), tokens_by_sae(sequential)
    print(f"tests: {len(fixed_outcomes)}; outcomes that differ: {len(differ)} {differ if differ else ''}")
    print(f"{'SAE @ ceiling':40s} {'fixed':>9s} {'sequential':>11s}  gates (look, rule)")
    gates = {_key(sae): (sae.get("sequential") or {}).get("gates", []) for sae in sequential["saes"]}
    for name in sorted(set(fixed_tokens) | set(sequential_tokens)):
        shown = "; ".join(
            f"{g['metric']}: {g['verdict'] or 'ceiling'} @{g['look']}" for g in gates.get(name, [])
        )
        print(f"{name:40s} {fixed_tokens.get(name, 0):9d} {sequential_tokens.get(name, 0):11d}  {shown}")
    total_fixed, total_sequential = sum(fixed_tokens.values()), sum(sequential_tokens.values())
    ratio = total_fixed / total_sequential if total_sequential else float("nan")
    print(
        f"total tokens: fixed {total_fixed}, sequential {total_sequential} ({ratio:.2f}x fewer); "
        f"wall: fixed {fixed_s:.0f} s, sequential {sequential_s:.0f} s"
    )
    print(
        json.dumps(
            {
                "tests": len(fixed_outcomes),
                "differ": differ,
                "fixed_tokens": fixed_tokens,
                "sequential_tokens": sequential_tokens,
                "ratio": ratio,
                "fixed_s": fixed_s,
                "sequential_s": sequential_s,
            }
        )
    )


if __name__ == "__main__":
    main()
