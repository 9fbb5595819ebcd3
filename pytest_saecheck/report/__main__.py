"""``python -m pytest_saecheck.report``: merge result documents and render reports without running tests.

``merge`` combines the documents of sharded runs into the document one run over all shards would have written
(see :mod:`pytest_saecheck.report.merge`); without ``--json`` or ``--html`` it prints the merged JSON. The same
shard given twice is refused. ``render`` needs ``--html``. The JSON and HTML are written as one commit; HTML
sections read from a file are shown as text, never as markup. ``check`` tells whether a JSON result and an HTML
report are one run's. ``export-saebench`` writes each evaluated SAE of a result in SAEBench's core result format
(:mod:`pytest_saecheck.report.saebench`). Exit status: 0 when the files were written (whatever the tests' outcomes), 1 when a file
could not be written or ``check`` finds two runs, 2 on bad input. ``--help`` shows the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

PROG = "python -m pytest_saecheck.report"
DESCRIPTION = "Merge the JSON results of saecheck runs and render HTML reports, without running tests."
EPILOG = f"""examples:
  {PROG} merge shard-*.json --html report.html --json report.json
  {PROG} render result.json --html report.html
  {PROG} check report.json report.html (are they one run's?)
  {PROG} export-saebench result.json saebench/   (one SAEBench core result per SAE)
  {PROG} sample --html sample.html      (a report of invented numbers, to preview the layout)

merge prints the merged JSON when given neither --json nor --html. HTML sections read from a
JSON file are shown as text. Exit status: 0 when the files were written (whatever the tests'
outcomes), 1 when a file could not be written or check finds two runs, 2 on bad input."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{merge,render,check,export-saebench,sample}"
    )
    merge = commands.add_parser(
        "merge",
        help="merge the JSON results of sharded runs (each shard once)",
        description="Merge the JSON results of sharded runs into the result one run over all of them gives.",
    )
    merge.add_argument("inputs", nargs="+", metavar="RESULT.json")
    merge.add_argument("--json", metavar="PATH", help="write the merged JSON result here")
    merge.add_argument("--html", metavar="PATH", help="write the HTML report here")
    render = commands.add_parser(
        "render", help="render a JSON result as HTML", description="Render one JSON result as an HTML report."
    )
    render.add_argument("inputs", nargs=1, metavar="RESULT.json")
    render.add_argument("--html", metavar="PATH", required=True, help="write the HTML report here (required)")
    export = commands.add_parser(
        "export-saebench",
        help="write each SAE's core numbers in SAEBench's core result format",
        description="Write one SAEBench core result file per evaluated SAE of a JSON result into DIR.",
    )
    export.add_argument("inputs", nargs=1, metavar="RESULT.json")
    export.add_argument("directory", metavar="DIR", help="the folder the SAEBench files are written to")
    export.set_defaults(html=None)
    sample = commands.add_parser(
        "sample",
        help="a report of synthetic numbers, to preview the layout",
        description="Write a report of invented numbers, to preview the layout.",
    )
    check = commands.add_parser(
        "check",
        help="check that a JSON result and an HTML report are one run's",
        description="Check that a JSON result and an HTML report come from the same run (exit 1 if not).",
    )
    check.add_argument("inputs", nargs=2, metavar=("RESULT.json", "REPORT.html"))
    sample.set_defaults(inputs=[])
    sample.add_argument("--json", metavar="PATH", help="write the JSON result here")
    sample.add_argument("--html", metavar="PATH", help="write the HTML report here")
    return parser


def _repeated(paths: Sequence[str]) -> str | None:
    """The first input given twice (the same file, under any spelling of its path), else ``None``."""
    seen: dict[str, str] = {}
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            return f"{path!r} is the same file as {seen[key]!r}: each shard can be merged once"
        seen[key] = path
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from pytest_saecheck.files import commit_files
    from pytest_saecheck.report.files import dumps, load_document
    from pytest_saecheck.report.merge import merge_documents

    arguments = _parser().parse_args(argv)
    if arguments.command == "check":
        return _check(arguments.inputs)
    json_path = getattr(arguments, "json", None)
    try:
        if arguments.command == "sample":
            from pytest_saecheck.report.collect import build_document
            from pytest_saecheck.report.sample import sample_reports

            document = build_document(sample_reports())
        else:
            repeated = _repeated(arguments.inputs)
            if repeated is not None:
                raise ValueError(repeated)
            documents = [load_document(path) for path in arguments.inputs]
            document = documents[0] if len(documents) == 1 else merge_documents(documents)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if arguments.command == "export-saebench":
        from pytest_saecheck.report.saebench import write_core_results

        written = write_core_results(document, arguments.directory)
        if not written:
            print("error: the result holds no evaluated SAE: nothing to export", file=sys.stderr)
            return 2
        for path in written:
            print(f"SAEBench core result written to {path}")
        return 0
    if not json_path and not arguments.html:
        sys.stdout.write(dumps(document))
        return 0
    from pytest_saecheck.report.html import render_html

    # sections' HTML read from a file is shown as text, never as markup (render_html's default)
    targets = [("JSON result", json_path, dumps(document))] if json_path else []
    if arguments.html:
        targets.append(("HTML report", arguments.html, render_html(document)))
    status = 0
    for (what, _, _), result in zip(targets, commit_files([(p, t) for _, p, t in targets]), strict=True):
        if result.error is None:
            print(f"{what} written to {result.path}")
        else:
            print(f"error: {what} not written: {result.error}", file=sys.stderr)
            status = 1
    return status


def _check(paths: Sequence[str]) -> int:
    from pytest_saecheck.report.files import check_pair

    try:
        run_id = check_pair(*paths)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{paths[0]} and {paths[1]} are one run's (run {run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
