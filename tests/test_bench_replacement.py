"""``benchmarks/bench_engine.py --configs replacement`` (configuration 6) end to end on a few tokens: every timing,
the forward-pass counts, and the streamed CLT giving the resident CLT's numbers within its weight budget."""

from __future__ import annotations

import math


def test_the_replacement_configuration_reports_passes_and_the_streamed_peak(bench):
    assert bench.parse_configs("hf,replacement") == [bench.HF_KEY, bench.REPLACEMENT_KEY]
    lines, record = bench.measure_replacement(64, 2, 1, "cpu", 16, True, lambda message: None)
    assert set(record["seconds"]) == {"ours", "ours_alone", "bound", "floor"}
    for name in ("ours_over_bound", "forward_passes", "forward_passes_alone", "bound_forward_passes"):
        assert math.isfinite(record[name]) and record[name] > 0, name
    assert record["streamed_peak_bytes"] <= record["decoder_bytes"] // 4
    assert record["streamed_delta_ce_difference"] == 0.0
    assert any("ours / bound" in line for line in lines)
