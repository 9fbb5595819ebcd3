"""Releases in the plugin: SAEs that share everything but the SAE are evaluated in one pass; joint markers."""

from __future__ import annotations

import json

import pytest

SEVERAL = """
    import pytest
    import conftest
    from pytest_saecheck import saecheck_param, evaluate
    from pytest_saecheck.plugin.fixtures import session_cache

    pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160{extra})

    @pytest.mark.parametrize("sae", [saecheck_param("sae_identity"), saecheck_param("sae_random"),
                                     saecheck_param("sae_random2")])
    def test_each(saecheck, sae, request):
        evaluation = saecheck.evaluation
        # the same numbers as evaluating this SAE alone
        alone = evaluate(saecheck.model, saecheck.sae, saecheck.tokens, progress=False)
        for name, value in alone.metrics.items():
            assert evaluation.metrics[name] == pytest.approx(value, abs=1e-6), name

    def test_counts(request):
        import json
        cache = session_cache(request.config)
        with open("counts.json", "w") as f:
            json.dump({{"loads": cache.loads, "models": conftest.LOADS}}, f)
"""


def _counts(pytester: pytest.Pytester) -> dict:
    return json.loads((pytester.path / "counts.json").read_text())


@pytest.fixture
def release_pytester(tiny_pytester: pytest.Pytester, tiny_assets) -> pytest.Pytester:
    from factories import make_random_sae

    make_random_sae(seed=7).save_model(tiny_pytester.path / "sae_random2")
    make_random_sae(seed=8, hook_name="blocks.0.hook_mlp_out").save_model(tiny_pytester.path / "sae_mlp0")
    return tiny_pytester


def test_a_parametrized_release_is_evaluated_in_one_pass(release_pytester: pytest.Pytester) -> None:
    release_pytester.makepyfile(SEVERAL.format(extra=""))
    release_pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=4)
    counts = _counts(release_pytester)
    assert counts["loads"]["pass"] == 1 and counts["loads"]["model"] == 1, counts  # one pass for 3 SAEs
    assert counts["loads"]["evaluation"] == 3  # each SAE evaluated (and cached) once
    assert counts["models"] == ["tiny"]


def test_the_memory_budget_splits_a_release(release_pytester: pytest.Pytester) -> None:
    release_pytester.makepyfile(SEVERAL.format(extra=", release_group_mib=0"))
    release_pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=4)
    assert _counts(release_pytester)["loads"]["pass"] == 3  # 0 MiB: each SAE alone


def test_joint_marker_end_to_end_with_the_report(release_pytester: pytest.Pytester) -> None:
    release_pytester.makepyfile(
        """
        import pytest
        from pytest_saecheck import assert_ce_recovery

        @pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160,
                              sae=["sae_mlp0", "sae_identity"], splice="joint")
        def test_circuit(saecheck):
            joint = saecheck.evaluation
            assert set(joint.members) == set(saecheck.sae_specs) and len(joint.members) == 2
            assert joint.dictionary["kind"] == "joint"
            assert joint.compounding["delta_ce_joint"] == pytest.approx(joint.metrics["delta_ce"])
            assert_ce_recovery(saecheck, metric="kl_sae", max_value=100.0, confidence=0.95)
            with pytest.raises(Exception, match="saecheck.saes"):
                saecheck.sae

        @pytest.mark.saecheck(model="tiny", tokens="tokens.npy", sae=["sae_identity", "sae_random"])
        def test_a_list_without_joint_is_refused(saecheck):
            saecheck.evaluation

        @pytest.mark.saecheck(model="tiny", tokens="tokens.npy", sae=["sae_identity", "./sae_identity"],
                              splice="joint")
        def test_one_sae_twice_is_refused(saecheck):
            saecheck.evaluation
        """
    )
    result = release_pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--saecheck-json", "r.json", "--saecheck-report", "r.html"
    )
    result.assert_outcomes(passed=1, errors=2)  # refused at setup, as a malformed setting is
    result.stdout.fnmatch_lines(['*add splice="joint"*'])
    result.stdout.fnmatch_lines(["*sae= lists '*sae_identity' more than once*list distinct SAEs*"])
    document = json.loads((release_pytester.path / "r.json").read_text())
    [joint] = [entry for entry in document["saes"] if entry["evaluated"] and "joint" in entry["label"]]
    assert "delta_ce" in joint["metrics"] and "explained_variance" not in joint["metrics"]
    assert joint["dictionary"]["kind"] == "joint" and len(joint["members"]) == 2
    assert set(joint["compounding"]) >= {
        "delta_ce_joint",
        "delta_ce_isolated_sum",
        "excess",
        "excess_interval",
    }
    html = (release_pytester.path / "r.html").read_text()
    assert "members (inside the joint model)" in html and "compounding" in html


