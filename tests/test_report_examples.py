"""The shipped examples end to end: serial and ``-n 2`` runs give equal documents; merged shards give the same.

Runs ``pytest examples`` in subprocesses on the demo model with few tokens: marked ``slow`` (``--run-slow``).
Skipped until the examples and the demo assets exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_saecheck.report.files import load_document
from pytest_saecheck.report.merge import merge_documents
from pytest_saecheck.report.schema import comparable

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("test_*.py"))
DEMO_ASSETS = ROOT / "pytest_saecheck" / "demo" / "assets"
N_TOKENS = "2048"

pytestmark = [
    pytest.mark.slow,  # five `pytest examples` subprocesses, each importing torch, TransformerLens and SAE Lens
    pytest.mark.skipif(
        not EXAMPLES or not any(DEMO_ASSETS.glob("*")),
        reason="the examples or the demo assets are not there yet (examples/test_*.py, pytest_saecheck/demo/assets/)",
    ),
]


def run_examples(tmp_path: Path, name: str, *args: str, paths: list[Path] | None = None) -> dict:
    json_path = tmp_path / f"{name}.json"
    command = [
        sys.executable,
        "-m",
        "pytest",
        *(str(path) for path in (paths or EXAMPLES)),
        "-p",
        "pytest_saecheck.report.plugin",
        "-p",
        "no:cacheprovider",
        "-q",
        "--saecheck-n-tokens",
        N_TOKENS,
        "--saecheck-json",
        str(json_path),
        "--saecheck-report",
        str(tmp_path / f"{name}.html"),
        *args,
    ]
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=environment, check=False
    )
    assert completed.returncode in (0, 1), completed.stdout[-4000:] + completed.stderr[-4000:]
    assert (tmp_path / f"{name}.html").is_file()
    return load_document(json_path)


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_examples(tmp_path_factory.mktemp("serial"), "serial")


def test_serial_run_covers_every_example(serial: dict) -> None:
    assert serial["run"]["complete"] and serial["saes"]
    files = {test["id"].split("::")[0] for test in serial["tests"]}
    assert files == {str(path.relative_to(ROOT)) for path in EXAMPLES}
    for sae in serial["saes"]:
        if sae["evaluated"]:
            assert sae["metrics"] and sae["tokens"]["n_tokens"]


def test_xdist_run_gives_the_same_document(serial: dict, tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    parallel = run_examples(tmp_path, "parallel", "-n", "2", "--dist", "loadgroup")
    assert comparable(parallel) == comparable(serial)


def test_merged_shards_give_the_same_document(serial: dict, tmp_path: Path) -> None:
    if len(EXAMPLES) < 2:
        pytest.skip("one example file: nothing to shard")
    half = len(EXAMPLES) // 2
    shards = [
        run_examples(tmp_path, "shard0", paths=EXAMPLES[:half]),
        run_examples(tmp_path, "shard1", paths=EXAMPLES[half:]),
    ]
    assert comparable(merge_documents(shards)) == comparable(serial)
