"""This machine's measured rates (``plugin.rates``): a whole run records them in pytest's cache, and the plan and
the start line estimate a run's time from them; without a record the plan measures a matrix-product rate."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import pytest
from factories import TINY_CONFTEST

from pytest_saecheck.plugin import rates
from pytest_saecheck.plugin.rates import PassClock, Rates

RELEASE = """
    import pytest
    from pytest_saecheck import saecheck_param

    pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160)

    @pytest.mark.parametrize("sae", [saecheck_param("sae_identity"), saecheck_param("sae_random")])
    def test_each(saecheck, sae):
        assert saecheck.metrics["explained_variance"] == saecheck.metrics["explained_variance"]  # not NaN
"""


SHAPE = """

from factories import D_MODEL, D_VOCAB


def pytest_saecheck_model_config(spec):
    # the tiny model's shape without loading it (factories.make_model's defaults), so that the plan can cost it
    if spec.startswith("tiny"):
        return {"n_layers": 2, "d_model": D_MODEL, "d_mlp": 2 * D_MODEL, "d_vocab": D_VOCAB}
    return None
"""


@pytest.fixture
def planned(tiny_pytester: pytest.Pytester) -> pytest.Pytester:
    """A tiny release whose model's shape the plan can read."""
    tiny_pytester.makeconftest(TINY_CONFTEST + SHAPE)
    tiny_pytester.makepyfile(RELEASE)
    return tiny_pytester


def _record_path(tiny_pytester: pytest.Pytester) -> Path:
    from pytest_saecheck.devices import auto_device

    return (
        tiny_pytester.path / ".pytest_cache" / "v" / (rates.CACHE_PREFIX + rates.device_kind(auto_device()))
    )


def _record(tiny_pytester: pytest.Pytester) -> dict:
    return json.loads(_record_path(tiny_pytester).read_text())


def _plan_flops(output: str) -> float:
    """The planned passes' FLOPs as the plan printed them (3 significant digits, in TFLOP)."""
    return sum(
        float(value) * 1e12 for value in re.findall(r"peak about [\d.,]+ MiB, ([\d.e+-]+) TFLOP", output)
    )


def test_a_record_round_trips_and_a_damaged_one_is_ignored() -> None:
    kept = Rates(flops_per_second=2.5e9, other_seconds=4.0, n_tests=7, recorded="2026-12-07 12:00 UTC")
    assert Rates.from_dict(kept.to_dict()) == kept
    for damaged in (
        {},
        {**kept.to_dict(), "flops_per_second": math.nan},
        {**kept.to_dict(), "flops_per_second": 0.0},
        {**kept.to_dict(), "other_seconds": -1.0},
        {**kept.to_dict(), "n_tests": "many"},
    ):
        assert Rates.from_dict(damaged) is None, damaged


def test_the_estimate_is_the_passes_at_the_rate_plus_the_rest() -> None:
    recorded = Rates(flops_per_second=2e9, other_seconds=5.0, n_tests=3, recorded="2026-12-07 12:00 UTC")
    line = rates.estimate_line(8e9, recorded)  # 8e9 FLOPs at 2e9 FLOP/s: 4 s of passes, 9 s in all
    assert line.startswith("about 9.0 s (release passes 4.0 s at 2 GFLOP/s")
    assert "5.0 s for the rest" in line and "3 tests" in line
    long = rates.estimate_line(2e9 * 7200, recorded)
    assert long.startswith("about 2.00 h (release passes 2.00 h")
    calibrated = Rates(4e9, None, 0, "now", measured="calibrated")
    assert rates.estimate_line(4e9, calibrated).startswith(
        "release passes about 1.0 s at 4 GFLOP/s, a matrix-product"
    )
    assert "not estimated" in rates.estimate_line(4e9, calibrated)
    assert "no rate is measured" in rates.estimate_line(4e9, Rates(None, 3.0, 1, "x"))


def test_the_clock_sums_passes_and_keeps_the_planned_ones_apart() -> None:
    clock = PassClock()
    assert clock.flops_per_second is None
    clock.add(6e9, 2.0, "cpu", planned=True)
    clock.add(2e9, 2.0, "cpu", planned=False)
    assert clock.flops_per_second == pytest.approx(2e9)  # (6 + 2) / (2 + 2)
    assert clock.planned_seconds == 2.0 and clock.device == "cpu"


def test_the_calibration_measures_a_finite_positive_rate() -> None:
    measured = rates.calibrate("cpu", 64, 32, 48)
    assert math.isfinite(measured) and measured > 0


def test_a_run_records_its_rates_and_the_plan_estimates_from_them(planned: pytest.Pytester) -> None:
    tiny_pytester = planned
    first = tiny_pytester.runpytest_inprocess("-p", "no:randomly", "--saecheck-plan")
    assert first.ret == 0
    first.stdout.fnmatch_lines(
        [
            "saecheck plan: 2 tests, 2 SAEs of 1 release in 1 pass; time: release passes about * at * "
            "GFLOP/s, a matrix-product rate measured now*not estimated: a whole run on this machine records*"
        ]
    )
    assert not _record_path(tiny_pytester).exists()  # a plan is not a run: nothing recorded

    tiny_pytester.runpytest_inprocess("-p", "no:randomly").assert_outcomes(passed=2)
    record = _record(tiny_pytester)
    assert record["n_tests"] == 2 and record["flops_per_second"] > 0 and record["other_seconds"] >= 0

    second = tiny_pytester.runpytest_inprocess("-p", "no:randomly", "--saecheck-plan")
    output = second.stdout.str()
    found = re.search(r"time: about [\d.,]+ \w+ \(release passes ([\d.,]+) s at ([\d.,]+) GFLOP/s", output)
    assert found is not None, output
    passes, rate = (float(value.replace(",", "")) for value in found.groups())
    assert rate == pytest.approx(
        record["flops_per_second"] / 1e9, rel=5e-3
    )  # printed to 3 significant digits
    expected = _plan_flops(output) / record["flops_per_second"]
    assert passes == pytest.approx(expected, rel=0.01, abs=0.05)
    assert f"{record['other_seconds']:,.1f} s for the rest" in output


