"""Extension points of pytest-saecheck, added to pytest's plugin manager through ``pytest_addhooks``.

Implement any of these in a ``conftest.py`` or a plugin. Loader hooks are ``firstresult``: return ``None`` to
let the next implementation (and finally the built-in loaders) handle the spec. The loaders call them through the
active run's hook relay (:func:`pytest_saecheck.running.active_hook`). A package can also ship a
plug-in of default implementations under the ``pytest_saecheck`` entry-point group
(:mod:`pytest_saecheck.extensions`): the bundled demo (:mod:`pytest_saecheck.demo.plugin`) is one, and it works
outside a pytest session too.

This module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from pytest_saecheck.groups import Grouping
    from pytest_saecheck.scaling import ScalingLaw


@pytest.hookspec(firstresult=True)
def pytest_saecheck_load_model(
    spec: str, device: str, dtype: str | None, model_from_pretrained_kwargs: dict[str, Any]
) -> Any:
    """Return a TransformerLens ``HookedTransformer`` for ``spec``, or ``None`` to decline.

    ``spec`` is the ``model`` setting (a relative path already made absolute) or the model named in the SAE's
    config; ``device`` is the resolved device (``"cuda"``, ``"cpu"``, ...); ``dtype`` is ``"float32"``,
    ``"float16"``, ``"bfloat16"``, ``"float64"`` or ``None`` (the loader's default).
    ``model_from_pretrained_kwargs`` are the keyword arguments the SAE was trained with (its
    ``cfg.metadata.model_from_pretrained_kwargs``, or the ``model_from_pretrained_kwargs`` setting; ``{}`` when
    neither says): load the model as ``HookedTransformer.from_pretrained_no_processing(name, **kwargs)`` does.
    Implementations may leave out arguments they do not use. Raise
    ``pytest_saecheck.errors.WeightsUnavailableError`` when the weights are not on this machine, so the test is
    skipped (or errors) with your message.
    """


@pytest.hookspec(firstresult=True)
def pytest_saecheck_load_sae(spec: str, device: str, dtype: str | None) -> Any:
    """Return an SAE Lens ``SAE`` (or an object with the same ``encode``/``decode``/``cfg``) for ``spec``, or ``None``.

    Arguments as for :func:`pytest_saecheck_load_model`.
    """


@pytest.hookspec(firstresult=True)
def pytest_saecheck_load_tokens(
    spec: str, model: HookedTransformer, sae: SAE | None, n_tokens: int, context_size: int, seed: int
) -> Any:
    """Return a 2-D integer tensor of token ids ``[n_sequences, context_size]`` for ``spec``, or ``None``.

    ``spec`` is the ``tokens`` setting, or the default source already resolved (``"hf:<the SAE's dataset>"`` or
    ``"demo"``); ``sae`` is ``None`` when no SAE is configured. Return about ``n_tokens / context_size`` rows,
    each starting with BOS when the SAE was trained with ``prepend_bos`` (SAE Lens' default).
    """


@pytest.hookspec(firstresult=True)
def pytest_saecheck_training_adapter(training_sae: Any) -> Any:
    """Return an adapter (see ``pytest_saecheck.AuxLossAdapter``) for a training SAE, or ``None``."""


@pytest.hookspec(firstresult=True)
def pytest_saecheck_default_model(sae_spec: str, sae: Any) -> str | None:
    """Return the model spec a test that names only the SAE ``sae_spec`` (loaded: ``sae``) runs on, or ``None``.

    Without an answer, the model is the one the SAE's config names (``metadata.model_name``).
    """


@pytest.hookspec(firstresult=True)
def pytest_saecheck_sae_directory(spec: str) -> Path | None:
    """Return the local directory holding the SAE ``spec``'s config (``cfg.json``), or ``None``.

    Asked where a config is enough and the weights must not be loaded (``--saecheck-plan``, memory-sized release
    passes). A local path is read without asking.
    """


@pytest.hookspec(firstresult=True)
def pytest_saecheck_model_config(spec: str) -> Mapping[str, Any] | None:
    """Return the model ``spec``'s config (a Hugging Face ``config.json``'s or TransformerLens' fields), read
    without its weights, or ``None``. Asked to plan passes from shapes alone; a local Hugging Face directory is
    read without asking."""


@pytest.hookspec(firstresult=True)
def pytest_saecheck_default_tokens(sae_spec: str | None, sae: Any) -> str | None:
    """Return the token source of a test that names no tokens, for SAE ``sae_spec`` (``sae``), or ``None``.

    Without an answer, the tokens are the SAE's training dataset (its ``metadata.dataset_path``).
    """


@pytest.hookspec(firstresult=True)
def pytest_saecheck_default_scaling_law(model_spec: str) -> str | None:
    """Return the name of the scaling law (see :func:`pytest_saecheck_scaling_laws`) of tests on ``model_spec``
    when the ``scaling_law`` setting is left at its default, or ``None`` (the default law then applies)."""


@pytest.hookspec
def pytest_saecheck_scaling_laws() -> Mapping[str, Callable[[], ScalingLaw]] | None:
    """Return named scaling laws: ``{name: function returning the ScalingLaw}``, or ``None``.

    A name (lower case) is then a value of the ``scaling_law`` setting and of ``evaluate(..., scaling_law=...)``;
    the function runs only when the law is used. Names of the built-in presets, ``"default"`` and ``"none"``
    cannot be taken.
    """


@pytest.hookspec
def pytest_saecheck_groupings() -> Mapping[str, Callable[[Any, Any], Grouping]] | None:
    """Return named token groupings: ``{name: function (model, tokens) returning the Grouping}``, or ``None``.

    A name is then a value of the ``token_groups`` setting (:mod:`pytest_saecheck.groups`); names of the built-in
    groupings cannot be taken.
    """


@pytest.hookspec(firstresult=True)
def pytest_saecheck_pipeline_subjects(device: Any) -> Any:
    """Return the subjects of the metric-pipeline battery (``assert_metric_pipeline``) on ``device``, or ``None``.

    See :class:`pytest_saecheck.checks.pipeline_subjects.Subjects` for what they must hold.
    """
