"""Finding the adapter of a training implementation, and filling its optional members once.

Order: the ``adapter=`` argument → the ``pytest_saecheck_training_adapter`` hook of the running pytest session →
the built-in adapters (:mod:`.adapters`) → the object itself when it satisfies the protocol → a
:class:`~pytest_saecheck.errors.TrainingCheckError` that says how to write an adapter. :func:`resolve` returns a
:class:`ResolvedAdapter`, where every optional member of the protocol has its value: the checks read no
attribute of an adapter with a default of their own.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pytest_saecheck.errors import TrainingCheckError
from pytest_saecheck.running import active_hook
from pytest_saecheck.training.adapters import builtin_training_adapter
from pytest_saecheck.training.protocol import (
    REQUIRED_MEMBERS,
    SELECTIONS,
    AuxGroups,
    default_gradient_tensors,
    gao_k_aux_and_scale,
)

__all__ = ["ResolvedAdapter", "resolve", "resolve_training_adapter"]


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter with every member of :class:`~pytest_saecheck.training.protocol.AuxLossAdapter` filled in.

    ``adapter`` is the adapter as found; the required members are its bound methods; the optional ones are its
    own where it has them, else the defaults of
    :class:`~pytest_saecheck.training.protocol.AuxLossAdapterBase`. ``module`` is the ``torch.nn.Module``
    whose state the checks snapshot and restore (``None``: only ``b_dec`` is restored).
    """

    adapter: Any
    name: str
    module: torch.nn.Module | None
    selection: str
    shift_invariant: bool
    decoder_bias: Callable[[], torch.Tensor]
    decoder_weight: Callable[[], torch.Tensor]
    aux_pre_activations: Callable[[torch.Tensor], torch.Tensor]
    reconstruction: Callable[[torch.Tensor], torch.Tensor]
    aux_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    reduce_aux_error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    k_aux_and_scale: Callable[[int, int], tuple[int, float]]
    aux_groups: Callable[[torch.Tensor], AuxGroups | None]
    gradient_tensors: Callable[[], Mapping[str, torch.Tensor]]


def _looks_like_adapter(obj: object) -> bool:
    return all(callable(getattr(obj, member, None)) for member in REQUIRED_MEMBERS)


def _missing_members(adapter: object, source: str, training_sae: object) -> None:
    missing = [member for member in REQUIRED_MEMBERS if not callable(getattr(adapter, member, None))]
    if missing:
        raise TrainingCheckError(
            f"The training adapter {type(adapter).__qualname__!r} (from {source}) for "
            f"{type(training_sae).__qualname__!r} lacks {', '.join(missing)}. An adapter must provide "
            f"{', '.join(REQUIRED_MEMBERS)}; see pytest_saecheck.AuxLossAdapter."
        )


def _unsupported_message(training_sae: object) -> str:
    cls = type(training_sae)
    lines = [
        f"No AuxK training adapter for {cls.__module__}.{cls.__qualname__}.",
        "Built-in adapters cover SAE Lens TopK-family training SAEs (TopK, BatchTopK, Matryoshka BatchTopK, "
        "AbsTopK) and EleutherAI sparsify's SparseCoder.",
        "For another implementation, write an adapter (see pytest_saecheck.AuxLossAdapter and "
        "AuxLossAdapterBase) and either pass it, adapter=MyAdapter(sae), or return it from a hook in "
        "conftest.py:",
        "    def pytest_saecheck_training_adapter(training_sae):",
        "        if isinstance(training_sae, MySAE):",
        "            return MyAdapter(training_sae)",
    ]
    if cls.__name__ in ("SparseCoder", "Sae") and importlib.util.find_spec("sparsify") is None:
        lines.append(
            "This looks like an EleutherAI sparsify SparseCoder, but sparsify is not installed: pip install eai-sparsify"
        )
    return "\n".join(lines)