def test_a_broken_sae_fails_only_its_own_test(release_pytester: pytest.Pytester) -> None:
    """One SAE of a release group that cannot be evaluated must not fail the others (found by a new user)."""
    from factories import make_random_sae

    make_random_sae(d_in=16).save_model(release_pytester.path / "sae_too_narrow")
    release_pytester.makepyfile(
        """
        import pytest
        from pytest_saecheck import saecheck_param

        pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160)

        @pytest.mark.parametrize("sae", [saecheck_param("sae_too_narrow"), saecheck_param("sae_identity"),
                                         saecheck_param("sae_random")])
        def test_each(saecheck, sae):
            assert saecheck.metrics["l0"] >= 0

        @pytest.mark.saecheck(sae="sae_identity", activation_scaler=[1.0])
        def test_a_malformed_marker_value(saecheck):
            saecheck.evaluation
        """
    )
    result = release_pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1, errors=1)  # the narrow SAE fails, the malformed marker errors
    result.stdout.fnmatch_lines(["*ShapeMismatchError: the SAE expects d_in=16*"])
    result.stdout.fnmatch_lines(
        ["FAILED *test_each?sae_too_narrow?*", "ERROR *test_a_malformed_marker_value*"]
    )


def test_evaluations_that_differ_in_token_policy_are_separate_report_entries(
    release_pytester: pytest.Pytester,
) -> None:
    release_pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160, sae="sae_identity")

        def test_default(saecheck):
            saecheck.evaluation

        @pytest.mark.saecheck(exclude_token_ids=[5, 7])
        def test_fewer_tokens(saecheck):
            saecheck.evaluation
        """
    )
    release_pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--saecheck-json", "r.json"
    ).assert_outcomes(passed=2)
    entries = json.loads((release_pytester.path / "r.json").read_text())["saes"]
    assert sorted(len(entry["tests"]) for entry in entries) == [1, 1], [e["label"] for e in entries]
    assert len({entry["tokens"]["n_tokens"] for entry in entries}) == 2


PLACED = """
    import json, os
    import pytest
    from pytest_saecheck import saecheck_param
    from pytest_saecheck.plugin.fixtures import session_cache

    pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160{extra})

    def record(request, saecheck, worker_id):
        saecheck.evaluation
        with open(f"placed-{{os.getpid()}}-{{os.urandom(4).hex()}}.json", "w") as out:
            json.dump({{"sae": os.path.basename(saecheck.settings.sae), "worker": worker_id,
                       "loads": session_cache(request.config).loads}}, out)

    @pytest.mark.parametrize("sae", [saecheck_param("sae_identity"), saecheck_param("sae_random"),
                                     saecheck_param("sae_random2")])
    @pytest.mark.parametrize("n", range(3))
    def test_each(saecheck, sae, n, request, worker_id):
        record(request, saecheck, worker_id)

    @pytest.mark.parametrize("n", range(4))
    def test_plain(n):
        pass
"""


def _placements(pytester: pytest.Pytester) -> tuple[dict[str, set[str]], dict[str, dict[str, int]]]:
    """``sae → workers that ran its tests`` and ``worker → its session cache's counts at its last test``."""
    workers: dict[str, set[str]] = {}
    last: dict[str, dict[str, int]] = {}
    for path in pytester.path.glob("placed-*.json"):
        placed = json.loads(path.read_text())
        workers.setdefault(placed["sae"], set()).add(placed["worker"])
        seen = last.setdefault(placed["worker"], placed["loads"])
        if sum(placed["loads"].values()) > sum(seen.values()):
            last[placed["worker"]] = placed["loads"]
    return workers, last


