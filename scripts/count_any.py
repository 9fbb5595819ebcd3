"""Count the functions of a package that take or return a bare ``typing.Any``.

A function counts when its return annotation or any parameter's (``*args`` and ``**kwargs`` included) is exactly
``Any`` (``Any`` inside another type, e.g. ``dict[str, Any]``, does not count). Nested functions and methods count.

    python scripts/count_any.py pytest_saecheck [N]   # N: also list the N files with the most
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path


def _bare_any(node: ast.expr | None) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
        return node.value.strip() in ("Any", "typing.Any")
    return (isinstance(node, ast.Name) and node.id == "Any") or (
        isinstance(node, ast.Attribute) and node.attr == "Any"
    )


def _takes_or_returns_any(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    arguments = function.args
    parameters = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    parameters += [p for p in (arguments.vararg, arguments.kwarg) if p is not None]
    return _bare_any(function.returns) or any(_bare_any(p.annotation) for p in parameters)


def main(root: Path, top: int = 0) -> None:
    total, per_file = 0, Counter[str]()
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                total += 1
                if _takes_or_returns_any(node):
                    per_file[str(path)] += 1
    print(f"{sum(per_file.values())} of {total} functions take or return a bare Any")
    for name, count in per_file.most_common(top):
        print(count, name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
