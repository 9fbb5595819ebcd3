"""The package's layers import one way (README, "Architecture").

Every import in every module is read (function-local ones too, which is where a hidden cycle lives) and checked
against the rules below. A rule names a layer and the layers it may not import.
"""

from __future__ import annotations

import ast
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
#: layer -> layers it must not import
FORBIDDEN = {
    "core": {"engine", "loading", "checks", "report", "plugin"},
    "demo": {"report", "plugin"},  # the demo's build and tasks use the checks (family fits, the task format)
    "engine": {"loading", "checks", "report", "plugin"},
    "loading": {"engine", "checks", "report", "plugin"},
    "checks": {"report", "plugin"},
    "report": {"engine", "loading", "checks", "plugin"},
}


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


def imported_modules(path: Path) -> set[str]:
    """Every module of this package that ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pytest_saecheck import report` imports the module pytest_saecheck.report
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith(NAME + ".") and _is_module(name)}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


MODULES = sorted(path for path in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_imports_run_down_the_layers(path: Path) -> None:
    module = module_name(path)
    layer = layer_of(module)
    if module == NAME:  # the public API re-exports every layer lazily
        return
    wrong = sorted(
        f"{name} ({layer_of(name)})"
        for name in imported_modules(path)
        if layer_of(name) in FORBIDDEN.get(layer, set()) and layer_of(name) != layer
    )
    assert not wrong, f"{module} ({layer} layer) imports {', '.join(wrong)}"


def test_every_layer_has_modules() -> None:
    """The rules above test something: each named layer exists in the package."""
    found = {layer_of(module_name(path)) for path in MODULES}
    assert found >= {"core", "demo", "engine", "loading", "checks", "plugin", "report"}, found


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The import reader sees function-local imports (where a hidden cycle lives) and `from package import module`."""
    source = tmp_path / "example.py"
    source.write_text(
        "def late():\n    from pytest_saecheck.plugin import settings\n"
        "from pytest_saecheck import engine\nimport pytest_saecheck.report.html\n"
    )
    assert imported_modules(source) >= {
        "pytest_saecheck.plugin",
        "pytest_saecheck.plugin.settings",
        "pytest_saecheck.engine",
        "pytest_saecheck.report.html",
    }
