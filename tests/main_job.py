"""The main job's reference: `make demo`'s run (``pytest examples``) as recorded on main before the evaluation's
fields got one definition, and the means to replay it.

``tests/data/main_job/`` holds what that run produced: ``reports.jsonl.gz`` (every test report's phase, outcome,
duration, short message and saecheck records, in arrival order, as :class:`CapturePlugin` writes them),
``result.json`` and ``report.html`` (the files it wrote). The checkout's root is written as :data:`ROOT_MARK`.
Made at main 0642c93 by ``python tests/main_job.py`` (:func:`main`: the main job with :func:`pytest_runtest_logreport`
as a plugin, then :data:`ROOT_MARK` put for the checkout's root in the three files, the capture gzipped). Run it
again only where a change is meant to change the main job's JSON or HTML, and say so.

:func:`replay` feeds the recorded reports to the report collector with the run's own volatile facts (its id,
times, environment), as the report plugin does, so the document and page it gives are comparable to the files
byte for byte.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

DATA = Path(__file__).resolve().parent / "data" / "main_job"
ROOT = Path(__file__).resolve().parent.parent
#: What stands for the checkout's root in the reference files.
ROOT_MARK = "/saecheck-root"
#: The environment variable naming the file :class:`CapturePlugin` appends to.
CAPTURE = "SAECHECK_CAPTURE"


def pytest_runtest_logreport(report: Any) -> None:
    """Append one test report's phase, outcome, duration, message and records to ``$SAECHECK_CAPTURE``."""
    path = os.environ.get(CAPTURE)
    if not path:
        return
    from pytest_saecheck.report.collect import _short_message

    line = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "wasxfail": hasattr(report, "wasxfail"),
        "duration": report.duration,
        "message": _short_message(report),
        "saecheck_records": getattr(report, "saecheck_records", None) or [],
    }
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, default=str) + "\n")


def read_capture(path: Path) -> list[dict[str, Any]]:
    """The captured report lines of ``path`` (gzipped when it ends in ``.gz``), the root written as the mark."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8").replace(str(ROOT), ROOT_MARK)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _report(line: dict[str, Any]) -> SimpleNamespace:
    report = SimpleNamespace(
        nodeid=line["nodeid"],
        when=line["when"],
        outcome=line["outcome"],
        duration=line["duration"],
        longrepr=None,
        saecheck_records=line["saecheck_records"],
        saecheck_error=line["message"],
    )
    if line["wasxfail"]:
        report.wasxfail = ""
    return report


def replay(lines: list[dict[str, Any]], reference: dict[str, Any]) -> dict[str, Any]:
    """The document the report plugin builds from these reports, with the run facts of ``reference`` (a
    document: its run id, times, exit status and environment), finalised and validated."""
    from pytest_saecheck.report.collect import PACKAGES, Collector
    from pytest_saecheck.report.schema import finalise, validate

    collector = Collector()
    for line in lines:
        collector.add_report(_report(line))
    run = {key: value for key, value in reference["run"].items() if key not in ("n_tests", "outcomes")}
    recorded = reference["environment"]
    environment = {  # in the order the report plugin writes it
        **{key: recorded[key] for key in ("python", "implementation", "platform")},
        "packages": {name: recorded["packages"][name] for name in PACKAGES},
    }
    document = collector.document(run=run, environment_info=environment, created=reference["created"])
    finalise(document)
    validate(document)
    return document


def reference() -> tuple[list[dict[str, Any]], dict[str, Any], str, str]:
    """The captured reports, the parsed reference document, and the reference JSON and HTML texts."""
    text = (DATA / "result.json").read_text(encoding="utf-8")
    html = (DATA / "report.html").read_text(encoding="utf-8")
    return read_capture(DATA / "reports.jsonl.gz"), json.loads(text), text, html


def run_main_job(directory: Path) -> subprocess.CompletedProcess[str]:
    """Run the main job (``pytest examples``, as ``make demo``) in the checkout, capturing its reports into
    ``directory/reports.jsonl`` and writing ``result.json`` and ``report.html`` there."""
    environment = {
        **os.environ,
        CAPTURE: str(directory / "reports.jsonl"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "main_job", "-q", "examples"]
    command += [
        "--saecheck-json",
        str(directory / "result.json"),
        "--saecheck-report",
        str(directory / "report.html"),
    ]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=3600)


def main() -> int:
    """Write the reference files of ``tests/data/main_job`` from a run of the main job in this checkout."""
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        result = run_main_job(directory)
        if result.returncode != 0:
            print(result.stdout[-4000:], result.stderr[-4000:], file=sys.stderr)
            return result.returncode
        capture = (directory / "reports.jsonl").read_text(encoding="utf-8").replace(str(ROOT), ROOT_MARK)
        DATA.mkdir(parents=True, exist_ok=True)
        (DATA / "reports.jsonl.gz").write_bytes(gzip.compress(capture.encode("utf-8"), mtime=0))
        for file in ("result.json", "report.html"):
            text = (directory / file).read_text(encoding="utf-8").replace(str(ROOT), ROOT_MARK)
            (DATA / file).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
