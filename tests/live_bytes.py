"""The engine tests' memory tracker: the peak of live tensor bytes, counted op by op (a ``TorchDispatchMode``).

It has one home, ``benchmarks/bench_engine.py`` (``_live_tensor_bytes``), which measures the benchmarks' peaks
with it; the tests load that script by path (it is not a package module).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCH_ENGINE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"


def bench_engine() -> Any:
    """``benchmarks/bench_engine.py`` as a module (loaded once by path, kept in ``sys.modules``)."""
    loaded = sys.modules.get("bench_engine")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location("bench_engine", BENCH_ENGINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def LiveTensorBytes() -> Any:  # named as the class it returns an instance of
    """A new tracker: ``with tracker: ...``, then ``tracker.peak`` (bytes)."""
    return bench_engine()._live_tensor_bytes()
