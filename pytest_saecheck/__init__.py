"""pytest-saecheck: acceptance tests for sparse autoencoders.

The public API is re-exported here lazily: importing ``pytest_saecheck`` (which pytest does for every run
through the plugin entry point) must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pytest_saecheck.errors import (
    ConfigError,
    DegenerateActivationsError,
    EmptyTokenSetError,
    HookNotFoundError,
    LoadError,
    ModelStateError,
    NoFaithfulPointError,
    NonFiniteError,
    SAECheckError,
    SAECheckWarning,
    ShapeMismatchError,
    TrainingCheckError,
    UnsupportedDictionaryError,
    WeightsUnavailableError,
)

__version__ = "0.1.0.dev0"

_LAZY: dict[str, str] = {
    "assert_ce_recovery": "pytest_saecheck.assertions",
    "assert_r2_matches_legacy": "pytest_saecheck.assertions",
    "assert_no_regression": "pytest_saecheck.assertions",
    "assert_metric_pipeline": "pytest_saecheck.checks.pipeline",
    "BaselineError": "pytest_saecheck.checks.baselines",
    "saecheck_param": "pytest_saecheck.plugin.settings",
    "SAECheckSettings": "pytest_saecheck.plugin.settings",
    "SAECheck": "pytest_saecheck.plugin.fixtures",
    "evaluate": "pytest_saecheck.engine",
    "Evaluation": "pytest_saecheck.engine",
    "EvaluationSet": "pytest_saecheck.engine",
    "TokenPolicy": "pytest_saecheck.engine",
    "load_model": "pytest_saecheck.loading",
    "load_sae": "pytest_saecheck.loading",
    "load_tokens": "pytest_saecheck.loading",
    "ScalingLaw": "pytest_saecheck.scaling",
    "fit_scaling_law": "pytest_saecheck.scaling",
    "fit_scaling_law_from_models": "pytest_saecheck.family",
    "load_scaling_law": "pytest_saecheck.scaling",
    "assert_no_aux_bias_double_count": "pytest_saecheck.training",
    "assert_aux_residual_detached": "pytest_saecheck.training",
    "assert_aux_k_scaling": "pytest_saecheck.training",
    "assert_aux_loss_zero_without_dead": "pytest_saecheck.training",
    "assert_training_objective": "pytest_saecheck.training",
    "AuxLossAdapter": "pytest_saecheck.training",
    "AuxLossAdapterBase": "pytest_saecheck.training",
    "resolve_training_adapter": "pytest_saecheck.training",
    "SAELensTopKAdapter": "pytest_saecheck.training",
    "SparsifyAdapter": "pytest_saecheck.training",
    "assert_task_preserved": "pytest_saecheck.checks.tasks",
    "measure_task": "pytest_saecheck.checks.tasks",
    "load_task": "pytest_saecheck.checks.tasks",
    "Task": "pytest_saecheck.checks.tasks",
    "TaskResult": "pytest_saecheck.checks.tasks",
    "Grouping": "pytest_saecheck.groups",
    "CrossLayerTranscoder": "pytest_saecheck.clt",
    "load_clt": "pytest_saecheck.loading.clt",
    "HookRecord": "pytest_saecheck.hookpoints",
    "ModulePoint": "pytest_saecheck.hookpoints",
    "ResolvedPoints": "pytest_saecheck.hookpoints",
    "resolve_points": "pytest_saecheck.hookpoints",
    "choose_backend": "pytest_saecheck.hookpoints",
    "BackendChoice": "pytest_saecheck.hookpoints",
}

if TYPE_CHECKING:
    from pytest_saecheck.assertions import assert_ce_recovery, assert_no_regression, assert_r2_matches_legacy
    from pytest_saecheck.checks.baselines import BaselineError
    from pytest_saecheck.checks.pipeline import assert_metric_pipeline
    from pytest_saecheck.checks.tasks import Task, TaskResult, assert_task_preserved, load_task, measure_task
    from pytest_saecheck.clt import CrossLayerTranscoder
    from pytest_saecheck.engine import Evaluation, EvaluationSet, TokenPolicy, evaluate
    from pytest_saecheck.family import fit_scaling_law_from_models
    from pytest_saecheck.groups import Grouping
    from pytest_saecheck.hookpoints import (
        BackendChoice,
        HookRecord,
        ModulePoint,
        ResolvedPoints,
        choose_backend,
        resolve_points,
    )
    from pytest_saecheck.loading import load_model, load_sae, load_tokens
    from pytest_saecheck.loading.clt import load_clt
    from pytest_saecheck.plugin.fixtures import SAECheck
    from pytest_saecheck.plugin.settings import SAECheckSettings, saecheck_param
    from pytest_saecheck.scaling import ScalingLaw, fit_scaling_law, load_scaling_law
    from pytest_saecheck.training import (
        AuxLossAdapter,
        AuxLossAdapterBase,
        SAELensTopKAdapter,
        SparsifyAdapter,
        assert_aux_k_scaling,
        assert_aux_loss_zero_without_dead,
        assert_aux_residual_detached,
        assert_no_aux_bias_double_count,
        assert_training_objective,
        resolve_training_adapter,
    )


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pytest_saecheck' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AuxLossAdapter",
    "AuxLossAdapterBase",
    "BackendChoice",
    "BaselineError",
    "ConfigError",
    "CrossLayerTranscoder",
    "DegenerateActivationsError",
    "EmptyTokenSetError",
    "Evaluation",
    "EvaluationSet",
    "Grouping",
    "HookNotFoundError",
    "HookRecord",
    "LoadError",
    "ModelStateError",
    "ModulePoint",
    "NoFaithfulPointError",
    "NonFiniteError",
    "ResolvedPoints",
    "SAECheck",
    "SAECheckError",
    "SAECheckSettings",
    "SAECheckWarning",
    "SAELensTopKAdapter",
    "ScalingLaw",
    "ShapeMismatchError",
    "SparsifyAdapter",
    "Task",
    "TaskResult",
    "TokenPolicy",
    "TrainingCheckError",
    "UnsupportedDictionaryError",
    "WeightsUnavailableError",
    "__version__",
    "assert_aux_k_scaling",
    "assert_aux_loss_zero_without_dead",
    "assert_aux_residual_detached",
    "assert_ce_recovery",
    "assert_metric_pipeline",
    "assert_no_aux_bias_double_count",
    "assert_no_regression",
    "assert_r2_matches_legacy",
    "assert_task_preserved",
    "assert_training_objective",
    "choose_backend",
    "evaluate",
    "fit_scaling_law",
    "fit_scaling_law_from_models",
    "load_clt",
    "load_model",
    "load_sae",
    "load_scaling_law",
    "load_task",
    "load_tokens",
    "measure_task",
    "resolve_points",
    "resolve_training_adapter",
    "saecheck_param",
]