def test_the_start_line_of_a_run_gives_the_estimate(planned: pytest.Pytester) -> None:
    tiny_pytester = planned
    result = tiny_pytester.runpytest_inprocess("-p", "no:randomly")
    result.stdout.fnmatch_lines(
        [
            "saecheck plan: 2 tests, 2 SAEs of 1 release in 1 pass; time: unknown: no rate is measured for this device yet*"
        ]
    )
    again = tiny_pytester.runpytest_inprocess("-p", "no:randomly")
    again.stdout.fnmatch_lines(["saecheck plan: 2 tests, 2 SAEs of 1 release in 1 pass; time: about *"])
    quiet = tiny_pytester.runpytest_inprocess("-p", "no:randomly", "-q")
    assert "saecheck plan:" not in quiet.stdout.str()


@pytest.mark.parametrize("argument", ["-x", "--collect-only", "--saecheck-plan"])
def test_a_partial_run_records_nothing(tiny_pytester: pytest.Pytester, argument: str) -> None:
    tiny_pytester.makepyfile(textwrap.dedent(RELEASE) + "\n\ndef test_fails():\n    assert False\n")
    partial = tiny_pytester.runpytest_inprocess("-p", "no:randomly", argument)
    if argument == "-x":
        partial.assert_outcomes(passed=2, failed=1)  # stopped at the failure: a run cut short
    else:
        assert partial.ret == 0
    assert not _record_path(tiny_pytester).exists()
    # the same file run whole is recorded, failure and all
    tiny_pytester.runpytest_inprocess("-p", "no:randomly").assert_outcomes(passed=2, failed=1)
    assert _record(tiny_pytester)["n_tests"] == 3


def test_without_the_cache_provider_nothing_is_recorded_and_nothing_fails(
    tiny_pytester: pytest.Pytester,
) -> None:
    tiny_pytester.makepyfile(RELEASE)
    tiny_pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly").assert_outcomes(passed=2)
    assert not (tiny_pytester.path / ".pytest_cache").exists()


def test_the_calibration_of_a_huge_release_stays_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 27B model's shapes (a batch of 8,192 rows, 5,376 x 21,504) are cut to products of at most
    ``CALIBRATION_MAX_FLOPS`` with operands at most ``CALIBRATION_MAX_WIDTH`` wide."""
    import torch

    shapes = []
    real = torch.matmul

    def recording(left, right):
        shapes.append((tuple(left.shape), tuple(right.shape)))
        return real(left, right)

    monkeypatch.setattr(torch, "matmul", recording)
    assert rates.calibrate("cpu", 8192, 5376, 21504, "bfloat16") > 0
    (rows, d_in), (_, d_out) = shapes[0]
    assert d_in <= rates.CALIBRATION_MAX_WIDTH and d_out <= rates.CALIBRATION_MAX_WIDTH
    assert 2 * rows * d_in * d_out <= rates.CALIBRATION_MAX_FLOPS
    assert len(set(shapes)) == 1  # every repetition the same product


def test_long_estimates_read_in_hours() -> None:
    line = rates.estimate_line(1e9 * 3600 * 1234.4, Rates(1e9, 0.0, 1, "x"))
    assert line.startswith("about 1,234 h (release passes 1,234 h")


def test_a_damaged_record_is_named_and_a_switched_off_cache_is_said(planned: pytest.Pytester) -> None:
    path = _record_path(planned)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    damaged = planned.runpytest_inprocess("-p", "no:randomly", "--saecheck-plan")
    damaged.stdout.fnmatch_lines(["*a matrix-product rate measured now*rates/ is unreadable and ignored*"])
    off = planned.runpytest_inprocess("-p", "no:randomly", "-p", "no:cacheprovider", "--saecheck-plan")
    off.stdout.fnmatch_lines(["*pytest's cache is off (-p no:cacheprovider)*"])
    planned.runpytest_inprocess("-p", "no:randomly").assert_outcomes(passed=2)
    assert _record(planned)["n_tests"] == 2  # the next whole run rewrote it


def test_each_pass_line_shows_while_output_is_captured(planned: pytest.Pytester) -> None:
    """The line before a pass is written with pytest's capture suspended: seen without ``-s``, not under
    ``-q``; ``--collect-only`` prints no estimate."""
    shown = planned.runpytest_inprocess("-p", "no:randomly")
    shown.stdout.fnmatch_lines(["saecheck: 2 SAEs on 160 tokens (10 sequences)*"])
    assert "saecheck: 2 SAEs on" not in planned.runpytest_inprocess("-p", "no:randomly", "-q").stdout.str()
    collected = planned.runpytest_inprocess("-p", "no:randomly", "--collect-only")
    assert "saecheck plan:" not in collected.stdout.str()


def test_the_plan_counts_the_tests_outside_its_releases(planned: pytest.Pytester) -> None:
    alone = planned.runpytest_inprocess(
        "-p", "no:randomly", "--saecheck-plan", "--saecheck-release-group-mib=0"
    )
    alone.stdout.fnmatch_lines(
        [
            "saecheck plan: 2 tests, 0 SAEs of 0 releases in 0 passes; time:*",
            "saecheck plan: 2 tests outside these releases*each SAE a pass of its own, not costed here. No test was run.",
        ]
    )
