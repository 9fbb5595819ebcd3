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
