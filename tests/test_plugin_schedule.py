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
    lines.append(f"saecheck plan: 3 tests, 3 SAEs of 1 release in {len(groups)} passes; time: *")
    lines.append("saecheck plan: no test was run.")
    result.stdout.fnmatch_lines(lines)
    assert not (pytester.path / "model-loaded").exists() and not (pytester.path / "sae-loaded").exists()


def test_the_plan_refuses_an_sae_bigger_than_the_budget_with_the_numbers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PLAN.format(mib=1))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--saecheck-plan")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "*0 passes (budget 1 MiB)*",
            "  refused: demo/good needs * MiB in a pass of its own*",
            "saecheck plan: 3 tests, 0 SAEs of 1 release in 0 passes (3 refused: too big for the memory budget); time:*",
        ]
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


def test_a_lone_release_is_cut_into_contiguous_halves_for_two_workers() -> None:
    """Uniform weights (no config readable): 30 SAEs of one release, alone, give two contiguous halves of the
    sorted SAEs; one worker cuts nothing."""
    from pytest_saecheck.plugin.schedule import worker_chunks
    from pytest_saecheck.plugin.settings import SAECheckSettings

    key = SAECheckSettings(model="tiny")  # no config known for it or the SAEs: every SAE weighs 1
    specs = [f"sae{i:02d}" for i in reversed(range(30))]
    chunks = worker_chunks({key: specs}, [], workers=2)
    assert [chunks[(key, f"sae{i:02d}")] for i in range(30)] == [0] * 15 + [1] * 15
    assert worker_chunks({key: specs}, [], workers=1) == {}


def _loads(groups, counts, workers):
    from pytest_saecheck.plugin.schedule import chunk_costs, makespan

    units = [unit for group, k in zip(groups, counts, strict=True) for unit in chunk_costs(group, k)[1]]
    return makespan(units, workers), sum(units)


def test_the_balancer_cuts_only_what_shortens_the_busiest_worker() -> None:
    from pytest_saecheck.plugin.schedule import GroupCost, chunk_counts

    release = GroupCost(shared=1.0, per_sae=(1.0,) * 30)
    other = GroupCost(shared=1.0, per_sae=(1.0,), splittable=False)
    # a big release beside a small group: cut in two, each chunk paying its own forward (16 + 2 against 16)
    assert chunk_counts([release, other], workers=2) == [2, 1]
    assert _loads([release, other], [2, 1], 2) == (18.0, 34.0)
    # two equal groups on two workers balance already: nothing is cut
    assert chunk_counts([release, release], workers=2) == [1, 1]
    # a group kept whole by the caller (not a release) is never cut, however big
    assert chunk_counts([GroupCost(1.0, (1.0,) * 30, splittable=False), other], workers=2) == [1, 1]
    # three equal releases on two workers: cutting one in two gives 2 + 3·10 split 22 / 21 (better than 22 / 11)
    ten = GroupCost(shared=1.0, per_sae=(1.0,) * 10)
    counts = chunk_counts([ten, ten, ten], workers=2)
    assert sorted(counts) == [1, 1, 2] and _loads([ten, ten, ten], counts, 2)[0] == 17.0
    assert chunk_counts([release, other], workers=1) == [1, 1]


@pytest.mark.parametrize("workers", [2, 3, 4, 8])
def test_the_balancer_never_loads_the_busiest_worker_more_than_whole_groups_do(workers: int) -> None:
    """Random releases and groups (deterministic seeds): the busiest worker's load is at most that of whole groups
    and at most the ideal share plus the largest unit; the counts are the same for the groups in any order."""
    import random

    from pytest_saecheck.plugin.schedule import GroupCost, chunk_costs, chunk_counts

    for seed in range(40):
        rng = random.Random(seed)
        groups = [
            GroupCost(
                shared=rng.uniform(0.5, 3.0),
                per_sae=tuple(rng.uniform(0.2, 2.0) for _ in range(rng.randint(1, 40))),
                splittable=rng.random() < 0.7,
            )
            for _ in range(rng.randint(1, 6))
        ]
        counts = chunk_counts(groups, workers)
        span, total = _loads(groups, counts, workers)
        whole, _ = _loads(groups, [1] * len(groups), workers)
        assert span <= whole * (1 + 1e-9), (seed, counts)
        units = [unit for group, k in zip(groups, counts, strict=True) for unit in chunk_costs(group, k)[1]]
        assert span <= total / workers + max(units) + 1e-9, (seed, counts)  # list scheduling's bound
        for group, k in zip(groups, counts, strict=True):
            assert k == 1 or group.splittable
            chunks = chunk_costs(group, k)[0]
            assert chunks == sorted(chunks)  # contiguous runs of the group's SAEs
        assert chunk_counts(groups, workers) == counts  # deterministic
