"""Fit a compute scaling law for a model family from the models themselves, on the tokens the SAEs are
evaluated on (:func:`fit_scaling_law_from_models`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from pytest_saecheck.defaults import DEFAULT_BATCH_SIZE
from pytest_saecheck.engine.backends import check_model, cut_for
from pytest_saecheck.engine.plan import check_tokens
from pytest_saecheck.errors import ConfigError
from pytest_saecheck.policy import TokenPolicy
from pytest_saecheck.scaling import ScalingLaw, fit_scaling_law
from pytest_saecheck.scoring import prepare_original

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# Training tokens of model suites whose members were all trained on the same data budget (name pattern, D).
# Pythia (Biderman et al. 2023): 143,000 steps of 1,024 sequences of 2,048 tokens = 299,892,736,000 tokens.
KNOWN_TRAIN_TOKENS: tuple[tuple[str, int], ...] = ((r"pythia", 143_000 * 1024 * 2048),)


def known_train_tokens(name: str) -> int | None:
    """Training tokens of a model of a known suite (see :data:`KNOWN_TRAIN_TOKENS`), by name; else None."""
    for pattern, tokens in KNOWN_TRAIN_TOKENS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return tokens
    return None


def model_loss(
    model: Any,
    tokens: torch.Tensor,
    *,
    policy: TokenPolicy | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` on ``tokens`` ``[n_sequences, seq_len]``, pooled
    over the predictions the token policy keeps: the ``ce_orig`` that :func:`evaluate` reports on these tokens.
    ``model``: any model an evaluation takes (:func:`~pytest_saecheck.engine.backends.cut_for`)."""
    cut = cut_for(model)
    policy = (policy or TokenPolicy()).resolved_for(cut)
    tokens = check_tokens(cut, tokens, policy)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size]
            logits = cut.logits(cut.capture(batch, []).take_final())
            ce = prepare_original(logits, batch, in_place=True).ce
            mask = policy.prediction_mask(batch)
            total += ce[mask].double().sum().cpu()
            count += int(mask.sum())
    return float(total) / count


def fit_scaling_law_from_models(
    models: Sequence[HookedTransformer],
    tokens: torch.Tensor,
    *,
    n_params: Sequence[float] | None = None,
    n_train_tokens: Sequence[float] | None = None,
    policy: TokenPolicy | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
    corpus: str = "the evaluation tokens",
) -> ScalingLaw:
    """Fit ``L(C) = E + A C^-gamma`` for a model family, each model's loss measured on ``tokens``.

    ``models``: ``HookedTransformer`` instances or specs for :func:`pytest_saecheck.load_model` (TransformerLens
    names or local directories), one per family member. ``tokens``: ``[n_sequences, seq_len]`` token ids, the
    tokens the SAEs are evaluated on, scored with the token policy ``policy`` (default: :func:`evaluate`'s), so
    each point's loss is the ``ce_orig`` an evaluation reports. Compute is ``6 N D`` FLOPs: ``n_params`` (N per
    model; default: every parameter of the loaded model, embeddings included) and ``n_train_tokens`` (D per
    model; default: read from a known suite by name, e.g. Pythia's 299,892,736,000 tokens). The fit and its
    bootstrap intervals are :func:`~pytest_saecheck.scaling.fit_scaling_law`'s; save it with ``.save(path)``.

    Raises :class:`ConfigError` (lengths that differ, a model of unknown training tokens without
    ``n_train_tokens``, too few models) and the errors of :func:`load_model` and :func:`evaluate` for the tokens.
    """
    from pytest_saecheck.loading import load_model

    specs = list(models)
    for name, values in (("n_params", n_params), ("n_train_tokens", n_train_tokens)):
        if values is not None and len(values) != len(specs):
            raise ConfigError(f"{name} needs one value per model: {len(values)} for {len(specs)} models")
    compute, losses, names = [], [], []
    for index, spec in enumerate(specs):
        model = load_model(spec, device=device) if isinstance(spec, str) else spec
        check_model(model)
        name = spec if isinstance(spec, str) else _model_name(model, index)
        n = (
            float(n_params[index])
            if n_params is not None
            else float(sum(p.numel() for p in model.parameters()))
        )
        d = float(n_train_tokens[index]) if n_train_tokens is not None else known_train_tokens(name)
        if d is None:
            raise ConfigError(
                f"the training tokens of {name!r} are unknown (known suites: pythia); pass n_train_tokens=[...] "
                "with one value per model"
            )
        losses.append(model_loss(model, tokens, policy=policy, batch_size=batch_size))
        compute.append(6.0 * n * float(d))
        names.append(name)
    return fit_scaling_law(
        compute,
        losses,
        n_bootstrap=n_bootstrap,
        seed=seed,
        source=f"fit_scaling_law_from_models on {int(tokens.numel())} tokens: {', '.join(names)}",
        corpus=corpus,
    )


def _model_name(model: Any, index: int) -> str:
    """A loaded model's name: TransformerLens' ``cfg.model_name`` or Hugging Face's ``config.name_or_path``."""
    cfg = getattr(model, "cfg", None)
    name = getattr(cfg, "model_name", None) or getattr(getattr(model, "config", None), "name_or_path", None)
    return str(name) if name else f"model {index}"
