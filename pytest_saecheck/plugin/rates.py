"""This machine's measured rates, kept between runs in pytest's cache (``.pytest_cache``, through
``config.cache``), and the time estimate of a run made from them.

A run without pytest-xdist records, per kind of device, the rate of its evaluation passes (the cost model's FLOPs,
:func:`pytest_saecheck.engine.cost.pass_cost`, per second of wall time: the announced passes' FLOPs summed over
their seconds summed) and the wall time it spent outside its planned release passes (imports, model and SAE
loads, tests that run no release pass). ``--saecheck-plan`` and the line a run prints before its first test
estimate the time as the planned passes' FLOPs at the recorded rate plus the recorded time outside them. With no
run recorded on this machine, a matrix-product rate measured on the spot (:func:`calibrate`) stands in for the
passes' rate (an optimistic one: passes also normalise, score and move memory), and the rest is not estimated.

Imports no torch at import time.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

CACHE_PREFIX = "saecheck/rates/"
"""Key prefix in pytest's cache; the device kind (:func:`device_kind`) completes it."""

STARTED_KEY = pytest.StashKey[float]()
"""``time.perf_counter()`` when the run started (:func:`run_started`; the record's wall time counts from there)."""

_first_run = True

CALIBRATION_SECONDS = 0.2
"""How long :func:`calibrate` multiplies matrices for (it stops after the first repetition past this)."""

CALIBRATION_MAX_FLOPS = 2e9
"""The most FLOPs one calibration product may cost: its rows are cut to fit (a 27B model's batch of 8,192 rows
times 5,376 × 21,504 would be 1.9 TFLOP, tens of seconds on a CPU)."""

CALIBRATION_MAX_WIDTH = 4096
"""The widest a calibration operand gets (widths beyond it run at about the same rate; operands stay small)."""