@pytest.mark.slow  # two xdist workers, each importing torch, TransformerLens and SAE Lens
@pytest.mark.parametrize("release_group_mib", [2048, 0])
@pytest.mark.parametrize("dist", [(), ("--dist", "loadgroup")])
def test_plain_n_keeps_each_sae_on_one_worker_and_splits_a_lone_release_over_the_workers(
    release_pytester: pytest.Pytester, release_group_mib: int, dist: tuple[str, ...]
) -> None:
    """With plain ``-n 2`` (and ``--dist loadgroup``), each SAE is evaluated once per session: its tests share a
    worker; a release that is the run's only group is cut in two by the cost model, each chunk one pass, so both
    workers evaluate SAEs."""
    pytest.importorskip("xdist")
    release_pytester.makepyfile(PLACED.format(extra=f", release_group_mib={release_group_mib}"))
    result = release_pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2", "-v", *dist)
    result.assert_outcomes(passed=13)
    if not dist:  # reported under the ids of a serial run (loadgroup shows xdist's own @group suffix)
        assert "@saecheck-" not in result.stdout.str()
    workers, counts = _placements(release_pytester)
    assert {sae: len(used) for sae, used in workers.items()} == {
        "sae_identity": 1,
        "sae_random": 1,
        "sae_random2": 1,
    }, workers
    assert sum(c["evaluation"] for c in counts.values()) == 3, counts  # each SAE evaluated once
    assert len(set.union(*workers.values())) == 2, workers  # both workers evaluate SAEs
    if release_group_mib:  # one pass per worker's chunk
        assert sum(c["pass"] for c in counts.values()) == 2, counts
    else:
        assert sum(c["pass"] for c in counts.values()) == 3, counts


@pytest.mark.slow  # two xdist workers
def test_an_explicit_dist_mode_is_left_to_xdist(release_pytester: pytest.Pytester) -> None:
    """``--dist loadscope`` (or any mode but load) gets xdist's own scheduler, and the tests still pass."""
    pytest.importorskip("xdist")
    release_pytester.makepyfile(PLACED.format(extra=""))
    result = release_pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope")
    result.assert_outcomes(passed=13)
    # loadscope sends the whole module to one worker
    workers, _ = _placements(release_pytester)
    assert len(set.union(*workers.values())) == 1, workers


def test_the_scheduler_groups_only_saecheck_suffixes() -> None:
    pytest.importorskip("xdist")
    from pytest_saecheck.plugin.xdist import group_of, without_group

    assert group_of("t.py::test[a]@saecheck-release-1a2b3c4d") == "saecheck-release-1a2b3c4d"
    assert without_group("t.py::test[a]@saecheck-release-1a2b3c4d") == "t.py::test[a]"
    assert group_of("t.py::test[x@saecheck-y]") is None  # inside a parameter id: not a group
    assert group_of("t.py::test@mygroup") is None  # a user's loadgroup suffix is not ours
    assert without_group("t.py::test") == "t.py::test"


def test_the_n_devices_setting_reaches_the_model_loader_and_changes_no_number(
    release_pytester: pytest.Pytester,
) -> None:
    """``n_devices`` joins the model's loading kwargs (a separate model in the cache); with n_devices=1 every
    number is the same as without it."""
    from conftest import TINY_CONFTEST

    release_pytester.makeconftest(
        TINY_CONFTEST
        + """
KWARGS = []
_tiny = pytest_saecheck_load_model

def pytest_saecheck_load_model(spec, device, dtype, model_from_pretrained_kwargs):
    KWARGS.append(dict(model_from_pretrained_kwargs))
    model = _tiny(spec, device, dtype)
    if model is not None and "n_devices" in model_from_pretrained_kwargs:
        model.cfg.n_devices = model_from_pretrained_kwargs["n_devices"]  # as from_pretrained(n_devices=) does
    return model
"""
    )
    release_pytester.makepyfile(
        """
        import pytest
        import conftest

        pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160, sae="sae_random")
        SEEN = {}

        def test_default(saecheck):
            SEEN["default"] = saecheck.evaluation

        @pytest.mark.saecheck(n_devices=1)
        def test_one_device(saecheck):
            assert saecheck.model.cfg.n_devices == 1
            evaluation = saecheck.evaluation
            assert evaluation.metrics == SEEN["default"].metrics
            for key, values in SEEN["default"].per_sequence.items():
                assert (evaluation.per_sequence[key] == values).all(), key
            assert conftest.KWARGS == [{}, {"n_devices": 1}]
        """
    )
    release_pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly").assert_outcomes(
        passed=2
    )


