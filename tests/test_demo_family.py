"""The demo's scaling-law fit is reproduced by the build: ``build --check --family-only`` retrains the model
family on the shipped demo model and refits. Minutes of CPU: marked ``slow``.

The fast check of the shipped fit against its shipped points is in tests/test_scaling.py.
"""

from __future__ import annotations

import copy

import pytest

from pytest_saecheck import demo
from pytest_saecheck.demo import build


def test_the_family_comparison_flags_what_moved_beyond_tolerance() -> None:
    shipped = demo.metadata()
    tolerance = shipped["check_tolerance"]
    assert build.compare_metadata(shipped, copy.deepcopy(shipped)) == []
    moved = copy.deepcopy(shipped)
    moved["scaling_law"]["parameters"]["gamma"] *= 1 + 2 * tolerance["law_relative"]
    moved["family"]["members"][0]["loss"] += 2 * tolerance["nats"]
    problems = build.compare_metadata(shipped, moved)
    assert len(problems) == 2
    assert problems[0].startswith("family.l3-d32.loss") and problems[1].startswith("scaling_law.gamma")
    missing = copy.deepcopy(shipped)
    del missing["scaling_law"]
    assert build.compare_metadata(shipped, missing) == ["the rebuild has no scaling-law fit"]


@pytest.mark.slow
def test_the_build_check_reproduces_the_demo_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["--check", "--family-only"]) == 0
    out = capsys.readouterr().out
    assert "family check OK" in out and "fit: E " in out
