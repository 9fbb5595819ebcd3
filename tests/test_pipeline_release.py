"""The release table (README, "Which SAE Lens releases break what") against the installed SAE Lens: its
``run_evals`` breaks exactly the properties the table lists for its version. CI runs this with the current
release and with sae-lens 6.5.1 (.ci/run)."""

from __future__ import annotations

import warnings

import pytest

from pytest_saecheck.checks import pipeline as battery

pytestmark = pytest.mark.slow  # the whole battery through SAE Lens' run_evals: about a minute on a CPU


def test_the_installed_sae_lens_breaks_exactly_the_properties_the_table_lists() -> None:
    sae_lens = pytest.importorskip("sae_lens")
    version = sae_lens.__version__
    expected = battery.sae_lens_expected_broken(version)
    if expected is None:
        pytest.skip(f"SAE Lens {version} lies outside the measured releases {battery.SAE_LENS_MEASURED}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name, results = battery.run_battery("sae_lens", device="cpu")
    assert name == f"sae_lens {version}"
    broken = {r.name for r in results if r.broken}
    not_checked = {r.name: r.not_checked for r in results if r.not_checked}
    assert broken == expected, {r.name: [(f.metric, f.got, f.right) for f in r.broken] for r in results}
    transcoders = battery.SAE_LENS_RELEASES["transcoder_splice"][0]
    from packaging.version import Version

    assert set(not_checked) == ({"transcoder_splice"} if Version(version) < Version(transcoders) else set())
