"""``benchmarks/gpu_check.sh --dry-run``: every row of the GPU checks runs on the CPU and agrees with the one-device
run (the script itself is checked where there is no GPU; the GPU numbers come from running it on one)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


def test_the_dry_run_prints_every_row_with_the_one_device_numbers(capsys: pytest.CaptureFixture[str]):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--dry-run", "--repeats", "1", "--n-tokens", "128"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("run "))
    rows = {line.split("  ")[0]: line for line in lines[header + 1 :]}
    labels = list(rows)
    assert labels[:2] == ["hf float32", "tl float32"]
    assert any(label.startswith("hf float32 2-device (cpu, cpu)") for label in labels)
    assert any(label.startswith("hf float32 device_map=auto (") and "disk" in label for label in labels)
    assert any(label.startswith("hf bfloat16") for label in labels)
    for label, line in rows.items():
        difference = float(line.split()[-1])
        assert math.isfinite(difference), label
        if "bfloat16" not in label:  # the float32 rows are the one-device numbers; bf16 rows report how far
            assert difference < 1e-5, label


def test_the_memory_step_measures_each_size_in_its_own_process():
    """``gpu_check.sh``'s second step (``memory_scale.py``), on the CPU with the tiny subject: one row per size,
    each a fresh process on the device asked for, peaks at least what was resident before the evaluation."""
    import json
    import subprocess
    import sys

    script = SCRIPT.parent / "memory_scale.py"
    done = subprocess.run(
        [sys.executable, str(script), "--subject", "tiny", "--n-tokens", "512,1024", "--device", "cpu"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["n_tokens"] for row in rows] == [512, 1024]
    for row in rows:
        assert row["device"] == "cpu" and "device_peak_mib" not in row  # device peaks are CUDA's only
        assert row["peak_mib"] >= row["peak_before_mib"] > 0
        assert math.isfinite(row["delta_ce"])
    assert "evaluation growth over 512 tokens" in done.stdout
