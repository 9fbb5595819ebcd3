"""The result document: building it from records, its schema, merging, HTML rendering, atomic writes, GPU pinning.

No model runs here: the records are built by hand (``pytest_saecheck.report.sample``), shaped like the plugin's.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import stat
from pathlib import Path

import pytest

from pytest_saecheck.files import write_atomic
from pytest_saecheck.plugin import gpu
from pytest_saecheck.report.__main__ import main
from pytest_saecheck.report.collect import build_document, latent_density_histogram
from pytest_saecheck.report.files import dumps, load_document
from pytest_saecheck.report.html import render_html, worst_first
from pytest_saecheck.report.merge import merge_documents
from pytest_saecheck.report.sample import FakeReport, evaluation_record, sae_test_reports, sample_reports
from pytest_saecheck.report.schema import SchemaError, comparable, validate


def document_of(reports: list[FakeReport]) -> dict:
    document = build_document(reports)
    validate(document)
    return document


# -- building ---------------------------------------------------------------------------------------------


def test_every_sae_assertion_and_test_is_in_the_document() -> None:
    document = document_of(sample_reports())
    labels = {sae["label"]: sae for sae in document["saes"]}
    assert set(labels) == {"demo/good", "demo/bad", "demo/mid"}
    bad = labels["demo/bad"]
    assert bad["status"] == "failed"
    assert [(a["assertion"], a["metric"], a["outcome"]) for a in bad["assertions"]] == [
        ("assert_ce_recovery", "ce_loss_score", "failed"),
        ("assert_ce_recovery", "delta_ce", "failed"),
        ("assert_r2_matches_legacy", "explained_variance", "passed"),
    ]
    first = bad["assertions"][0]
    assert first["test_id"] == "examples/test_bad.py::test_behaviour"
    assert first["threshold"] == {"min": 0.9, "max": None, "tol": None}
    assert first["interval"] is not None and first["interval_level"] == 0.95
    assert bad["assertions"][2]["threshold"]["tol"] == 0.05
    assert labels["demo/good"]["status"] == "passed"
    assert bad["outcomes"] == {"failed": 1, "passed": 1}
    assert bad["tests"] == [
        "examples/test_bad.py::test_behaviour",
        "examples/test_bad.py::test_metric_consistency",
    ]
    # identity, tokens, policy, curves, density, intervals
    assert bad["hook"]["name"] == "blocks.1.hook_resid_pre"
    assert bad["tokens"]["n_tokens"] == 64 * 31 and bad["tokens"]["source"] == "demo"
    assert bad["token_policy"]["exclude_bos"] is True
    assert bad["delta_ce_by_position"][0] is None and len(bad["delta_ce_by_position"]) == 32
    assert bad["latent_density_histogram"]["n_latents"] == 512
    assert set(bad["intervals"]) >= {"ce_orig", "ce_sae", "delta_ce", "ce_loss_score", "explained_variance"}
    for name in ("ce_orig", "ce_sae", "ce_zero", "ce_mean", "ce_loss_score", "explained_variance_about_zero"):
        assert name in bad["metrics"]
    # the reported-metrics assertion has no SAE
    [reported] = document["unattached_assertions"]
    assert reported["outcome"] == "failed" and reported["details"]["legacy"] == 0.78
    assert document["run"]["outcomes"] == {"failed": 2, "passed": 5}
    assert document["run"]["n_tests"] == 7
    assert document["environment"]["devices"] == ["cpu"]
    assert document["environment"]["packages"]["pytest"]


def test_arrival_order_does_not_matter() -> None:
    """xdist delivers reports in any order; the document must not depend on it."""
    reports = sample_reports()
    shuffled = reports[:]
    random.Random(3).shuffle(shuffled)
    # keep each test's phases in order (a worker sends them in order), interleave the tests
    by_test: dict[str, list[FakeReport]] = {}
    for report in reports:
        by_test.setdefault(report.nodeid, []).append(report)
    interleaved = []
    order = [report.nodeid for report in shuffled]
    for nodeid in order:
        interleaved.append(by_test[nodeid].pop(0))
    assert comparable(document_of(interleaved)) == comparable(document_of(reports))


def test_each_worker_reports_its_own_evaluation_and_the_first_in_node_order_wins() -> None:
    """Under xdist two workers evaluate the same SAE; the chosen record must not depend on arrival order."""
    a = sae_test_reports("t.py", "demo/x", ce_sae=2.5)
    later = evaluation_record("demo/x", ce_sae=2.5, duration_s=99.0)
    a[4].saecheck_records[0] = later  # the second test's evaluation (another worker, other timing)
    forward = document_of(a)
    backward = document_of(a[3:] + a[:3])
    assert forward["saes"][0]["evaluation_duration_s"] == backward["saes"][0]["evaluation_duration_s"] != 99.0


def test_loadgroup_suffix_is_removed_from_node_ids() -> None:
    from pytest_saecheck.report.collect import Collector

    collector = Collector(strip_xdist_group=True)
    for nodeid in ("t.py::TestA::test_x@sae_a", "t.py::test_p[a@b]@grp", "t@x.py::test_y", "t.py::test_z[1]"):
        collector.add_report(FakeReport(nodeid, "call"))
    ids = [test["id"] for test in collector.document()["tests"]]
    assert ids == ["t.py::TestA::test_x", "t.py::test_p[a@b]", "t.py::test_z[1]", "t@x.py::test_y"]


def test_missing_fields_are_none_and_render_as_na() -> None:
    """A minimal evaluation record (no intervals, no curves, no density) still gives a valid document."""
    record = {"kind": "evaluation", "label": "bare", "metrics": {"ce_orig": 2.0, "ce_sae": float("nan")}}
    reports = [
        FakeReport("t.py::test_bare", "setup", saecheck_records=[{"kind": "subject", "label": "bare"}]),
        FakeReport("t.py::test_bare", "call", saecheck_records=[record]),
        FakeReport("t.py::test_bare", "teardown"),
    ]
    document = document_of(reports)
    [sae] = document["saes"]
    assert sae["metrics"] == {"ce_orig": 2.0}
    assert "ce_sae" in sae["undefined"]  # NaN is not a number JSON can hold: it is recorded as undefined
    assert sae["intervals"] == {} and sae["latent_density_histogram"] is None
    assert sae["hook"]["name"] is None and sae["tokens"]["n_tokens"] is None
    html = render_html(document)
    assert "n/a" in html and "no latent density recorded" in html
    json.loads(dumps(document))


def test_intervals_fall_back_to_the_assertions_intervals() -> None:
    reports = sae_test_reports("t.py", "demo/x", with_intervals=False)
    [sae] = document_of(reports)["saes"]
    assert set(sae["intervals"]) == {"ce_loss_score", "delta_ce"}  # the two asserted at the 95% level
    assert sae["interval_level"] == 0.95


def test_subject_only_tests_and_errors_attach_to_the_sae() -> None:
    reports = sae_test_reports("t.py", "demo/x")
    record = evaluation_record("demo/x")
    subject = {
        "kind": "subject",
        **{key: record[key] for key in ("label", "model", "sae", "tokens", "device", "dtype")},
    }
    reports += [
        FakeReport("t.py::test_training", "setup", saecheck_records=[subject]),
        FakeReport("t.py::test_training", "call", "passed"),
        FakeReport("t.py::test_training", "teardown"),
        FakeReport("t.py::test_broken", "setup", "failed", saecheck_records=[subject], longrepr="boom"),
        FakeReport("t.py::test_broken", "teardown"),
    ]
    document = document_of(reports)
    [sae] = document["saes"]
    assert "t.py::test_training" in sae["tests"] and "t.py::test_broken" in sae["tests"]
    assert sae["status"] == "error"
    tests = {test["id"]: test for test in document["tests"]}
    assert tests["t.py::test_broken"]["outcome"] == "error"
    assert tests["t.py::test_broken"]["message"] == "boom"


def test_outcomes_of_skips_xfails_and_crashed_workers() -> None:
    skip = FakeReport("t.py::test_skip", "setup", "skipped", longrepr=("t.py", 3, "Skipped: no weights"))
    xfail = FakeReport("t.py::test_xfail", "call", "skipped")
    xfail.wasxfail = "known"  # type: ignore[attr-defined]
    crashed = FakeReport("t.py::test_crash", "???", "failed", longrepr="worker 'gw0' crashed while running")
    collect = FakeReport("broken.py", "collect", "failed", longrepr="ImportError: nope")
    unfinished = FakeReport("t.py::test_unfinished", "setup", "passed")
    document = document_of([skip, xfail, crashed, collect, unfinished])
    outcomes = {test["id"]: (test["outcome"], test["message"]) for test in document["tests"]}
    assert outcomes == {
        "t.py::test_skip": ("skipped", "Skipped: no weights"),
        "t.py::test_xfail": ("xfailed", None),
        "t.py::test_crash": ("failed", "worker 'gw0' crashed while running"),
        "broken.py": ("error", "ImportError: nope"),
    }


def test_latent_density_histogram() -> None:
    histogram = latent_density_histogram([0.0, 0.0, 1e-4, 2e-4, 0.5, 1.0])
    assert histogram["dead"] == 2 and histogram["n_latents"] == 6
    assert sum(histogram["counts"]) == 4
    assert histogram["log10_edges"][0] == -4.0 and histogram["log10_edges"][-1] == 0.0
    assert len(histogram["counts"]) == 16  # quarter decades from 1e-4 to 1
    assert histogram["counts"][0] == 1 and histogram["counts"][1] == 1  # 1e-4 and 2e-4
    assert histogram["counts"][14] == 1 and histogram["counts"][15] == 1  # 0.5, and 1.0 in the last bin
    assert latent_density_histogram([]) is None
    assert latent_density_histogram([0.0, 0.0])["counts"] == [0, 0, 0, 0]


# -- schema --------------------------------------------------------------------------------------------


def test_validate_rejects_broken_documents() -> None:
    document = document_of(sample_reports())
    broken = json.loads(dumps(document))
    broken["saes"][0]["status"] = "great"
    del broken["saes"][1]["metrics"]
    broken["saes"][2]["assertions"][0]["interval"] = [1.0]
    with pytest.raises(SchemaError) as error:
        validate(broken)
    message = str(error.value)
    assert (
        "$.saes[0].status" in message
        and "metrics" in message
        and "$.saes[2].assertions[0].interval" in message
    )
    with pytest.raises(SchemaError, match="schema_version 99 is not supported"):
        validate({**document, "schema_version": 99})


def test_json_has_no_nan_and_round_trips(tmp_path: Path) -> None:
    document = document_of(sample_reports())
    document["extensions"]["x"] = {"nan": float("nan"), "inf": math.inf}
    text = dumps(document)
    assert "NaN" not in text and "Infinity" not in text
    path = write_atomic(tmp_path / "sub" / "r.json", text)
    assert load_document(path)["extensions"]["x"] == {"nan": None, "inf": None}


def test_comparable_drops_only_timings() -> None:
    document = document_of(sample_reports())
    other = json.loads(dumps(document))
    other["created"] = "later"
    other["run"]["duration_s"] = 123.0
    other["tests"][0]["duration_s"] = 9.0
    other["saes"][0]["evaluation_duration_s"] = 9.0
    assert comparable(other) == comparable(document)
    other["saes"][0]["metrics"]["ce_sae"] += 1e-3
    assert comparable(other) != comparable(document)


# -- merge ---------------------------------------------------------------------------------------------


def shards_of(reports: list[FakeReport], key) -> list[dict]:
    groups: dict[str, list[FakeReport]] = {}
    for report in reports:
        groups.setdefault(key(report), []).append(report)
    return [json.loads(dumps(document_of(group))) for group in groups.values()]


def test_merge_of_shards_equals_one_run() -> None:
    reports = sample_reports()
    single = document_of(reports)
    by_file = shards_of(reports, lambda report: report.nodeid.split("::")[0])
    assert len(by_file) == 4
    merged = merge_documents(by_file)
    assert comparable(merged) == comparable(single)
    assert merged["run"]["shards"] == 4
    # an SAE whose tests are split across shards
    by_test = shards_of(reports, lambda report: report.nodeid)
    assert comparable(merge_documents(by_test[::-1])) == comparable(single)
    assert render_html(merged).count('class="sae ') == render_html(single).count('class="sae ')


def test_merge_keeps_the_worst_outcome_of_a_repeated_test() -> None:
    passed = document_of(sae_test_reports("t.py", "demo/x", ce_sae=2.2))
    failed = document_of(sae_test_reports("t.py", "demo/x", ce_sae=2.2, min_score=0.99))
    merged = merge_documents([passed, failed])
    assert {test["outcome"] for test in merged["tests"]} == {"failed", "passed"}
    assert merged["saes"][0]["status"] == "failed"


def test_merge_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reports = sample_reports()
    paths = []
    for number, shard in enumerate(shards_of(reports, lambda report: report.nodeid.split("::")[0])):
        paths.append(tmp_path / f"shard{number}.json")
        paths[-1].write_text(json.dumps(shard), encoding="utf-8")
    out_json, out_html = tmp_path / "out" / "merged.json", tmp_path / "out" / "merged.html"
    assert main(["merge", *map(str, paths), "--json", str(out_json), "--html", str(out_html)]) == 0
    assert comparable(load_document(out_json)) == comparable(document_of(reports))
    assert "demo/bad" in out_html.read_text()
    assert "HTML report written to" in capsys.readouterr().out
    assert main(["merge", str(paths[0])]) == 0  # no output file: the JSON goes to stdout
    assert json.loads(capsys.readouterr().out)["schema"] == "pytest-saecheck/report"
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["merge", str(tmp_path / "bad.json")]) == 2
    (tmp_path / "other.json").write_text(json.dumps({"schema": "x"}))
    assert main(["merge", str(tmp_path / "other.json")]) == 2
    assert "not a valid saecheck result document" in capsys.readouterr().err


# -- HTML ----------------------------------------------------------------------------------------------


def test_html_is_self_contained_and_escaped() -> None:
    reports = sae_test_reports("t.py", "<script>alert(1)</script>")
    html = render_html(document_of(reports))
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'http-equiv="Content-Security-Policy"' in html and "default-src &#39;none&#39;" in html
    # no reference to anything outside the file (the SVG namespace is an identifier, not a fetch)
    urls = set(re.findall(r"(?:src|href)\s*=\s*[\"']?([^\"' >]+)", html))
    assert all(url.startswith("#") for url in urls), urls
    assert "@import" not in html and "url(" not in html


def test_overview_is_worst_first() -> None:
    document = document_of(sample_reports())
    order = [sae["label"] for sae in worst_first(document["saes"])]
    assert order == ["demo/bad", "demo/mid", "demo/good"]  # failed first, then the larger ΔCE
    html = render_html(document)
    overview = html[
        html.index('id="overview-table"') : html.index("</table>", html.index('id="overview-table"'))
    ]
    assert [overview.index(f">{label}</a>") for label in order] == sorted(
        overview.index(f">{label}</a>") for label in order
    )


def test_raw_cross_entropies_sit_beside_the_normalised_scores() -> None:
    document = document_of(sae_test_reports("t.py", "demo/x", ce_sae=3.0, ce_zero=9.8, ce_orig=2.1))
    html = render_html(document)
    section = html[html.index("Normalised scores") :]
    # the zero-ablation score is shown with the losses it is made of
    assert "(9.8000 − 3.0000) / (9.8000 − 2.1000)" in section
    for name in (
        "ce_orig",
        "ce_sae",
        "ce_zero",
        "ce_mean",
        "explained_variance_legacy",
        "explained_variance_about_zero",
    ):
        assert name in html
    assert "ΔCE and KL by token position" in html and "Latent firing density" in html


# -- atomic writes -------------------------------------------------------------------------------------


def test_write_atomic_never_leaves_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    write_atomic(target, "old")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644

    def fail(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new" * 1000)
    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json"]


# -- GPU pinning ---------------------------------------------------------------------------------------


def test_visible_gpus_from_the_environment() -> None:
    assert gpu.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == ["0", "1", "3"]
    assert gpu.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]
    assert gpu.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpu.visible_gpus({}, nvidia_smi=None) == []


def test_gpus_from_nvidia_smi_listing() -> None:
    listing = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaa)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbb)\n"
        "  MIG 3g.40gb     Device  0: (UUID: MIG-111)\n"
        "  MIG 3g.40gb     Device  1: (UUID: MIG-222)\n"
    )
    assert gpu.gpus_from_listing(listing) == ["0", "MIG-111", "MIG-222"]


def test_nvidia_smi_is_asked_without_touching_cuda(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: A (UUID: GPU-a)'\necho 'GPU 1: B (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    environ = {"PYTEST_XDIST_WORKER": "gw3"}
    assert gpu.pin_worker_gpu(environ, nvidia_smi=str(fake)) == "1"
    assert environ["CUDA_VISIBLE_DEVICES"] == "1"
    # pinned: one GPU visible now, so a second call changes nothing
    assert gpu.pin_worker_gpu(environ, nvidia_smi=str(fake)) is None


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"PYTEST_XDIST_WORKER": "gw0", "CUDA_VISIBLE_DEVICES": "4,5"}, "4"),
        ({"PYTEST_XDIST_WORKER": "gw1", "CUDA_VISIBLE_DEVICES": "4,5"}, "5"),
        ({"PYTEST_XDIST_WORKER": "gw2", "CUDA_VISIBLE_DEVICES": "4,5"}, "4"),
        ({"PYTEST_XDIST_WORKER": "gw1", "CUDA_VISIBLE_DEVICES": "4"}, None),  # one GPU: leave it
        ({"CUDA_VISIBLE_DEVICES": "4,5"}, None),  # not a worker
    ],
)
def test_pin_worker_gpu(environ: dict[str, str], expected: str | None) -> None:
    before = environ.get("CUDA_VISIBLE_DEVICES")
    assert gpu.pin_worker_gpu(environ, nvidia_smi=None) == expected
    assert environ.get("CUDA_VISIBLE_DEVICES") == (expected or before)