MANY = """
    import json
    import pytest
    from pytest_saecheck import evaluate, saecheck_param
    from pytest_saecheck.engine.cost import ModelShape, SAEShape, memory_groups
    from pytest_saecheck.plugin.fixtures import session_cache

    SPECS = [f"many/sae{{i:02d}}" for i in range({n})]
    pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160, release_group_mib={mib})

    SEEN = {{}}

    @pytest.mark.parametrize("sae", [saecheck_param(spec) for spec in SPECS])
    def test_each(saecheck, sae, request):
        evaluation = saecheck.evaluation
        alone = evaluate(saecheck.model, saecheck.sae, saecheck.tokens, progress=False)
        assert evaluation.metrics == alone.metrics  # identical to the SAE evaluated alone
        for key, values in alone.per_sequence.items():
            assert (evaluation.per_sequence[key] == values).all(), key
        SEEN["cfg"], SEEN["tokens"] = saecheck.model.cfg, tuple(saecheck.tokens.shape)

    def test_zz_passes(request):
        cfg = SEEN["cfg"]
        # the cost model's groups, from shapes written out by hand (no engine.cost.shapes_of)
        model = ModelShape(cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.d_vocab, 4)
        saes = [SAEShape(d_in=cfg.d_model, d_sae={d_sae}, layer=1)] * len(SPECS)
        n_sequences, seq_len = SEEN["tokens"]
        groups = memory_groups(model, saes, n_sequences * seq_len, seq_len, 16, {mib} * 2**20)
        expected = [[SPECS[i] for i in group] for group in groups]
        cache = session_cache(request.config)
        found = [["many/" + spec.rsplit("/", 1)[1] for spec in members] for members in cache.pass_log]
        with open("passes.json", "w") as out:
            json.dump({{"expected": expected, "found": found, "loads": cache.loads}}, out)
"""


@pytest.fixture
def many_pytester(tiny_pytester: pytest.Pytester) -> pytest.Pytester:
    from factories import HOOK, random_sae, with_plugin_metadata

    for seed in range(12):
        sae = with_plugin_metadata(random_sae(HOOK, d_sae=1024, seed=seed))
        sae.save_model(tiny_pytester.path / "many" / f"sae{seed:02d}")
    return tiny_pytester


def test_a_release_of_many_saes_runs_in_the_passes_the_cost_model_sizes(
    many_pytester: pytest.Pytester,
) -> None:
    """12 SAEs whose weights exceed a 2 MiB budget: the passes are engine.cost.memory_groups' (in release order),
    more than one, each SAE's weights loaded for its pass only, and every number equals the SAE alone."""
    many_pytester.makepyfile(MANY.format(n=12, mib=2, d_sae=1024))
    result = many_pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=13)
    passes = json.loads((many_pytester.path / "passes.json").read_text())
    assert len(passes["expected"]) >= 3 and max(map(len, passes["expected"])) > 1, passes
    assert passes["found"] == passes["expected"]
    done, total = 0, len(passes["expected"])
    for number, members in enumerate(passes["expected"], 1):  # one progress line per pass, across the release
        result.stdout.fnmatch_lines(
            [
                f"saecheck: release pass {number}/{total}, SAEs {done}/12 done before it: {len(members)} SAEs on *"
            ]
        )
        done += len(members)
    assert passes["loads"]["pass"] == len(passes["expected"])
    assert passes["loads"]["model"] == 1


def test_one_sae_too_big_for_the_budget_is_refused_with_the_numbers(many_pytester: pytest.Pytester) -> None:
    many_pytester.makepyfile(MANY.format(n=2, mib=1, d_sae=1024))
    result = many_pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "-k", "test_each"
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*ConfigError: the SAE '*sae00' needs 1 MiB in a pass of its own*budget of 1 MiB*"]
    )


THIRTY = """
    import pytest
    from pytest_saecheck import saecheck_param

    pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160)

    @pytest.mark.parametrize("sae", [saecheck_param(f"thirty/sae{{i:02d}}") for i in range(30)])
    @pytest.mark.parametrize("n", range(2))
    def test_each(saecheck, sae, n):
        saecheck.evaluation
{other}
"""

