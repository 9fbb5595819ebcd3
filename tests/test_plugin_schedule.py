"""Release scheduling in the plugin: ``--saecheck-plan`` prints the passes from configs without loading
a model or running a test; ``--saecheck-shard=K/N`` splits a run's tests for a CI matrix, whose merged result
equals one run's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from factories import TINY_CONFTEST, make_random_sae

from pytest_saecheck.engine.cost import ModelShape, SAEShape, memory_groups, pass_cost

PLAN = """
    import pytest
    from pytest_saecheck import saecheck_param

    pytestmark = pytest.mark.saecheck(n_tokens=4096, release_group_mib={mib})

    @pytest.mark.parametrize("sae", [saecheck_param("demo/good"), saecheck_param("demo/dead"),
                                     saecheck_param("demo/variance_only")])
    def test_each(saecheck, sae):
        raise AssertionError("a plan runs no test")
"""

NO_LOADS = """
def pytest_saecheck_load_model(spec, device, dtype):
    open("model-loaded", "w").close()


def pytest_saecheck_load_sae(spec, device, dtype):
    open("sae-loaded", "w").close()
"""


def _demo_shapes() -> tuple[ModelShape, list[SAEShape], list[str]]:
    """The demo model's and SAEs' shapes written out by hand from their recorded configs."""
    from pytest_saecheck import demo

    cfg = demo.metadata()["model_config"]
    model = ModelShape(cfg["n_layers"], cfg["d_model"], cfg["d_mlp"], cfg["d_vocab"], 4)
    names = ["good", "dead", "variance_only"]
    saes = []
    for name in names:
        sae_cfg = json.loads((demo.sae_path(name) / "cfg.json").read_text())
        saes.append(SAEShape(d_in=sae_cfg["d_in"], d_sae=sae_cfg["d_sae"], layer=1))
    return model, saes, names


def test_the_plan_prints_the_cost_models_passes_and_runs_nothing(pytester: pytest.Pytester) -> None:
    model, saes, names = _demo_shapes()
    alone = [pass_cost(model, [sae], 4096, 64, 16).peak_bytes for sae in saes]
    mib = -(-max(alone) // 2**20)  # the largest SAE fits alone, not all three together
    assert pass_cost(model, saes, 4096, 64, 16).peak_bytes > mib * 2**20
    groups = memory_groups(model, saes, 4096, 64, 16, mib * 2**20)
    assert len(groups) >= 2
    pytester.makeconftest(NO_LOADS)
    pytester.makepyfile(PLAN.format(mib=mib))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", "--saecheck-plan")
    assert result.ret == 0
    result.assert_outcomes()  # nothing ran, nothing failed
    lines = [f"saecheck plan: 3 SAEs on demo, 4,096 tokens in rows of 64, batch 16: {len(groups)} passes*"]
    for number, group in enumerate(groups, 1):
        peak = pass_cost(model, [saes[i] for i in group], 4096, 64, 16).peak_bytes / 2**20
        members = ", ".join(f"demo/{names[i]}" for i in group)
        lines.append(
            f"  pass {number}/{len(groups)}: {len(group)} SAE* (peak about {peak:,.1f} MiB, *): {members}"
        )
    lines.append(f"saecheck plan: 3 tests, 3 SAEs of 1 release in {len(groups)} passes; estimated time *")
    lines.append("saecheck plan: every other subject is a pass of its own. No test was run.")
    result.stdout.fnmatch_lines(lines)
    assert not (pytester.path / "model-loaded").exists() and not (pytester.path / "sae-loaded").exists()


def test_the_plan_refuses_an_sae_bigger_than_the_budget_with_the_numbers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PLAN.format(mib=1))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--saecheck-plan")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        ["*0 passes (budget 1 MiB)*", "  refused: demo/good needs * MiB in a pass of its own*"]
    )


def test_the_plan_under_xdist_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(PLAN.format(mib=100))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--saecheck-plan", "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--saecheck-plan prints the schedule of one process*leave out -n*"])


@pytest.mark.parametrize("value", ["0/2", "3/2", "2", "a/b", "1/0", "-1/2"])
def test_a_bad_shard_is_a_usage_error_naming_the_fix(pytester: pytest.Pytester, value: str) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--saecheck-shard={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*--saecheck-shard={value}: give K/N with 1 <= K <= N*e.g. --saecheck-shard=2/4*"]
    )


SHARDED = """
    import pytest
    from pytest_saecheck import assert_ce_recovery, saecheck_param

    SPECS = [f"rel/sae{i}" for i in range(6)]
    pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160)

    @pytest.mark.parametrize("sae", [saecheck_param(spec) for spec in SPECS])
    def test_ce(saecheck, sae):
        assert_ce_recovery(saecheck, metric="kl_sae", max_value=1e6)

    @pytest.mark.parametrize("sae", [saecheck_param(spec) for spec in SPECS])
    def test_l0(saecheck, sae):
        assert saecheck.metrics["l0"] >= 0

    @pytest.mark.saecheck(sae=["mlp0", "rel/sae0"], splice="joint")
    def test_joint(saecheck):
        assert_ce_recovery(saecheck, metric="delta_ce", max_value=1e6)

    @pytest.mark.parametrize("n", range(5))
    def test_plain(n):
        pass
