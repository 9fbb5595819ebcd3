"""Regression baselines: --saecheck-baseline-dir, --saecheck-update-baselines and assert_no_regression.

End to end with pytester (tiny model served by a hook, a local SAE directory rewritten between runs), plus unit
tests of the baseline file and the comparison.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import HOOK, make_identity_sae, make_tiny_model, make_token_ids

from pytest_saecheck.checks import baselines
from pytest_saecheck.engine import evaluate
from pytest_saecheck.report.files import load_document

MARK = 'pytest.mark.saecheck(model="tiny", sae="sae_under_test", tokens="{tokens}", n_tokens=640)'
SUITE = """
    import pytest
    from pytest_saecheck import assert_no_regression

    @{mark}
    def test_no_regression(saecheck):
        assert_no_regression(saecheck{args})
"""


def save_sae(directory: Path, noise: float = 0.0, seed: int = 0) -> None:
    """The identity SAE, with Gaussian noise of standard deviation ``noise`` added to its decoder."""
    sae = make_identity_sae()
    if noise:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sae.W_dec.add_(torch.randn(sae.W_dec.shape, generator=generator) * noise)
    sae.save_model(directory)


def suite(pytester: pytest.Pytester, tokens: str = "tokens.npy", args: str = "") -> None:
    pytester.makepyfile(test_regression=SUITE.format(mark=MARK.format(tokens=tokens), args=args))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess("--saecheck-baseline-dir", "baselines", *args)


def baseline_entry(pytester: pytest.Pytester, name: str = "r.json") -> dict:
    [sae] = load_document(pytester.path / name)["saes"]
    return sae["baseline"]


def sae_metrics(pytester: pytest.Pytester, name: str = "r.json") -> dict:
    [sae] = load_document(pytester.path / name)["saes"]
    return sae["metrics"]


def comparisons(entry: dict) -> dict[str, dict]:
    return {c["metric"]: c for c in entry["comparisons"]}


@pytest.fixture
def recorded(tiny_pytester: pytest.Pytester) -> pytest.Pytester:
    """A run directory whose noisy SAE (decoder noise 0.03) has a recorded baseline."""
    save_sae(tiny_pytester.path / "sae_under_test", noise=0.03)
    suite(tiny_pytester)
    result = run(tiny_pytester, "--saecheck-update-baselines")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["saecheck: baseline written to *baselines*sae_under_test-*.json"])
    assert len(list((tiny_pytester.path / "baselines").glob("*.json"))) == 1
    return tiny_pytester


def test_unchanged_sae_passes_with_a_zero_difference(recorded: pytest.Pytester) -> None:
    result = run(recorded, "--saecheck-json", "r.json", "--saecheck-report", "r.html")
    result.assert_outcomes(passed=1)
    entry = baseline_entry(recorded)
    assert entry["state"] == "compared" and entry["paired"] is True
    found = comparisons(entry)
    assert set(found) == {"delta_ce", "kl_sae", "explained_variance", "l0"}
    for comparison in found.values():
        assert comparison["difference"] == 0.0 and comparison["interval"] == [0.0, 0.0]
        assert comparison["status"] == "unchanged"
    assert entry["regressed"] == [] and entry["improved"] == []
    html = (recorded.path / "r.html").read_text(encoding="utf-8")
    assert "Against the baseline" in html and "unchanged" in html


def test_degraded_sae_fails_naming_metric_difference_and_interval(recorded: pytest.Pytester) -> None:
    save_sae(recorded.path / "sae_under_test", noise=0.1, seed=1)  # more decoder noise
    result = run(recorded, "--saecheck-json", "r.json", "--saecheck-report", "r.html")
    result.assert_outcomes(failed=1)
    entry = baseline_entry(recorded)
    found = comparisons(entry)
    for metric in ("kl_sae", "explained_variance"):
        assert found[metric]["status"] == "regressed", found[metric]
    assert found["l0"]["status"] == "unchanged"  # the encoder did not change
    kl = found["kl_sae"]
    assert kl["difference"] > 0 and kl["interval"][0] > 0  # lower is better: it rose
    assert found["explained_variance"]["interval"][1] < 0  # higher is better: it fell
    result.stdout.fnmatch_lines(
        [
            "*assert_no_regression failed for sae_under_test @ tiny: *"
            + glob.escape(
                f"kl_sae got worse: {kl['baseline']:.4f} → {kl['current']:.4f}, difference {kl['difference']:.4f} "
                f"(95% interval [{kl['interval'][0]:.4f}, {kl['interval'][1]:.4f}], lower is better, tol {kl['tol']:.2g})"
            )
            + "*",
            "*kl_sae*regressed*",
            "*baseline: *sae_under_test-*.json (paired: same tokens*",
        ]
    )
    assert {"kl_sae", "explained_variance"} <= set(entry["regressed"])
    assert "regressed: " in (recorded.path / "r.html").read_text(encoding="utf-8")


def test_a_regression_writes_the_obtained_numbers_beside_the_baseline(recorded: pytest.Pytester) -> None:
    [path] = (recorded.path / "baselines").glob("*.json")
    save_sae(recorded.path / "sae_under_test", noise=0.1, seed=1)
    result = run(recorded, "--saecheck-json", "r.json")
    result.assert_outcomes(failed=1)
    obtained = path.with_name(path.stem + ".obtained.json")
    result.stdout.fnmatch_lines(
        [
            f"*obtained numbers written to {glob.escape(str(obtained))} (rename it to {path.name} to accept them)",
            "*- saecheck -*",  # the report section says it too
            "assert_no_regression kl_sae = *: failed",
            f"  obtained numbers written to {glob.escape(str(obtained))}",
        ]
    )
    entry = baseline_entry(recorded)
    # it is the current evaluation's baseline: the current numbers of the comparison, as the report shows them
    written = baselines.load(obtained)
    for metric, comparison in comparisons(entry).items():
        assert written["metrics"][metric] == comparison["current"], metric
    assert baselines.load(path)["metrics"] != written["metrics"]  # the baseline itself is untouched
    # renamed to the baseline's name, it is the new baseline: the same SAE now compares equal
    obtained.replace(path)
    run(recorded, "--saecheck-json", "r.json").assert_outcomes(passed=1)
    assert all(c["difference"] == 0.0 for c in comparisons(baseline_entry(recorded)).values())


def test_a_passing_comparison_writes_no_obtained_file(recorded: pytest.Pytester) -> None:
    run(recorded).assert_outcomes(passed=1)
    assert not list((recorded.path / "baselines").glob("*.obtained.json"))


def test_baseline_files_no_test_read_are_listed_and_fail_only_when_asked(recorded: pytest.Pytester) -> None:
    directory = recorded.path / "baselines"
    [used] = directory.glob("*.json")
    stale = directory / "retired_sae-0123456789.json"
    stale.write_text(used.read_text(encoding="utf-8"), encoding="utf-8")
    (directory / "sae_under_test-x.obtained.json").write_text("{}", encoding="utf-8")  # not a baseline
    result = run(recorded)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["saecheck: 1 baseline file no test read (*): delete them if their SAEs are gone; *", f"  {stale}"]
    )
    assert str(used) not in result.stdout.str() and "obtained.json" not in result.stdout.str()

    failing = run(recorded, "--saecheck-fail-unused-baselines")
    failing.assert_outcomes(passed=1)
    assert failing.ret == pytest.ExitCode.TESTS_FAILED
    failing.stdout.fnmatch_lines(
        ["saecheck: 1 baseline file no test read (*): the run fails *", f"  {stale}"]
    )

    stale.unlink()
    clean = run(recorded, "--saecheck-fail-unused-baselines")
    assert clean.ret == pytest.ExitCode.OK and "no test read" not in clean.stdout.str()


def test_a_run_without_assert_no_regression_lists_no_baselines(recorded: pytest.Pytester) -> None:
    recorded.makepyfile(test_regression="def test_other():\n    pass\n")
    result = run(recorded, "--saecheck-fail-unused-baselines")
    assert result.ret == pytest.ExitCode.OK and "no test read" not in result.stdout.str()


def test_tolerance_lets_a_small_regression_pass(recorded: pytest.Pytester) -> None:
    save_sae(recorded.path / "sae_under_test", noise=0.1, seed=1)
    suite(recorded, args=", tol=100.0")
    run(recorded).assert_outcomes(passed=1)


def test_improved_sae_passes_and_is_reported_as_improved(recorded: pytest.Pytester) -> None:
    save_sae(recorded.path / "sae_under_test")  # no decoder noise: exact reconstruction
    result = run(recorded, "--saecheck-json", "r.json")
    result.assert_outcomes(passed=1)
    entry = baseline_entry(recorded)
    found = comparisons(entry)
    assert {"kl_sae", "explained_variance"} <= set(entry["improved"])
    assert found["explained_variance"]["difference"] > 0 and found["kl_sae"]["interval"][1] < 0
    assert entry["regressed"] == []


def test_other_tokens_are_a_clear_error_and_unpaired_is_opt_in(recorded: pytest.Pytester) -> None:
    np.save(recorded.path / "other_tokens.npy", make_token_ids(seed=5))
    suite(recorded, tokens="other_tokens.npy")
    result = run(recorded)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*BaselineError: assert_no_regression: the baseline *sae_under_test-*.json of sae_under_test @ tiny was "
            "recorded on other tokens: the token ids differ (same shape 40 × 16, different ids*pass unpaired=True*"
        ]
    )
    assert "pytest_saecheck/" not in result.stdout.str()  # the user's frames only

    suite(recorded, tokens="other_tokens.npy", args=", unpaired=True")
    result = run(recorded, "--saecheck-json", "r.json")
    result.assert_outcomes(passed=1)  # the same SAE on other tokens: no confident change
    entry = baseline_entry(recorded)
    assert entry["paired"] is False
    assert all(c["interval"][0] < c["interval"][1] for c in entry["comparisons"] if c["metric"] != "l0")


def test_token_policy_change_is_a_clear_error(recorded: pytest.Pytester) -> None:
    result = run(recorded, "--saecheck-exclude-bos", "false")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the token policy differs (exclude_bos: True → False)*"])


def test_missing_baseline_fails_with_the_command_that_records_it(tiny_pytester: pytest.Pytester) -> None:
    save_sae(tiny_pytester.path / "sae_under_test")
    suite(tiny_pytester)
    result = run(tiny_pytester, "--saecheck-json", "r.json", "--saecheck-report", "r.html")
    result.assert_outcomes(failed=1)
    assert baseline_entry(tiny_pytester)["state"] == "missing"
    assert "no baseline yet at" in (tiny_pytester.path / "r.html").read_text(encoding="utf-8")
    result.stdout.fnmatch_lines(
        [
            "*assert_no_regression failed for sae_under_test @ tiny: no baseline at *baselines*sae_under_test-*.json",
            "*record it with: pytest 'test_regression.py::test_no_regression' --saecheck-baseline-dir *baselines "
            "--saecheck-update-baselines=missing",
            "*obtained numbers written to *baselines*sae_under_test-*.obtained.json (rename it to *.json to accept "
            "them)",
        ]
    )
    [obtained] = (tiny_pytester.path / "baselines").glob("*.obtained.json")
    written, reported = baselines.load(obtained)["metrics"], sae_metrics(tiny_pytester)
    for metric in baselines.DEFAULT_METRICS:
        assert written[metric] == reported[metric], metric
    # that command records it, and the next run compares against it
    run(tiny_pytester, "test_regression.py::test_no_regression", "--saecheck-update-baselines=missing")
    run(tiny_pytester).assert_outcomes(passed=1)


def test_update_missing_keeps_existing_baselines(recorded: pytest.Pytester) -> None:
    [path] = (recorded.path / "baselines").glob("*.json")
    before = path.read_text(encoding="utf-8")
    save_sae(recorded.path / "sae_under_test", noise=0.1, seed=1)
    result = run(recorded, "--saecheck-update-baselines=missing")
    result.assert_outcomes(failed=1)  # it compares against the existing baseline, and that one regressed
    assert path.read_text(encoding="utf-8") == before
    result = run(recorded, "--saecheck-update-baselines")  # a refresh accepts the new numbers
    result.assert_outcomes(passed=1)
    assert path.read_text(encoding="utf-8") != before
    run(recorded).assert_outcomes(passed=1)


def test_update_without_a_directory_is_a_usage_error(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile("def test_nothing(): pass")
    result = tiny_pytester.runpytest_inprocess("--saecheck-update-baselines")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--saecheck-update-baselines needs a baseline directory*"])


def test_a_path_taken_as_the_update_mode_is_a_usage_error(tiny_pytester: pytest.Pytester) -> None:
    tiny_pytester.makepyfile(test_x="def test_nothing(): pass")
    result = run(tiny_pytester, "--saecheck-update-baselines", "test_x.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*--saecheck-update-baselines takes all (the default) or missing, got 'test_x.py'*=all (or =missing)*"
        ]
    )


def test_ini_directory_is_relative_to_the_ini_file(tiny_pytester: pytest.Pytester) -> None:
    (tiny_pytester.path / "sub").mkdir()
    tiny_pytester.makeini("[pytest]\nsaecheck_baseline_dir = stored/baselines\n")
    save_sae(tiny_pytester.path / "sae_under_test")
    suite(tiny_pytester)
    result = tiny_pytester.runpytest_inprocess(
        "--rootdir", str(tiny_pytester.path), "--saecheck-update-baselines=all", str(tiny_pytester.path)
    )
    result.assert_outcomes(passed=1)
    assert len(list((tiny_pytester.path / "stored" / "baselines").glob("*.json"))) == 1


@pytest.mark.slow  # two xdist workers, each importing torch, TransformerLens and SAE Lens
def test_update_under_xdist_writes_each_baseline_once(tiny_pytester: pytest.Pytester) -> None:
    save_sae(tiny_pytester.path / "sae_under_test")
    tests = "\n".join(
        f"""
    @{MARK.format(tokens="tokens.npy")}
    def test_{number}(saecheck):
        assert_no_regression(saecheck)