OTHER = """
    @pytest.mark.saecheck(sae="sae_identity", n_tokens=320)
    @pytest.mark.parametrize("n", range(3))
    def test_other(saecheck, n):
        saecheck.evaluation
"""

TINY_SHAPE = {"n_layers": 2, "d_model": 32, "d_mlp": 64, "d_vocab": 61}
"""The "tiny" model's config (``factories.make_model``'s defaults), given to the plan as a plug-in would."""


@pytest.fixture
def thirty_pytester(tiny_pytester: pytest.Pytester) -> pytest.Pytester:
    from conftest import TINY_CONFTEST
    from factories import HOOK, random_sae, with_plugin_metadata

    tiny_pytester.makeconftest(
        TINY_CONFTEST
        + f"""
def pytest_saecheck_model_config(spec):
    return {TINY_SHAPE!r} if spec.startswith("tiny") else None
"""
    )
    for seed in range(30):
        sae = with_plugin_metadata(random_sae(HOOK, d_sae=64, seed=seed))
        sae.save_model(tiny_pytester.path / "thirty" / f"sae{seed:02d}")
    return tiny_pytester


def _expected_chunks(with_other: bool) -> list[int]:
    """The SAEs per chunk the cost model cuts the 30-SAE release into (beside ``OTHER``'s group on two workers),
    from the shapes written out by hand."""
    from pytest_saecheck.engine.cost import ModelShape, SAEShape, pass_cost
    from pytest_saecheck.plugin.schedule import GroupCost, chunk_costs, chunk_counts

    model = ModelShape(**TINY_SHAPE)
    sae = SAEShape(d_in=32, d_sae=64, layer=1)  # blocks.1.hook_resid_pre
    release = pass_cost(model, [sae] * 30, 160, 16, 16)
    groups = [GroupCost(release.flops_shared, release.flops_per_sae)]
    if with_other:
        other = pass_cost(model, [SAEShape(d_in=32, d_sae=64, layer=1)], 320, 16, 16)
        groups.append(GroupCost(other.flops_shared, other.flops_per_sae, splittable=False))
    [count, *_] = chunk_counts(groups, workers=2)
    chunks = chunk_costs(groups[0], count)[0]
    return [chunks.count(chunk) for chunk in sorted(set(chunks))]


@pytest.mark.slow  # two xdist workers, each importing torch, TransformerLens and SAE Lens
@pytest.mark.parametrize("with_other", [False, True], ids=["alone", "beside-another-group"])
def test_a_release_of_thirty_saes_keeps_both_workers_busy_with_the_numbers_of_one_process(
    thirty_pytester: pytest.Pytester, with_other: bool
) -> None:
    """Under ``-n 2``, a one-group release of 30 SAEs (alone, or beside a small group of another SAE) is cut as
    the cost model balances two workers: each worker's test count in the JSON is its chunks' (and the other
    group's), each SAE's tests share a worker, and the document equals a single process's."""
    pytest.importorskip("xdist")
    from pytest_saecheck.report.schema import comparable

    thirty_pytester.makepyfile(THIRTY.format(other=OTHER if with_other else ""))
    n_tests = 60 + (3 if with_other else 0)
    serial = thirty_pytester.runpytest_inprocess("-p", "no:cacheprovider", "--saecheck-json", "serial.json")
    serial.assert_outcomes(passed=n_tests)
    parallel = thirty_pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-n", "2", "--saecheck-json", "parallel.json"
    )
    parallel.assert_outcomes(passed=n_tests)
    one, two = (
        json.loads((thirty_pytester.path / name).read_text()) for name in ("serial.json", "parallel.json")
    )
    assert comparable(one) == comparable(two)  # every number as in one process (passes cut otherwise)
    assert all("worker" not in test for test in one["tests"])
    workers = {test["id"]: test["worker"] for test in two["tests"]}
    per_worker: dict[str, int] = {}
    for worker in workers.values():
        per_worker[worker] = per_worker.get(worker, 0) + 1
    chunks = _expected_chunks(with_other)
    assert chunks == [15, 15]  # the cost model's balance for equal SAEs (checked here, then in the run)
    tests = [2 * size for size in chunks]  # two tests per SAE; the other group's 3 go to either worker
    expected = [sorted([tests[0] + 3, tests[1]]), sorted([tests[0], tests[1] + 3])] if with_other else [tests]
    assert sorted(per_worker.values()) in expected, per_worker
    assert min(per_worker.values()) >= n_tests / 3
    for entry in two["saes"]:  # each SAE's tests on one worker
        assert len({workers[test] for test in entry["tests"]}) == 1, entry["label"]


