"""Fixtures shared by the tests; the tiny models, SAEs and tokens they are built from live in ``factories.py``.

``tiny_assets`` writes, once per session, a directory a pytester run can use:

- ``sae_identity/``: an SAE Lens directory whose SAE reconstructs every activation exactly (a planted good SAE);
- ``sae_random/``: an SAE Lens directory with random weights (a planted bad SAE);
- ``tokens.npy``: 40 × 16 token ids with BOS (0) at position 0.

``tiny_pytester`` is a pytester whose conftest (``factories.TINY_CONFTEST``) serves the model spec ``"tiny"``
through the ``pytest_saecheck_load_model`` hook.

Tests marked ``slow`` (end-to-end runs in subprocesses or xdist workers, each paying the ~7 s import of
torch, TransformerLens and SAE Lens) are deselected unless ``--run-slow`` is given: ``pytest`` alone is the
fast suite, ``pytest --run-slow -m slow`` (``make test-slow``) runs the rest, and CI runs both.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from factories import (
    CORPUS,
    TINY_CONFTEST,
    build_tokenizer,
    make_identity_sae,
    make_random_sae,
    make_token_ids,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (end-to-end runs in subprocesses and xdist workers); "
        "`pytest --run-slow -m slow` runs only those",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: an end-to-end test that takes many seconds (subprocesses, xdist workers); deselected unless "
        "--run-slow is given",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.getoption("--run-slow"):
        return None
    return "slow tests: deselected (--run-slow includes them; `make test-slow` runs only them)"


# pyproject's filterwarnings makes a SAECheckWarning this suite did not ask for an error. A pytest run inside a test
# (pytester, in process) inherits the filters of the test it runs in; there the warnings are the inner run's to
# record and show, as a user's run would, not this suite's.
INNER_RUN_WARNINGS = pytest.mark.filterwarnings("default::pytest_saecheck.errors.SAECheckWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "pytester" in getattr(item, "fixturenames", ()):
            # first: the test's own filterwarnings marks are applied after it, and win
            item.add_marker(INNER_RUN_WARNINGS, append=False)
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
        config.hook.pytest_deselected(items=slow)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Exempt everything alive after collection from garbage collection.

    By now torch, TransformerLens, SAE Lens and transformers are imported: about half a million objects that
    live as long as the process. Every full ``gc.collect()`` (the session cache frees memory with one whenever
    the model changes, and pytester runs change it often) would walk them all, about 0.25 s each on this
    2-core machine. Frozen, a collection walks only what the tests create, so tests that check that objects
    are freed still see them collected.
    """
    gc.freeze()


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """pytester without hypothesis' plugin (its terminal summary costs ~2 s per in-process run), and without
    ``CI`` in the environment."""
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest")
    # CI=true (set by CI services) changes a run's exit status when no SAE was checked: the inner runs behave
    # the same on a laptop and in CI, and the tests of that rule set CI themselves
    monkeypatch.delenv("CI", raising=False)
    return pytester


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("saecheck_assets")
    make_identity_sae().save_model(root / "sae_identity")
    make_random_sae().save_model(root / "sae_random")
    np.save(root / "tokens.npy", make_token_ids())
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tokenizer(CORPUS * 20)


@pytest.fixture
def tiny_pytester(pytester: pytest.Pytester, tiny_assets: Path) -> pytest.Pytester:
    """A pytester whose runs serve model "tiny" (and "tiny1", "tiny2", ... with other seeds) and see the assets.

    ``sae_identity``, ``sae_random`` and ``tokens.npy`` are symlinked into the test directory, so markers can
    name them by relative path.
    """
    pytester.makeconftest(TINY_CONFTEST)
    for name in ("sae_identity", "sae_random", "tokens.npy"):
        (pytester.path / name).symlink_to(tiny_assets / name)
    return pytester


@pytest.fixture(scope="module")
def bench():
    """``benchmarks/bench_engine.py`` loaded as a module by path (it is a script, not a package module)."""
    import sys

    from live_bytes import bench_engine

    sys.modules.pop("bench_engine", None)  # a fresh copy for each test module
    yield bench_engine()
    sys.modules.pop("bench_engine", None)
