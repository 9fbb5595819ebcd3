"""The package's layers import one way, and no module imports itself back (docs: explanation/engine.md,
"Architecture").

Every import statement of every module is read from its syntax tree, wherever it stands: at module level, inside
functions and methods (where a hidden cycle lives), and inside ``if TYPE_CHECKING:`` blocks. Two rules:

- **Layers** (:data:`FORBIDDEN`): a layer may not import the layers named for it, counting type-only imports (a
  type is knowledge of the module too). The bundled demo is a plug-in at the top: it registers through its entry
  point (:mod:`pytest_saecheck.extensions`), and no other module imports it or names it for ``importlib``.
- **No cycle**: the graph of the imports that run (module-level and function-level; not those under ``if
  TYPE_CHECKING:``, which never run) has no cycle, of any length. ``from package import module`` is an import of
  the module; ``from package import name`` of the package.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import pytest_saecheck

PACKAGE = Path(pytest_saecheck.__file__).resolve().parent
NAME = "pytest_saecheck"

#: Layers, bottom to top. A module belongs to the first layer whose prefix it starts with; everything else in the
#: package is ``core`` (errors, defaults, the metric catalogue, metrics, statistics, records, hookspecs, ...).
LAYERS = {
    "demo": (f"{NAME}.demo",),
    "engine": (f"{NAME}.engine",),
    "loading": (f"{NAME}.loading",),
    # the assertions, the training checks, and model-family fits (which load models and evaluate them)
    "checks": (f"{NAME}.checks", f"{NAME}.training", f"{NAME}.family", f"{NAME}.assertions"),
    # the pytest plugins: the core plugin package and the report's writer plugin
    "plugin": (f"{NAME}.plugin", f"{NAME}.report.plugin"),
    "report": (f"{NAME}.report",),
}
#: layer -> layers it must not import. Nothing imports the demo: it is a plug-in, found through its entry point.
FORBIDDEN = {
    "core": {"engine", "loading", "checks", "report", "plugin", "demo"},
    "engine": {"loading", "checks", "report", "plugin", "demo"},
    "loading": {"engine", "checks", "report", "plugin", "demo"},
    "checks": {"report", "plugin", "demo"},
    "report": {"engine", "loading", "checks", "plugin", "demo"},
    "plugin": {"demo"},
    "demo": {"report", "plugin"},  # the demo's build and tasks use the checks (family fits, the task format)
}
#: A string that names a demo module, as ``importlib.import_module`` or ``import_plugin`` would take it.
DEMO_MODULE_NAME = re.compile(rf"^{re.escape(NAME)}\.demo(\.|:|$)")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    for layer, prefixes in LAYERS.items():
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return layer
    return "core"


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_relative(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of ``from .x import y`` in ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """``(imported module of this package, only under TYPE_CHECKING)`` for every import in ``path``."""
    # a file outside the package (the reader's own test) resolves relative imports against itself
    module = module_name(path) if path.is_relative_to(PACKAGE) else path.stem
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, type_only: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, type_only
        elif isinstance(node, ast.ImportFrom):
            source = (node.module or "") if node.level == 0 else _resolve_relative(module, is_package, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                # `from package import module` imports the module; `from module import name` the module
                yield (submodule if _is_module(submodule) else source), type_only
        for child in ast.iter_child_nodes(node):
            yield from visit(child, type_only)

    for name, type_only in visit(ast.parse(path.read_text(encoding="utf-8")), False):
        if (name == NAME or name.startswith(NAME + ".")) and _is_module(name):
            yield name, type_only


def imported_modules(path: Path, *, type_only: bool = True) -> set[str]:
    """Every module of this package that ``path`` imports, anywhere in the file (without those under ``if
    TYPE_CHECKING:`` when ``type_only`` is false)."""
    return {name for name, under_type_checking in _imports(path) if type_only or not under_type_checking}


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of ``tree``'s module, classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def demo_module_strings(path: Path) -> list[str]:
    """The string constants of ``path`` (docstrings aside) that name a demo module for a dynamic import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = _docstrings(tree)
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and DEMO_MODULE_NAME.match(node.value)
    ]


MODULES = sorted(path for path in PACKAGE.rglob("*.py"))


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """module -> the modules of this package it imports at run time (module-level and function-level)."""
    return {
        module_name(path): imported_modules(path, type_only=False) - {module_name(path)} for path in paths
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan's algorithm, iterative),
    each sorted; every import cycle lies inside one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the first module of ``component`` (for the failure message)."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        following = sorted(graph[path[-1]] & members)
        if start in following and len(path) > 1:
            return [*path, start]
        step = next((module for module in following if module not in seen), None)
        if step is None:  # every neighbour seen: close the loop at the first repeated module
            step = following[0]
            return [*path[path.index(step) :], step]
        path.append(step)
        seen.add(step)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_imports_run_down_the_layers(path: Path) -> None:
    module = module_name(path)
    layer = layer_of(module)
    # the public API re-exports every layer lazily: it is held only to the demo rule
    forbidden = {"demo"} if module == NAME else FORBIDDEN.get(layer, set())
    wrong = sorted(
        f"{name} ({layer_of(name)})"
        for name in imported_modules(path)
        if layer_of(name) in forbidden and layer_of(name) != layer
    )
    assert not wrong, f"{module} ({layer} layer) imports {', '.join(wrong)}"
    if layer != "demo":
        named = demo_module_strings(path)
        assert not named, f"{module} names demo modules for a dynamic import: {', '.join(named)}"


def test_no_import_cycle() -> None:
    graph = import_graph(MODULES)
    found = cycles(graph)
    shown = [" -> ".join(_one_cycle(graph, component)) for component in found]
    assert not found, "import cycles (function-level imports included):\n" + "\n".join(shown)


def test_every_layer_has_modules() -> None:
    """The rules above test something: each named layer exists in the package."""
    found = {layer_of(module_name(path)) for path in MODULES}
    assert found >= {"core", "demo", "engine", "loading", "checks", "plugin", "report"}, found


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Function-local imports, ``from package import module``, type-only imports (kept apart), and a demo
    module named in a string for ``importlib`` (a docstring that mentions one is no import)."""
    source = tmp_path / "example.py"
    source.write_text(
        '"""Mentions pytest_saecheck.demo.plugin in prose."""\n'
        "from typing import TYPE_CHECKING\n"
        "import importlib\n"
        "if TYPE_CHECKING:\n    from pytest_saecheck.checks.pipeline_subjects import Subjects\n"
        "def late():\n    from pytest_saecheck.plugin import settings\n"
        "    return importlib.import_module('pytest_saecheck.demo.plugin')\n"
        "from pytest_saecheck import engine\nimport pytest_saecheck.report.html\n"
        "from pytest_saecheck.scaling import ScalingLaw\n"
    )
    assert imported_modules(source, type_only=False) == {
        "pytest_saecheck.plugin.settings",
        "pytest_saecheck.engine",
        "pytest_saecheck.report.html",
        "pytest_saecheck.scaling",
    }
    assert imported_modules(source) - imported_modules(source, type_only=False) == {
        "pytest_saecheck.checks.pipeline_subjects"
    }
    assert demo_module_strings(source) == ["pytest_saecheck.demo.plugin"]


def test_the_cycle_finder_finds_long_and_short_cycles() -> None:
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"},
        "e": {"d"},  # d <-> e
        "f": {"a"},  # reaches a cycle without being in one
    }
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert _one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert cycles({"a": {"b"}, "b": set()}) == []
