"""Extension points of pytest-saecheck, added to pytest's plugin manager through ``pytest_addhooks``.

Implement any of these in a ``conftest.py`` or a plugin. Loader hooks are ``firstresult``: return ``None`` to
let the next implementation (and finally the built-in loaders) handle the spec. The loaders call them through the
active run's hook relay (:func:`pytest_saecheck.running.active_hook`).

This module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


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
