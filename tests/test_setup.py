"""The README's two commands (``make demo``, ``make test``), ``.ci/run`` on the same targets, and the slow marker.

The Makefile tests run GNU make on a copy of the Makefile and ``pyproject.toml`` with a stand-in virtual
environment: a ``pyvenv.cfg`` and a ``bin/python`` that logs its arguments, one line each, so they check what
make runs, in which order and when, without installing anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import pytest_collection_modifyitems

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")

needs_make = pytest.mark.skipif(MAKE is None, reason="GNU make is not installed (.ci/run installs it)")

FAKE_PYTHON = """#!/bin/sh
printf '%s\\n' "$*" >> "$(dirname "$0")/../calls.log"
if [ "$2" = pytest ]; then exit "${FAKE_PYTEST_STATUS:-0}"; fi
exit 0
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the Makefile and pyproject.toml, with a stand-in environment in ``venv/``."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /nowhere\n")
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


# What an outer make (`make test TORCH=...`) or the user's shell would pass on to the make under test.
OUTER = {
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "MAKEOVERRIDES",
    "PYTHON",
    "VENV",
    "TORCH",
    "TORCH_INDEX",
    "EXTRA",
}
OUTER |= {"PIP_FLAGS", "PYTEST_ARGS", "REPORT"}


def make(project: Path, *args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key not in OUTER}
    environment["FAKE_PYTEST_STATUS"] = str(status)
    return subprocess.run(
        [MAKE or "make", "--no-print-directory", "-C", str(project), "VENV=venv", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )


def calls(project: Path) -> list[str]:
    log = project / "venv" / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


@needs_make
def test_setup_installs_torch_first_then_the_project_and_then_nothing_until_something_changes(
    project: Path,
) -> None:
    result = make(project, "setup", "TORCH=torch>=2.5", "EXTRA=sae-lens==6.5.1 pyarrow<18")
    assert result.returncode == 0, result.stdout + result.stderr
    # each requirement arrives as one argument: `>=` and `<` are no shell redirections
    assert calls(project) == [
        "-m pip install --upgrade pip",
        "-m pip install torch>=2.5",
        "-m pip install -e .[dev] sae-lens==6.5.1 pyarrow<18",
    ]
    assert not (project / "=2.5").exists() and not (project / "18").exists()

    assert make(project, "setup", "TORCH=torch>=2.5", "EXTRA=sae-lens==6.5.1 pyarrow<18").returncode == 0
    assert calls(project) == []  # already set up: nothing to do

    make(project, "setup", "TORCH=torch==2.13.0", "EXTRA=sae-lens==6.5.1 pyarrow<18")
    assert calls(project)[1] == "-m pip install torch==2.13.0"  # another torch: set up again
    make(project, "setup", "TORCH=torch==2.13.0")
    assert calls(project)[2] == "-m pip install -e .[dev]"  # other extras: set up again

    os.utime(project / "pyproject.toml", (time.time() + 2, time.time() + 2))
    make(project, "setup", "TORCH=torch==2.13.0")
    assert len(calls(project)) == 3  # the project's requirements may have changed: set up again


@needs_make
def test_torch_index_is_used_for_torch_alone(project: Path) -> None:
    make(project, "setup", "TORCH_INDEX=https://example.invalid/whl/cpu")
    assert calls(project) == [
        "-m pip install --upgrade pip",
        "-m pip install --index-url https://example.invalid/whl/cpu torch",
        "-m pip install -e .[dev]",
    ]


@needs_make
def test_a_missing_environment_is_created_with_the_chosen_interpreter(project: Path) -> None:
    result = make(project, "-n", "setup", "VENV=fresh", "PYTHON=python3.99")
    assert result.stdout.splitlines()[0] == "python3.99 -m venv fresh", result.stdout + result.stderr


@needs_make
@pytest.mark.parametrize(
    ("target", "pytest_args"),
    [
        ("demo", "examples --saecheck-report saecheck-report.html"),
        ("test", ""),
        ("test-slow", "--run-slow -m slow"),
        ("test-all", "--run-slow"),
    ],
)
def test_targets_set_up_then_run_pytest(project: Path, target: str, pytest_args: str) -> None:
    result = make(project, target)
    assert result.returncode == 0, result.stdout + result.stderr
    run = calls(project)
    assert run[:3] == ["-m pip install --upgrade pip", "-m pip install torch", "-m pip install -e .[dev]"]
    assert run[3:] == [f"-m pytest {pytest_args}".rstrip()]
    make(project, target, "PYTEST_ARGS=-x -k a,b")
    assert calls(project) == [f"-m pytest {pytest_args} -x -k a,b".replace("  ", " ")]


@needs_make
@pytest.mark.parametrize("status", [1, 5])
def test_a_failed_or_empty_pytest_run_fails_make(project: Path, status: int) -> None:
    result = make(project, "test", status=status)
    assert result.returncode != 0
    no_test = "pytest ran no test (exit code 5)" in result.stderr
    assert no_test == (status == 5), result.stderr


def test_ci_runs_the_readme_commands_with_the_cpu_build() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    first_block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands == ["make demo", "make test"]

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'TORCH="torch==2.13.0"' in ci
    targets = re.findall(r'^run_make "\$VENV" ([\w-]+)', ci, flags=re.MULTILINE)
    # the main job twice: as the README runs it, then writing its SAEBench-format results for validation
    assert targets == ["setup", "lint", "typecheck", "demo", "demo", "test", "test-slow", "docs", "dist"]
    assert "pytest" not in ci.split('run_make "$VENV" setup', 1)[1].split("OLD_VENV=", 1)[0].replace(
        "pytest_saecheck", ""
    ), "the main run calls pytest only through the make targets"


class _Hook:
    def __init__(self) -> None:
        self.deselected: list[Any] = []

    def pytest_deselected(self, items: list[Any]) -> None:
        self.deselected.extend(items)


class _Config:
    def __init__(self, run_slow: bool) -> None:
        self.run_slow = run_slow
        self.hook = _Hook()

    def getoption(self, name: str) -> bool:
        assert name == "--run-slow"
        return self.run_slow


SLOW_AND_FAST = """
    import pytest

    @pytest.mark.slow
    def test_slow():
        pass

    @pytest.mark.slow
    class TestSlow:
        def test_inherits(self):
            pass

    def test_fast():
        pass
"""


@pytest.mark.parametrize("run_slow", [False, True])
def test_slow_tests_are_deselected_unless_run_slow(pytester: pytest.Pytester, run_slow: bool) -> None:
    items = pytester.getitems(SLOW_AND_FAST)
    config = _Config(run_slow)
    pytest_collection_modifyitems(config, items)  # type: ignore[arg-type]
    kept = [item.name for item in items]
    deselected = [item.name for item in config.hook.deselected]
    if run_slow:
        assert kept == ["test_slow", "test_inherits", "test_fast"] and deselected == []
    else:
        assert kept == ["test_fast"] and deselected == ["test_slow", "test_inherits"]


def test_the_slow_marker_is_registered_and_used(request: pytest.FixtureRequest) -> None:
    markers = request.config.getini("markers")
    assert any(line.startswith("slow:") for line in markers)
    sources = [path.read_text(encoding="utf-8") for path in (ROOT / "tests").glob("test_*.py")]
    assert sum(source.count("pytest.mark.slow") for source in sources) >= 3


def test_no_test_module_imports_another() -> None:
    """Shared builders live in tests/factories.py: a test module imports no other test module."""
    import ast

    tests_dir = Path(__file__).resolve().parent
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.split(".")[0].startswith("test_"), (
                    f"{path.name} imports the test module {name}"
                )


def test_the_typecheck_target_runs_mypy_on_the_package() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("\ntypecheck: setup\n", 1)[1].split("\n\n", 1)[0]
    assert recipe.strip() == "$(VENV_PYTHON) -m mypy"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'packages = ["pytest_saecheck"]' in pyproject.split("[tool.mypy]", 1)[1]


def test_a_run_outside_the_repository_raises_no_plugin_warning(tmp_path: Path) -> None:
    """Run as an installed plug-in from another directory (pytest marks an installed distribution's modules for
    assert rewriting): no ``PytestAssertRewriteWarning`` about the package's own modules, nor any other warning."""
    import sys

    (tmp_path / "test_plain.py").write_text("def test_plain():\n    pass\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "test_plain.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "Warning" not in done.stdout + done.stderr, done.stdout