TRACKED = """
    import json
    import numpy as np
    import pytest
    from live_bytes import LiveTensorBytes
    from pytest_saecheck import saecheck_param
    from pytest_saecheck.plugin.fixtures import session_cache

    SPECS = [f"many/sae{{i:02d}}" for i in range(24)]
    pytestmark = pytest.mark.saecheck(model="tiny", tokens="tokens.npy", n_tokens=160, release_group_mib={mib})
    TRACKER = LiveTensorBytes()

    @pytest.fixture(scope="module", autouse=True)
    def tracked():
        # every tensor of the run is counted from here: the model's and each SAE's weights, batches, sums
        with TRACKER:
            yield

    @pytest.mark.parametrize("sae", [saecheck_param(spec) for spec in SPECS])
    def test_each(saecheck, sae):
        evaluation = saecheck.evaluation
        name = sae.rsplit("/", 1)[1]
        with open(f"metrics-{{name}}.json", "w") as out:
            json.dump(evaluation.metrics, out)
        np.savez(f"sums-{{name}}.npz", **evaluation.per_sequence)

    def test_zz_passes(request):
        cache = session_cache(request.config)
        with open("passes.json", "w") as out:
            json.dump({{"found": [list(members) for members in cache.pass_log], "peak": TRACKER.peak}}, out)
"""


@pytest.mark.slow
def test_a_release_bigger_than_its_budget_runs_in_passes_under_the_budget(
    tiny_pytester: pytest.Pytester,
) -> None:
    """Issue 26: 24 demo-sized SAEs whose weights (24 MiB) exceed an 8 MiB budget that holds 5 of them beside the
    model and a batch run in 5 passes; the live tensor bytes of the whole run (the engine tests' tracker) stay
    under the budget, and every number equals the run that evaluates each SAE alone."""
    import numpy as np
    from factories import HOOK, random_sae, with_plugin_metadata

    from pytest_saecheck.engine.cost import ModelShape, SAEShape, memory_groups

    for seed in range(24):
        sae = with_plugin_metadata(random_sae(HOOK, d_sae=4096, seed=seed))
        sae.save_model(tiny_pytester.path / "many" / f"sae{seed:02d}")
    model = ModelShape(2, 32, 64, 61, 4)  # factories.make_model's defaults
    shape = SAEShape(d_in=32, d_sae=4096, layer=1)
    assert 24 * shape.weight_bytes > 8 * 2**20
    groups = memory_groups(model, [shape] * 24, 160, 16, 16, 8 * 2**20)
    assert [len(group) for group in groups] == [5, 5, 5, 5, 4]

    found = {}
    for mib in (8, 0):
        tiny_pytester.makepyfile(TRACKED.format(mib=mib))
        result = tiny_pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-q")
        result.assert_outcomes(passed=25)
        passes = json.loads((tiny_pytester.path / "passes.json").read_text())
        metrics = {
            path.name: json.loads(path.read_text())
            for path in sorted(tiny_pytester.path.glob("metrics-*.json"))
        }
        sums = {path.name: dict(np.load(path)) for path in sorted(tiny_pytester.path.glob("sums-*.npz"))}
        found[mib] = (passes, metrics, sums)
    passes, metrics, sums = found[8]
    assert [len(members) for members in passes["found"]] == [5, 5, 5, 5, 4]
    assert 0 < passes["peak"] <= 8 * 2**20, passes["peak"] / 2**20
    alone_passes, alone_metrics, alone_sums = found[0]
    assert len(alone_passes["found"]) == 24  # each SAE alone
    assert len(metrics) == 24 and metrics == alone_metrics
    for name, arrays in sums.items():
        assert arrays.keys() == alone_sums[name].keys()
        for key, values in arrays.items():
            assert np.array_equal(values, alone_sums[name][key]), (name, key)
