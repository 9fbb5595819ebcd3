"""Validate SAEBench-format result files against the schema derived from SAEBench's core result models.

Usage: ``python scripts/check_saebench.py DIR [SCHEMA]``: every ``*_eval_results.json`` in ``DIR`` (written by
``--saecheck-saebench-json DIR``) must validate against ``SCHEMA`` (default ``tests/data/saebench_core.schema.json``,
whose header cites its source). Exit status 1 names each file that does not, or a directory without results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    schema_path = (
        Path(argv[1])
        if len(argv) == 2
        else Path(__file__).parents[1] / "tests/data/saebench_core.schema.json"
    )
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    files = sorted(folder.glob("*_eval_results.json"))
    if not files:
        print(f"no *_eval_results.json in {folder}", file=sys.stderr)
        return 1
    failed = 0
    for path in files:
        try:
            jsonschema.validate(json.loads(path.read_text(encoding="utf-8")), schema)
        except jsonschema.ValidationError as error:
            failed += 1
            print(
                f"{path}: {error.message} at {'/'.join(map(str, error.absolute_path)) or 'the top'}",
                file=sys.stderr,
            )
    print(f"{len(files) - failed} of {len(files)} SAEBench core results valid against {schema_path.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
