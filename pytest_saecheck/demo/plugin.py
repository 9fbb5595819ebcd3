"""The demo as a plug-in of the core: default implementations of the saecheck hooks.

Registered through the entry point ``saecheck-demo`` of the ``pytest_saecheck`` group (``pyproject.toml``;
:mod:`pytest_saecheck.extensions`), so it works in a pytest session (``-p no:saecheck-demo`` leaves it out) and
in plain Python. Every implementation is ``trylast``: a ``conftest.py`` hook that answers for the same spec wins.

- ``pytest_saecheck_load_model``: ``"demo"`` is the demo model (:func:`pytest_saecheck.demo.load_model`);
- ``pytest_saecheck_load_sae``: ``"demo/<name>"`` is a demo SAE (:data:`pytest_saecheck.demo.SAE_NAMES`);
- ``pytest_saecheck_load_tokens``: ``"demo"`` is the demo's held-out text;
- ``pytest_saecheck_default_model`` / ``_default_tokens``: a demo SAE (by spec, or loaded from its directory:
  its config names the demo model and corpus) runs on the demo model and text;
- ``pytest_saecheck_scaling_laws`` / ``_default_scaling_law``: the law ``"demo"``, fitted by the build for the
  demo's model family, is the default law of tests on the demo model;
- ``pytest_saecheck_groupings``: ``"demo_constructs"`` (:mod:`pytest_saecheck.demo.groups`);
- ``pytest_saecheck_pipeline_subjects``: the metric-pipeline battery's subjects, built from the demo model.

An existing local path named like a demo spec is left to the built-in loaders. Importing this module imports no
torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_saecheck import demo
from pytest_saecheck.demo.groups import GROUPING_NAME, demo_constructs
from pytest_saecheck.errors import LoadError
from pytest_saecheck.loading.chat import split_chat
from pytest_saecheck.loading.models import LoadedModel, ModelLoad
from pytest_saecheck.loading.specs import local_path, sae_metadata
from pytest_saecheck.loading.tokens import n_sequences_for

if TYPE_CHECKING:
    from pytest_saecheck.checks.pipeline_subjects import Subjects
    from pytest_saecheck.groups import Grouping
    from pytest_saecheck.scaling import ScalingLaw

SPEC = "demo"
"""The model and token spec of the demo; its SAEs are ``"demo/<name>"``."""
LAW_NAME = "demo"
"""The ``scaling_law`` setting's name for the demo family's fit (:func:`pytest_saecheck.demo.scaling_law`)."""
LOADER = "pytest_saecheck.demo.load_model"
"""The loader recorded in an evaluation's ``model_loading`` for the demo model."""


def sae_name(spec: str) -> str | None:
    """``"good"`` for ``"demo/good"``; None for anything else (or for an existing local path)."""
    if spec.startswith(SPEC + "/") and local_path(spec) is None:
        return spec[len(SPEC) + 1 :]
    return None


def _is_demo(spec: str) -> bool:
    return spec == SPEC and local_path(spec) is None


@pytest.hookimpl(trylast=True)
def pytest_saecheck_load_model(spec: str, device: str, dtype: str | None) -> LoadedModel | None:
    if not _is_demo(spec):
        return None
    return LoadedModel(
        demo.load_model(device=device, dtype=dtype), ModelLoad(LOADER, {"dtype": dtype or "float32"})
    )


@pytest.hookimpl(trylast=True)
def pytest_saecheck_load_sae(spec: str, device: str, dtype: str | None) -> Any:
    name = sae_name(spec)
    if name is None:
        return None
    if name not in demo.SAE_NAMES:
        raise LoadError(f"no demo SAE named {name!r}; the demo SAEs are {', '.join(demo.SAE_NAMES)}")
    return demo.load_sae(name, device=device, dtype=dtype)


@pytest.hookimpl(trylast=True)
def pytest_saecheck_load_tokens(spec: str, n_tokens: int, context_size: int, seed: int) -> Any:
    source, is_chat = split_chat(spec)
    if is_chat and _is_demo(source):
        raise LoadError(
            f"token source {spec!r}: the demo corpus has no conversations; drop the 'chat:' prefix"
        )
    if not _is_demo(spec):
        return None
    return demo.load_tokens(
        n_sequences=n_sequences_for(n_tokens, context_size), seq_len=context_size, seed=seed, device="cpu"
    )


@pytest.hookimpl(trylast=True)
def pytest_saecheck_default_model(sae_spec: str, sae: Any) -> str | None:
    # a demo SAE named demo/<name>, or loaded from its directory (its config names the demo model)
    if sae_name(sae_spec) is not None or sae_metadata(sae, "model_name") == demo.MODEL_NAME:
        return SPEC
    return None


@pytest.hookimpl(trylast=True)
def pytest_saecheck_sae_directory(spec: str) -> Path | None:
    name = sae_name(spec)
    return demo.sae_path(name) if name is not None and name in demo.SAE_NAMES else None


@pytest.hookimpl(trylast=True)
def pytest_saecheck_model_config(spec: str) -> Mapping[str, Any] | None:
    return demo.metadata()["model_config"] if _is_demo(spec) else None


@pytest.hookimpl(trylast=True)
def pytest_saecheck_default_tokens(sae_spec: str | None, sae: Any) -> str | None:
    if (sae_spec is not None and sae_name(sae_spec) is not None) or sae_metadata(
        sae, "dataset_path"
    ) == demo.MODEL_NAME:
        return SPEC
    return None


@pytest.hookimpl(trylast=True)
def pytest_saecheck_default_scaling_law(model_spec: str) -> str | None:
    return LAW_NAME if model_spec == SPEC else None


@pytest.hookimpl(trylast=True)
def pytest_saecheck_scaling_laws() -> Mapping[str, Callable[[], ScalingLaw]]:
    return {LAW_NAME: demo.scaling_law}


@pytest.hookimpl(trylast=True)
def pytest_saecheck_groupings() -> Mapping[str, Callable[[Any, Any], Grouping]]:
    return {GROUPING_NAME: lambda model, tokens: demo_constructs()}


@pytest.hookimpl(trylast=True)
def pytest_saecheck_pipeline_subjects(device: Any) -> Subjects:
    from pytest_saecheck.checks.pipeline_subjects import N_SEQUENCES, Subjects

    return Subjects(
        model=demo.load_model(device=device),
        tokens=demo.load_tokens(N_SEQUENCES, device="cpu"),
        hook_name=demo.HOOK_NAME,
        special_token_ids=(demo.BOS_ID, demo.EOS_ID),
        relu_model=demo.relu_model,
        trained_sae=lambda on: demo.load_sae("good", device=on),
        description="demo model, demo 'good' SAE",
    )
