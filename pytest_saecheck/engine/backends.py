"""Which :class:`~pytest_saecheck.engine.cut.ModelCut` reaches a model: TransformerLens' ``HookedTransformer`` or
a Hugging Face ``AutoModelForCausalLM`` (the ``backend`` setting)."""

from __future__ import annotations

from typing import Any

from pytest_saecheck.engine.cut import HookedTransformerCut, ModelCut, is_hooked_transformer
from pytest_saecheck.errors import ConfigError, ModelStateError
from pytest_saecheck.versions import transformer_lens_refusal

BACKENDS = ("auto", "transformer_lens", "hf")
"""``auto``: the backend of the model given; ``transformer_lens``: a ``HookedTransformer``; ``hf``: a Hugging Face
causal language model."""


def check_backend(backend: str) -> str:
    """``backend`` when it is one of :data:`BACKENDS`, else :class:`ConfigError`."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def cut_for(model: Any, backend: str = "auto") -> ModelCut:
    """The cut of ``model`` on ``backend`` (see :data:`BACKENDS`).

    Raises :class:`ModelStateError` for a model no backend reaches (a TransformerLens ``TransformerBridge``,
    anything that is neither a ``HookedTransformer`` nor a causal language model of transformers), or one that is
    not of the backend asked for; :class:`ConfigError` for an unknown backend.
    """
    check_backend(backend)
    kind = type(model).__name__
    if "TransformerBridge" in {cls.__name__ for cls in type(model).__mro__}:
        raise ModelStateError(
            "the model is a TransformerLens TransformerBridge, whose hooks and layer cuts differ from "
            "HookedTransformer's; load it as a HookedTransformer instead: "
            "HookedTransformer.from_pretrained_no_processing(name) (or give the model's name and let "
            "pytest-saecheck load it the way the SAE was trained), or give its Hugging Face model with "
            "backend='hf'" + (f". {refusal}" if (refusal := transformer_lens_refusal()) else "")
        )
    if is_hooked_transformer(model):
        if backend == "hf":
            raise ModelStateError(
                f"backend='hf' takes a Hugging Face model, got a TransformerLens {kind}; give the Hugging Face "
                "model (AutoModelForCausalLM.from_pretrained) or backend='transformer_lens'"
            )
        return HookedTransformerCut(model)
    from pytest_saecheck.engine.hf import HFCut, is_causal_lm

    if is_causal_lm(model):
        if backend == "transformer_lens":
            raise ModelStateError(
                f"backend='transformer_lens' takes a HookedTransformer, got the Hugging Face {kind}; load it with "
                "HookedTransformer.from_pretrained_no_processing(name) or use backend='hf'"
            )
        return HFCut(model)
    raise ModelStateError(
        f"expected a TransformerLens HookedTransformer or a Hugging Face causal language model "
        f"(AutoModelForCausalLM), got {kind}; load one with pytest_saecheck.load_model(spec), "
        "HookedTransformer.from_pretrained_no_processing(name) or AutoModelForCausalLM.from_pretrained(path)"
    )


def check_model(model: Any) -> list[str]:
    """Refuse a model the engine cannot measure; return the hooks already on it (``"name (kind)"``).

    Raises :class:`ModelStateError` for a TransformerLens ``TransformerBridge``, a ``HookedSAETransformer`` with
    SAEs attached, or anything no backend reaches (:func:`cut_for`).
    """
    return cut_for(model).check()