"""


REVERSED = """

def pytest_collection_modifyitems(items):
    items.reverse()
"""


@pytest.fixture
def sharded_pytester(tiny_pytester: pytest.Pytester) -> pytest.Pytester:
    make_random_sae(seed=8, hook_name="blocks.0.hook_mlp_out").save_model(tiny_pytester.path / "mlp0")
    for seed in range(6):
        make_random_sae(seed=seed).save_model(tiny_pytester.path / "rel" / f"sae{seed}")
    tiny_pytester.makepyfile(SHARDED)
    return tiny_pytester


def _collected(pytester: pytest.Pytester, *args: str) -> list[str]:
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--collect-only", "-q", *args)
    return [line for line in result.stdout.lines if "::" in line]


def test_shards_cover_every_test_once_and_keep_each_sae_whole(sharded_pytester: pytest.Pytester) -> None:
    every = _collected(sharded_pytester)
    assert len(every) == 18
    for n in range(1, 5):
        shards = [_collected(sharded_pytester, f"--saecheck-shard={k}/{n}") for k in range(1, n + 1)]
        assert sorted(test for shard in shards for test in shard) == sorted(every), (
            n
        )  # each test in exactly one shard
        for k, shard in enumerate(shards, 1):
            for sae in (f"rel/sae{i}" for i in range(6)):  # an SAE's tests stay together
                mine = [test for test in shard if f"[{sae}]" in test]
                assert len(mine) in (0, 2), (n, k, sae, mine)
        if n > 1:
            assert all(shards), n  # balanced: no shard idle
    # the same shard under another collection order (as pytest-randomly makes) keeps the same tests
    forward = _collected(sharded_pytester, "--saecheck-shard=2/3")
    sharded_pytester.makeconftest(TINY_CONFTEST + REVERSED)
    backward = _collected(sharded_pytester, "--saecheck-shard=2/3")
    assert backward == forward[::-1]


def test_two_shards_merged_equal_one_run(sharded_pytester: pytest.Pytester) -> None:
    run = ("-p", "no:cacheprovider", "-p", "no:randomly")
    sharded_pytester.runpytest_inprocess(*run, "--saecheck-json", "all.json").assert_outcomes(passed=18)
    passed = 0
    for k in (1, 2):
        result = sharded_pytester.runpytest_inprocess(
            *run, f"--saecheck-shard={k}/2", "--saecheck-json", f"s{k}.json"
        )
        passed += result.parseoutcomes()["passed"]
    assert passed == 18
    merged = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_saecheck.report",
            "merge",
            "s1.json",
            "s2.json",
            "--json",
            "merged.json",
        ],
        cwd=sharded_pytester.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert merged.returncode == 0, merged.stderr
    one = json.loads((sharded_pytester.path / "all.json").read_text())
    both = json.loads((sharded_pytester.path / "merged.json").read_text())

    def numbers(document: dict) -> dict:
        return {
            entry["id"]: (
                entry["metrics"],
                entry["intervals"],
                sorted(entry["tests"]),
                len(entry["assertions"]),
            )
            for entry in document["saes"]
        }

    assert numbers(both) == numbers(one)  # exactly: the same passes' numbers
    assert len(numbers(one)) == 7  # six SAEs and the joint splice
    assert {t["id"]: t["outcome"] for t in both["tests"]} == {t["id"]: t["outcome"] for t in one["tests"]}
    assert both["run"]["shards"] == 2


def test_a_release_is_cut_per_worker_only_when_workers_would_idle() -> None:
    from pytest_saecheck.plugin.schedule import worker_chunks

    members = [("release", f"sae{i:02d}") for i in range(30)] + [("other", "x"), ("other", "y")]
    chunks = worker_chunks(reversed(members), n_groups=1, workers=2)
    assert [chunks[("release", f"sae{i:02d}")] for i in range(30)] == [0] * 15 + [1] * 15  # contiguous halves
    assert {chunks[("other", "x")], chunks[("other", "y")]} == {0, 1}
    assert worker_chunks(members, n_groups=2, workers=2) == {}  # two groups already keep two workers busy
    assert worker_chunks(members, n_groups=1, workers=1) == {}
