"""What the engine requires of a language model, as a type.

A model is a TransformerLens ``HookedTransformer`` or a Hugging Face causal language model (``AutoModelForCausalLM``):
both are torch modules, and :func:`pytest_saecheck.engine.backends.cut_for` decides at run time which backend
reaches it, refusing anything else with a :class:`~pytest_saecheck.errors.ModelStateError` that names the fix.
:class:`LanguageModel` states the part of that contract a type checker can see; what an SAE must offer is
:class:`pytest_saecheck.dictionaries.Dictionary`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["LanguageModel"]


class LanguageModel(Protocol):
    """A torch module the engine can cut (``torch.nn.Module`` satisfies it): its parameters give the device and
    dtype the evaluation runs in, and ``training`` must be False (the engine refuses a model in training mode)."""

    training: bool

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...
