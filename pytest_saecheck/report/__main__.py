"""``python -m pytest_saecheck.report``: merge result documents and render reports without running tests.

::

    python -m pytest_saecheck.report merge a.json b.json ... [--json out.json] [--html out.html]
    python -m pytest_saecheck.report render result.json --html out.html
    python -m pytest_saecheck.report sample --html sample.html      # a report of invented numbers

``merge`` combines the documents of sharded runs into the document one run over all shards would have written
(see :mod:`pytest_saecheck.report.merge`); without ``--json`` or ``--html`` it prints the merged JSON. Exit
status: 0 when the files were written (whatever the tests' outcomes), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_saecheck.report", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge the JSON results of sharded runs")
    merge.add_argument("inputs", nargs="+", metavar="RESULT.json")
    render = commands.add_parser("render", help="render a JSON result as HTML")
    render.add_argument("inputs", nargs=1, metavar="RESULT.json")
    sample = commands.add_parser("sample", help="a report of synthetic numbers, to preview the layout")
    sample.set_defaults(inputs=[])
    for command in (merge, render, sample):
        command.add_argument("--json", metavar="PATH", help="write the (merged) JSON result here")
        command.add_argument("--html", metavar="PATH", help="write the HTML report here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pytest_saecheck.report.files import dumps, load_document, write_atomic
    from pytest_saecheck.report.merge import merge_documents

    arguments = _parser().parse_args(argv)
    try:
        if arguments.command == "sample":
            from pytest_saecheck.report.collect import build_document
            from pytest_saecheck.report.sample import sample_reports

            document = build_document(sample_reports())
        else:
            document = merge_documents(load_document(path) for path in arguments.inputs)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if arguments.json:
        print(f"JSON result written to {write_atomic(arguments.json, dumps(document))}")
    if arguments.html:
        from pytest_saecheck.report.html import render_html

        print(f"HTML report written to {write_atomic(arguments.html, render_html(document))}")
    if not arguments.json and not arguments.html:
        sys.stdout.write(dumps(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
