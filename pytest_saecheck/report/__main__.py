"""``python -m pytest_saecheck.report``: merge result documents and render reports without running tests.

``merge`` combines the documents of sharded runs into the document one run over all shards would have written
(see :mod:`pytest_saecheck.report.merge`); without ``--json`` or ``--html`` it prints the merged JSON. The same
shard given twice is refused. ``render`` needs ``--html``. Exit status: 0 when the files were written (whatever
the tests' outcomes), 2 on bad input. ``--help`` shows the commands.
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
  {PROG} sample --html sample.html      (a report of invented numbers, to preview the layout)

merge prints the merged JSON when given neither --json nor --html. Exit status: 0 when the
files were written (whatever the tests' outcomes), 2 on bad input."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{merge,render,sample}")
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
    sample = commands.add_parser(
        "sample",
        help="a report of synthetic numbers, to preview the layout",
        description="Write a report of invented numbers, to preview the layout.",
    )
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
    from pytest_saecheck.files import write_atomic
    from pytest_saecheck.report.files import dumps, load_document
    from pytest_saecheck.report.merge import merge_documents

    arguments = _parser().parse_args(argv)
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
            document = merge_documents(load_document(path) for path in arguments.inputs)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if json_path:
        print(f"JSON result written to {write_atomic(json_path, dumps(document))}")
    if arguments.html:
        from pytest_saecheck.report.html import render_html

        print(f"HTML report written to {write_atomic(arguments.html, render_html(document))}")
    if not json_path and not arguments.html:
        sys.stdout.write(dumps(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
