"""Make the README's screenshot of the demo report (``docs/report.png``) with headless Chromium.

Usage::

    python scripts/screenshot_report.py                   # run `pytest examples` on the demo model, shoot its report
    python scripts/screenshot_report.py --from-json r.json  # shoot the report of an existing result document
    python scripts/screenshot_report.py --sample            # shoot a report of synthetic numbers (no model needed)

Needs the ``chromium`` binary (Debian: ``apt-get install -y chromium``). Chromium is started with flags that keep
it off the network; the report itself forbids every fetch through its Content-Security-Policy.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Flags that keep Chromium from reaching for the network on its own (tests/test_report_browser.py uses them too).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)


def report_from_examples(workdir: Path, n_tokens: int) -> Path:
    html = workdir / "report.html"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "examples",
        "-p",
        "pytest_saecheck.report.plugin",
        "-q",
        "--saecheck-n-tokens",
        str(n_tokens),
        "--saecheck-json",
        str(workdir / "report.json"),
        "--saecheck-report",
        str(html),
    ]
    completed = subprocess.run(command, cwd=ROOT, check=False)
    if completed.returncode not in (0, 1) or not html.is_file():
        raise SystemExit(f"pytest examples failed (exit {completed.returncode}); no report to shoot")
    return html


def report_from_document(document: dict, workdir: Path) -> Path:
    from pytest_saecheck.report.html import render_html

    html = workdir / "report.html"
    html.write_text(render_html(document), encoding="utf-8")
    return html


def screenshot(html: Path, output: Path, width: int, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (Debian: apt-get install -y chromium)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="saecheck-chromium-") as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={output}",
                f"--window-size={width},{height}",
                html.resolve().as_uri(),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
    if not output.is_file() or output.stat().st_size < 10_000:
        raise SystemExit(f"Chromium wrote no usable screenshot to {output}")
    print(f"screenshot written to {output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-json", type=Path, help="a result document written by --saecheck-json")
    source.add_argument("--sample", action="store_true", help="synthetic numbers instead of the examples")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument(
        "--n-tokens", type=int, default=16_384, help="tokens per SAE when running the examples"
    )
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="saecheck-report-") as directory:
        workdir = Path(directory)
        if arguments.from_json is not None:
            from pytest_saecheck.report.files import load_document

            html = report_from_document(load_document(arguments.from_json), workdir)
        elif arguments.sample:
            from pytest_saecheck.report.collect import build_document
            from pytest_saecheck.report.sample import sample_reports

            html = report_from_document(build_document(sample_reports()), workdir)
        else:
            html = report_from_examples(workdir, arguments.n_tokens)
        screenshot(html, arguments.output, arguments.width, arguments.height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