def _find(training_sae: Any, adapter: Any) -> tuple[Any, str]:
    """(the adapter, where it came from), its required members checked."""
    found: Any = None
    if adapter is not None:
        if isinstance(adapter, type) or (callable(adapter) and not _looks_like_adapter(adapter)):
            adapter = adapter(training_sae)
        found, source = adapter, "the adapter= argument"
    else:
        hook = active_hook()
        hook_caller = getattr(hook, "pytest_saecheck_training_adapter", None) if hook is not None else None
        if hook_caller is not None:
            found, source = (
                hook_caller(training_sae=training_sae),
                "the pytest_saecheck_training_adapter hook",
            )
        if found is None:
            found, source = builtin_training_adapter(training_sae), "the built-in adapters"
        if found is None and _looks_like_adapter(training_sae):
            found, source = training_sae, "the object itself"
        if found is None:
            raise TrainingCheckError(_unsupported_message(training_sae))
    _missing_members(found, source, training_sae)
    return found, source


def _fill(adapter: Any, training_sae: Any) -> ResolvedAdapter:
    """Read every optional member once (the one place with defaults), and check ``selection``."""
    selection = getattr(adapter, "selection", "value")
    if selection not in SELECTIONS:
        raise TrainingCheckError(
            f"The training adapter {type(adapter).__qualname__!r} has selection={selection!r}; "
            "expected 'value' or 'magnitude'."
        )
    name = getattr(adapter, "name", None)
    module = getattr(adapter, "module", None)
    if not isinstance(module, torch.nn.Module):
        module = training_sae if isinstance(training_sae, torch.nn.Module) else None
    own_k = getattr(adapter, "k_aux_and_scale", None)
    own_groups = getattr(adapter, "aux_groups", None)
    own_gradients = getattr(adapter, "gradient_tensors", None)

    def k_aux_and_scale(num_dead: int, d_in: int) -> tuple[int, float]:
        k_aux, scale = (own_k if callable(own_k) else gao_k_aux_and_scale)(num_dead, d_in)
        return int(k_aux), float(scale)

    def aux_groups(x: torch.Tensor) -> AuxGroups | None:
        return own_groups(x) if callable(own_groups) else None

    def gradient_tensors() -> Mapping[str, torch.Tensor]:
        if callable(own_gradients):
            return dict(own_gradients())
        return default_gradient_tensors(module, adapter.decoder_bias())

    return ResolvedAdapter(
        adapter=adapter,
        name=str(name) if name else type(adapter).__qualname__,
        module=module,
        selection=str(selection),
        shift_invariant=bool(getattr(adapter, "shift_invariant", False)),
        decoder_bias=adapter.decoder_bias,
        decoder_weight=adapter.decoder_weight,
        aux_pre_activations=adapter.aux_pre_activations,
        reconstruction=adapter.reconstruction,
        aux_loss=adapter.aux_loss,
        reduce_aux_error=adapter.reduce_aux_error,
        k_aux_and_scale=k_aux_and_scale,
        aux_groups=aux_groups,
        gradient_tensors=gradient_tensors,
    )


def resolve(training_sae: object, adapter: object = None) -> ResolvedAdapter:
    """The :class:`ResolvedAdapter` of ``training_sae`` (``adapter`` as for :func:`resolve_training_adapter`;
    an already resolved adapter is returned as it is).

    Raises:
        TrainingCheckError: no adapter found, one that lacks a required member, or a bad ``selection``.
    """
    if isinstance(adapter, ResolvedAdapter):
        return adapter
    found, _ = _find(training_sae, adapter)
    return _fill(found, training_sae)


def resolve_training_adapter(training_sae: Any, adapter: Any = None) -> Any:
    """Find the :class:`~pytest_saecheck.training.protocol.AuxLossAdapter` for ``training_sae``.

    Order: ``adapter`` (an adapter, or a callable ``adapter(training_sae) -> adapter``) → the
    ``pytest_saecheck_training_adapter`` hook of the running pytest session → the built-in adapters → a
    :class:`~pytest_saecheck.errors.TrainingCheckError`. An object that already satisfies the protocol is its
    own adapter. Returns the adapter as found (checked as :func:`resolve` checks it).
    """
    if isinstance(adapter, ResolvedAdapter):
        return adapter.adapter
    found, _ = _find(training_sae, adapter)
    _fill(found, training_sae)  # validates the optional members
    return found
