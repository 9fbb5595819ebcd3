"""Pin each pytest-xdist worker to its own GPU, before CUDA initialises (a pytest plugin module).

Worker ``gwK`` gets the (K mod G)-th of the G visible GPUs by narrowing ``CUDA_VISIBLE_DEVICES`` to that one
GPU; CUDA reads the variable when it initialises, so this must run before anything touches CUDA. GPUs are
counted without initialising CUDA: from ``CUDA_VISIBLE_DEVICES`` when it is set, else from ``nvidia-smi -L``.
With one GPU or none, nothing changes. ``--saecheck-no-gpu-pinning`` turns this off. Registered by the core
plugin from its ``pytest_addhooks``. Imports no torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import pytest

WORKER_ENV = "PYTEST_XDIST_WORKER"
DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
_MIG = re.compile(r"^\s+MIG .*\(UUID:\s*(MIG-[^)\s]+)\)")


def visible_gpus(environ: Mapping[str, str] | None = None, nvidia_smi: str | None = "auto") -> list[str]:
    """The identifiers of the GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    listed = env.get(DEVICES_ENV)
    if listed is not None:
        gpus = []
        for entry in (part.strip() for part in listed.split(",")):
            if not entry or entry.startswith("-"):  # CUDA ignores everything from the first invalid entry on
                break
            gpus.append(entry)
        return gpus
    executable = shutil.which("nvidia-smi") if nvidia_smi == "auto" else nvidia_smi
    if not executable:
        return []
    try:
        listing = subprocess.run(
            [executable, "-L"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return gpus_from_listing(listing)


def gpus_from_listing(listing: str) -> list[str]:
    """GPU indices from ``nvidia-smi -L`` output; MIG instances (by UUID) where a GPU is partitioned."""
    gpus: list[str] = []
    index = -1
    for line in listing.splitlines():
        if line.startswith("GPU "):
            index += 1
            gpus.append(str(index))
        else:
            match = _MIG.match(line)
            if match and gpus:
                if gpus[-1] == str(index):  # a partitioned GPU is used through its MIG instances
                    gpus.pop()
                gpus.append(match.group(1))
    return gpus


def worker_index(worker_id: str | None) -> int | None:
    """``gw3`` -> 3; ``None`` outside an xdist worker."""
    if not worker_id:
        return None
    match = re.fullmatch(r"gw(\d+)", worker_id.strip())
    return int(match.group(1)) if match else None


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def pin_worker_gpu(
    environ: MutableMapping[str, str] | None = None, nvidia_smi: str | None = "auto"
) -> str | None:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to this worker's GPU; return it (``None`` when nothing was changed)."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    index = worker_index(env.get(WORKER_ENV))
    if index is None:
        return None
    gpus = visible_gpus(env, nvidia_smi)
    if len(gpus) < 2:
        return None
    chosen = gpus[index % len(gpus)]
    if cuda_initialised():
        warnings.warn(
            f"saecheck: CUDA was initialised before worker {env.get(WORKER_ENV)} could be pinned to GPU "
            f"{chosen}; every worker may share one GPU. Do not touch CUDA at import time in conftest files.",
            stacklevel=2,
        )
        return None
    env[DEVICES_ENV] = chosen
    return chosen


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("saecheck", "sparse autoencoder acceptance tests (pytest-saecheck)")
    group.addoption(
        "--saecheck-no-gpu-pinning",
        dest="saecheck_no_gpu_pinning",
        action="store_true",
        default=False,
        help="under pytest-xdist, do not pin each worker to its own GPU (pinned by default when several are visible)",
    )


def _pin(config: pytest.Config, namespace: Any) -> None:
    if not getattr(namespace, "saecheck_no_gpu_pinning", False):
        pin_worker_gpu()


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> None:
    """Pin before conftest files are imported, in case one imports torch and touches CUDA."""
    _pin(early_config, early_config.known_args_namespace)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    _pin(config, config.option)  # no-op when already pinned at start-up