"""
        for number in range(4)
    )
    tiny_pytester.makepyfile(
        "import pytest\nfrom pytest_saecheck import assert_no_regression\n" + tests.replace("\n    ", "\n")
    )
    result = run(tiny_pytester, "-n", "2", "--saecheck-update-baselines")
    result.assert_outcomes(passed=4)
    written = [line for line in result.outlines if line.startswith("saecheck: baseline written to")]
    assert len(written) == 1
    [path] = (tiny_pytester.path / "baselines").glob("*.json")
    assert not list((tiny_pytester.path / "baselines").glob(".*.tmp"))
    assert baselines.load(path)["tokens"]["n_sequences"] == 40
    run(tiny_pytester, "-n", "2").assert_outcomes(passed=4)


# --------------------------------------------------------------------------------------------------------
# the file and the comparison


@pytest.fixture(scope="module")
def evaluation():  # type: ignore[no-untyped-def]
    model = make_tiny_model()
    tokens = torch.as_tensor(make_token_ids())
    result = evaluate(model, make_identity_sae(), tokens, batch_size=8)
    return result, tokens


def _document(evaluation, tokens) -> dict:  # type: ignore[no-untyped-def]
    subject = {"label": "identity @ tiny", "sae": "identity", "model": "tiny", "tokens": "t.npy"}
    return baselines.build_document(
        key=baselines.baseline_key(subject, None),
        subject=subject,
        evaluation=evaluation,
        tokens=tokens,
        token_source="t.npy",
        settings={"n_tokens": 160, "context_size": 4, "seed": 0},
    )


def test_files_round_trip_exactly(evaluation, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result, tokens = evaluation
    document = _document(result, tokens)
    path = baselines.baseline_path(tmp_path, document["key"])
    path.write_text(baselines.dumps(document), encoding="utf-8")
    loaded = baselines.load(path)
    assert loaded == document
    assert baselines.dumps(loaded) == path.read_text(encoding="utf-8")
    stored = baselines.per_sequence_arrays(loaded)
    compact = baselines.compact_sums(result.per_sequence)
    assert stored.keys() == compact.keys()
    for name, array in compact.items():
        assert np.array_equal(stored[name], array), name  # bit for bit
    assert loaded["metrics"] == result.metrics
    assert loaded["tokens"]["ids_sha256"] == baselines.token_ids_digest(tokens.numpy())
    assert loaded["sae"]["hook_name"] == HOOK
    # diff-friendly: one line per array, sorted keys
    lines = path.read_text(encoding="utf-8").splitlines()
    assert sum(line.lstrip().startswith('"sse": [') for line in lines) == 1
    assert len(lines) < 150  # one line per metric and per summed array (the metric catalogue grows)
    assert json.loads(path.read_text(encoding="utf-8")) == document


def test_compacted_sums_give_the_evaluations_metrics(evaluation) -> None:  # type: ignore[no-untyped-def]
    from pytest_saecheck.metrics import metrics_from_sums

    result, _ = evaluation
    sums = baselines._expanded(baselines.compact_sums(result.per_sequence))
    values = metrics_from_sums({k: v.sum(0) for k, v in sums.items()}, result.scaling_law)
    for name, value in result.metrics.items():
        if name in values:
            assert float(values[name]) == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_paired_comparison_directions() -> None:
    rng = np.random.default_rng(0)
    n = 50
    base = {
        "n_ce": np.full(n, 10.0),
        "n_kl": np.full(n, 10.0),
        "ce_sum_orig": rng.uniform(20, 30, n),
        "kl_sum_sae": rng.uniform(0.5, 1.0, n),
    }
    base["ce_sum_sae"] = base["ce_sum_orig"] + rng.uniform(0.5, 1.0, n)
    worse = {**base, "ce_sum_sae": base["ce_sum_sae"] + 0.5, "kl_sum_sae": base["kl_sum_sae"] * 0.5}
    found = {
        c.metric: c
        for c in baselines.compare(
            worse,
            base,
            ("delta_ce", "kl_sae"),
            level=0.95,
            tol={"delta_ce": 0.0, "kl_sae": 0.0},
            scaling_law=None,
        )
    }
    assert found["delta_ce"].status == "regressed" and found["delta_ce"].difference == pytest.approx(0.05)
    assert found["kl_sae"].status == "improved"
    # the paired interval of a constant shift is that shift exactly; a tolerance above it passes
    assert found["delta_ce"].interval == pytest.approx((0.05, 0.05))
    # the default tolerance absorbs a systematic rounding-size shift (another device), tol=0 does not
    shifted = {**base, "ce_sum_sae": base["ce_sum_sae"] * (1 + 1e-7)}
    [noise] = baselines.compare(
        shifted, base, ("delta_ce",), level=0.95, tol={"delta_ce": None}, scaling_law=None
    )
    assert noise.status == "unchanged" and noise.interval[0] > 0
    assert noise.tol == pytest.approx(baselines.NOISE_RELATIVE * noise.baseline + baselines.NOISE_ABSOLUTE)
    [strict] = baselines.compare(
        shifted, base, ("delta_ce",), level=0.95, tol={"delta_ce": 0.0}, scaling_law=None
    )
    assert strict.status == "regressed"
    [tolerated] = baselines.compare(
        worse, base, ("delta_ce",), level=0.95, tol={"delta_ce": 0.06}, scaling_law=None
    )
    assert tolerated.status == "unchanged"


def test_bad_arguments_are_config_errors() -> None:
    from pytest_saecheck import ConfigError, assert_no_regression

    with pytest.raises(ConfigError, match="unknown metric 'r2'"):
        assert_no_regression(object(), metrics=("r2",))
    with pytest.raises(ConfigError, match=r"alive_fraction.*no paired interval"):
        assert_no_regression(object(), metrics=("alive_fraction",))
    with pytest.raises(ConfigError, match="tol must be at least 0"):
        assert_no_regression(object(), tol=-1)
    with pytest.raises(ConfigError, match="tol names metrics that are not compared: mse"):
        assert_no_regression(object(), tol={"mse": 0.1})
    with pytest.raises(ConfigError, match="confidence must lie strictly between 0 and 1"):
        assert_no_regression(object(), confidence=95)
    with pytest.raises(ConfigError, match="needs the saecheck fixture"):
        assert_no_regression(object())


def test_no_directory_is_a_config_error(tiny_pytester: pytest.Pytester) -> None:
    save_sae(tiny_pytester.path / "sae_under_test")
    suite(tiny_pytester)
    result = tiny_pytester.runpytest_inprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ConfigError: assert_no_regression: no baseline directory is configured*"])