@dataclass(frozen=True)
class Rates:
    """What the last recorded run on one kind of device measured.

    ``flops_per_second``: its passes' FLOPs (the cost model's count) per second of their wall time; None when no
    run with a pass was recorded. ``other_seconds``: the run's wall time outside its planned release passes, in
    seconds. ``n_tests``: the tests it ran. ``recorded``: when, as an ISO 8601 UTC time. ``measured``: where the
    rate comes from (``"recorded"`` from a run, ``"calibrated"`` from :func:`calibrate` just now).
    """

    flops_per_second: float | None
    other_seconds: float | None
    n_tests: int
    recorded: str
    measured: str = "recorded"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rates | None:
        """The record as stored, or None for anything else (an older or damaged cache file is not an error)."""
        try:
            rate = data.get("flops_per_second")
            other = data.get("other_seconds")
            rates = cls(
                flops_per_second=None if rate is None else float(rate),
                other_seconds=None if other is None else float(other),
                n_tests=int(data["n_tests"]),
                recorded=str(data["recorded"]),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        if (rates.flops_per_second is not None and not rates.flops_per_second > 0) or (
            rates.other_seconds is not None and not rates.other_seconds >= 0
        ):
            return None  # NaN, zero or negative: no usable measurement
        return rates


@dataclass
class PassClock:
    """The passes of this run: FLOPs and seconds of every announced pass, and the seconds of the planned release
    passes among them (what the plan estimates), with the device they ran on."""

    flops: float = 0.0
    seconds: float = 0.0
    planned_seconds: float = 0.0
    device: str | None = None

    def add(self, flops: float, seconds: float, device: str, *, planned: bool) -> None:
        self.flops += flops
        self.seconds += seconds
        if planned:
            self.planned_seconds += seconds
        self.device = device

    @property
    def flops_per_second(self) -> float | None:
        return self.flops / self.seconds if self.seconds > 0 and self.flops > 0 else None


def run_started() -> float:
    """When this run started, on ``time.perf_counter()``'s clock: the process's start for the first run in a
    process (Linux ``/proc/self/stat`` against ``/proc/uptime``, so pytest's and the plug-ins' imports count, as
    they do in the command's wall time), now for a later one (``pytester``'s in-process runs) or where ``/proc``
    is not readable."""
    global _first_run
    now = time.perf_counter()
    first, _first_run = _first_run, False
    if not first:
        return now
    try:
        after_paren = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(after_paren[19])  # field 22, "starttime", in clock ticks after boot (proc(5))
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0 <= age < 3600 else now


def device_kind(device: str) -> str:
    """The cache key's device part: the device's type (``cpu``, ``cuda``, ``mps``), with the GPU's name for CUDA
    (a record from one card does not estimate another)."""
    kind = device.split(":", 1)[0]
    if kind == "cuda":
        import torch

        if torch.cuda.is_available():
            return f"cuda/{torch.cuda.get_device_name(torch.device(device))}"
    return kind


def read(config: pytest.Config, device: str) -> Rates | None:
    """The record for ``device``'s kind in pytest's cache; None without one (or with the cache provider off)."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return None
    stored = cache.get(CACHE_PREFIX + device_kind(device), None)
    return Rates.from_dict(stored) if isinstance(stored, Mapping) else None


def record(config: pytest.Config, clock: PassClock, n_tests: int) -> Rates | None:
    """Store this run's rates for its device's kind and return them; nothing (None) under pytest-xdist (no one
    process sees the run's wall time), with the cache provider off, or when the run ran no test. A run without a
    pass keeps the earlier record's pass rate."""
    cache = getattr(config, "cache", None)
    started = config.stash.get(STARTED_KEY, None)
    if cache is None or started is None or n_tests == 0:
        return None
    if hasattr(config, "workerinput") or config.getoption("numprocesses", default=None):
        return None
    device = clock.device
    if device is None:
        from pytest_saecheck.devices import auto_device

        device = auto_device()
    earlier = read(config, device)
    rate = clock.flops_per_second or (earlier.flops_per_second if earlier is not None else None)
    rates = Rates(
        flops_per_second=rate,
        other_seconds=max(time.perf_counter() - started - clock.planned_seconds, 0.0),
        n_tests=n_tests,
        recorded=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    cache.set(CACHE_PREFIX + device_kind(device), rates.to_dict())
    return rates


def calibrate(device: str, rows: int, d_in: int, d_out: int, dtype: str = "float32") -> float:
    """FLOP/s of ``[rows, d_in] @ [d_in, d_out]`` products in ``dtype`` on ``device`` (``2 · rows · d_in · d_out``
    FLOPs each, the cost model's count), repeated for about :data:`CALIBRATION_SECONDS` after one warm-up; widths
    are cut to :data:`CALIBRATION_MAX_WIDTH` and rows so that one product costs at most
    :data:`CALIBRATION_MAX_FLOPS`."""
    import torch

    d_in, d_out = min(d_in, CALIBRATION_MAX_WIDTH), min(d_out, CALIBRATION_MAX_WIDTH)
    rows = max(1, min(rows, int(CALIBRATION_MAX_FLOPS // (2 * d_in * d_out))))

    from pytest_saecheck.devices import synchronize

    kind = getattr(torch, dtype, None)
    if not isinstance(kind, torch.dtype):
        kind = torch.float32
    generator = torch.Generator(device="cpu").manual_seed(0)
    left = torch.randn(rows, d_in, generator=generator).to(device=device, dtype=kind)
    right = torch.randn(d_in, d_out, generator=generator).to(device=device, dtype=kind)
    torch.matmul(left, right)
    synchronize(device)
    repetitions, started = 0, time.perf_counter()
    while True:
        torch.matmul(left, right)
        repetitions += 1
        synchronize(device)
        elapsed = time.perf_counter() - started
        if elapsed >= CALIBRATION_SECONDS:
            return 2.0 * rows * d_in * d_out * repetitions / elapsed


def cache_state(config: pytest.Config, device: str) -> str:
    """``"off"`` without pytest's cache provider, ``"damaged"`` when the record for ``device`` exists but cannot
    be read (its path is then named in the estimate), else ``"on"``."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return "off"
    key = CACHE_PREFIX + device_kind(device)
    stored = cache.get(key, None)
    if stored is None:  # missing, or not JSON (pytest's Cache.get answers both with the default)
        root = getattr(cache, "_cachedir", None)  # where pytest keeps values: <cache dir>/v/<key>
        return "damaged" if isinstance(root, Path) and (root / "v" / key).exists() else "on"
    return "on" if isinstance(stored, Mapping) and Rates.from_dict(stored) is not None else "damaged"


def estimate_line(pass_flops: float, rates: Rates | None, cache: str = "on") -> str:
    """The estimated time of a run whose planned passes cost ``pass_flops`` (cost-model FLOPs), at ``rates``
    (recorded, or calibrated just now; None: no rate), as the plan's summary prints it after ``time:``;
    ``cache`` (:func:`cache_state`) says why no record was used."""
    from pytest_saecheck.engine.cost import format_seconds  # imports torch: only when a plan is made

    why = {
        "off": "pytest's cache is off (-p no:cacheprovider), so no run records or reads this machine's rates",
        "damaged": "the record of this machine's rates in .pytest_cache/v/saecheck/rates/ is unreadable and "
        "ignored; the next whole run rewrites it",
        "on": "a whole run on this machine records its rates in pytest's cache for the next plan",
    }[cache]
    if rates is None or rates.flops_per_second is None:
        return f"unknown: no rate is measured for this device yet ({why})"
    passes = pass_flops / rates.flops_per_second
    rate = f"{rates.flops_per_second / 1e9:,.3g} GFLOP/s"
    if rates.measured == "calibrated":
        return (
            f"release passes about {format_seconds(passes)} at {rate}, a matrix-product rate measured now (passes also "
            f"normalise, score and move memory, so they run slower); imports, model loads and other tests are not "
            f"estimated: {why}"
        )
    if rates.other_seconds is None:
        return f"release passes about {format_seconds(passes)} at {rate} (this machine's passes, {rates.recorded})"
    return (
        f"about {format_seconds(passes + rates.other_seconds)} (release passes {format_seconds(passes)} at {rate}, this "
        f"machine's rate recorded {rates.recorded}; {format_seconds(rates.other_seconds)} for the rest: imports, model "
        f"and SAE loads, other tests, what the recorded run of {rates.n_tests} tests spent outside its release "
        "passes)"
    )
