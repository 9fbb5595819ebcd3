"""Built-in :class:`~pytest_saecheck.training.protocol.AuxLossAdapter` implementations.

- :class:`SAELensTopKAdapter`: SAE Lens 6.x ``TopKTrainingSAE`` and its subclasses (``BatchTopKTrainingSAE``,
  ``MatryoshkaBatchTopKTrainingSAE`` including ``use_matryoshka_aux_loss``, ``AbsTopKTrainingSAE``), through the
  public ``training_forward_pass`` / ``encode_with_hidden_pre`` / ``decode`` methods.
- :class:`SparsifyAdapter`: EleutherAI sparsify's ``SparseCoder`` (PyPI ``eai-sparsify``, imported lazily).

Both carry their library's normalisation of the aux loss; the reference formula itself lives in
:mod:`pytest_saecheck.training.reference`. This module imports only the protocol from its package.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch

from pytest_saecheck.errors import TrainingCheckError
from pytest_saecheck.training.protocol import AuxGroups, AuxLossAdapterBase

__all__ = ["SAELensTopKAdapter", "SparsifyAdapter", "builtin_training_adapter"]

_SPARSIFY_MISSING = (
    "EleutherAI sparsify is not installed, so its SparseCoder cannot be checked: pip install eai-sparsify "
    "(it is in pytest-saecheck's dev extra)."
)


def _class_modules(obj: object) -> list[str]:
    return [getattr(c, "__module__", "") or "" for c in type(obj).__mro__]


def _from_package(obj: object, package: str) -> bool:
    return any(m == package or m.startswith(package + ".") for m in _class_modules(obj))


def _import_optional(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------------------------
# SAE Lens
# --------------------------------------------------------------------------------------------------------------


class SAELensTopKAdapter(AuxLossAdapterBase):
    """Adapter for SAE Lens 6.x TopK-family training SAEs.

    The implementation's aux loss is read from ``training_forward_pass(TrainStepInput(...)).losses
    ["auxiliary_reconstruction_loss"]``, i.e. exactly what the SAE Lens trainer adds to the loss. Normalisation:
    ``aux_loss_coefficient × mean over rows of ‖ê - e‖²``.
    """

    LOSS_KEY = "auxiliary_reconstruction_loss"

    def __init__(self, training_sae: Any) -> None:
        super().__init__(training_sae)
        missing = [
            m
            for m in ("training_forward_pass", "encode_with_hidden_pre", "decode", "W_dec", "b_dec", "cfg")
            if not hasattr(training_sae, m)
        ]
        if missing:
            raise TrainingCheckError(
                f"{type(training_sae).__qualname__} lacks {', '.join(missing)}; this sae-lens version is not "
                "supported by the built-in SAE Lens adapter (6.x training SAEs are). Pass adapter=... instead."
            )
        self._step_input_cls = _import_optional("sae_lens.saes.sae", "TrainStepInput")
        if self._step_input_cls is None:
            raise TrainingCheckError(
                "sae_lens.saes.sae.TrainStepInput is missing in the installed sae-lens; the built-in SAE Lens "
                "adapter needs a 6.x release."
            )
        abs_cls = _import_optional("sae_lens.saes.abstopk_sae", "AbsTopKTrainingSAE")
        self.selection = "magnitude" if abs_cls is not None and isinstance(training_sae, abs_cls) else "value"
        cfg = training_sae.cfg
        self.shift_invariant = bool(getattr(cfg, "apply_b_dec_to_input", False)) and getattr(
            cfg, "normalize_activations", "none"
        ) in ("none", "expected_average_only_in", None)

    @property
    def name(self) -> str:
        return f"{type(self.training_sae).__qualname__} (SAE Lens adapter)"

    # -- required members --

    def decoder_bias(self) -> torch.Tensor:
        return self.training_sae.b_dec

    def decoder_weight(self) -> torch.Tensor:
        w = self.training_sae.W_dec
        if getattr(self.training_sae.cfg, "rescale_acts_by_decoder_norm", False):
            w = w / w.norm(dim=-1, keepdim=True)
        return w

    def aux_pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.training_sae.encode_with_hidden_pre(x)[1]

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        feature_acts, _ = self.training_sae.encode_with_hidden_pre(x)
        return self.training_sae.decode(feature_acts)

    def aux_loss(self, x: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
        out = self.training_sae.training_forward_pass(self._step_input(x, dead_mask))
        losses = getattr(out, "losses", None) or {}
        if self.LOSS_KEY not in losses:
            raise TrainingCheckError(
                f"{type(self.training_sae).__qualname__}.training_forward_pass returned no "
                f"{self.LOSS_KEY!r} loss (got {sorted(losses)}); it has no dead-latent AuxK loss to check."
            )
        loss = losses[self.LOSS_KEY]
        return loss if isinstance(loss, torch.Tensor) else torch.as_tensor(float(loss))

    def reduce_aux_error(self, squared_error: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        coef = float(getattr(self.training_sae.cfg, "aux_loss_coefficient", 1.0))
        return coef * squared_error.sum(dim=-1).mean()

    # -- optional members --

    def aux_groups(self, x: torch.Tensor) -> AuxGroups | None:
        cfg = self.training_sae.cfg
        if not getattr(cfg, "use_matryoshka_aux_loss", False):
            return None
        widths = list(getattr(cfg, "matryoshka_widths", []) or [])
        if not widths or widths[-1] != cfg.d_sae:
            widths.append(cfg.d_sae)
        feature_acts, _ = self.training_sae.encode_with_hidden_pre(x)
        if feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        w = self.decoder_weight()
        partial = self.decoder_bias().expand(x.shape[0], -1)
        groups = []
        prev = 0
        for width in widths:
            partial = partial + feature_acts[:, prev:width] @ w[prev:width]
            groups.append((prev, width, partial))
            prev = width
        return groups

    # -- helpers --

    def _step_input(self, x: torch.Tensor, dead_mask: torch.Tensor) -> Any:
        coefficients = {}
        get_coefficients = getattr(self.training_sae, "get_coefficients", None)
        if callable(get_coefficients):
            for key, value in get_coefficients().items():
                coefficients[key] = float(getattr(value, "value", value))
        values: dict[str, Any] = {
            "sae_in": x,
            "coefficients": coefficients,
            "dead_neuron_mask": dead_mask,
            "n_training_steps": 0,
            "is_logging_step": False,
        }
        kwargs = {}
        for field in dataclasses.fields(self._step_input_cls):
            if field.name in values:
                kwargs[field.name] = values[field.name]
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise TrainingCheckError(
                    f"sae-lens TrainStepInput has a required field {field.name!r} the built-in adapter does "
                    "not know; pass adapter=... for this sae-lens version."
                )
        return self._step_input_cls(**kwargs)


def _sae_lens_adapter(training_sae: object) -> SAELensTopKAdapter | None:
    if not _from_package(training_sae, "sae_lens"):
        return None
    topk_cls = _import_optional("sae_lens.saes.topk_sae", "TopKTrainingSAE")
    if topk_cls is not None and isinstance(training_sae, topk_cls):
        return SAELensTopKAdapter(training_sae)
    training_cls = _import_optional("sae_lens.saes.sae", "TrainingSAE")
    if training_cls is not None and isinstance(training_sae, training_cls):
        raise TrainingCheckError(
            f"{type(training_sae).__qualname__} is an SAE Lens training SAE without a TopK-style AuxK loss "
            "(dead latents reconstructing the residual); the AuxK checks apply to TopKTrainingSAE and its "
            "subclasses (BatchTopK, Matryoshka BatchTopK, AbsTopK)."
        )
    raise TrainingCheckError(
        f"{type(training_sae).__qualname__} is an SAE Lens inference SAE; the AuxK checks need the training "
        "class (e.g. TopKTrainingSAE), which computes the aux loss."
    )


# --------------------------------------------------------------------------------------------------------------
# EleutherAI sparsify
# --------------------------------------------------------------------------------------------------------------


def _require_sparsify() -> Any:
    try:
        return importlib.import_module("sparsify")
    except ImportError as exc:
        raise TrainingCheckError(_SPARSIFY_MISSING) from exc


class SparsifyAdapter(AuxLossAdapterBase):
    """Adapter for EleutherAI sparsify's ``SparseCoder`` (autoencoding: the target is the input).

    The implementation's aux loss is ``forward(x, dead_mask=...).auxk_loss``. Normalisation (FVU-style):
    ``Σ‖ê - e‖² / Σ‖x - mean(x)‖²`` over the batch.
    """

    def __init__(self, training_sae: Any) -> None:
        _require_sparsify()
        super().__init__(training_sae)
        if getattr(training_sae, "W_dec", None) is None:
            raise TrainingCheckError(
                "This SparseCoder was built without a decoder (decoder=False); it has no AuxK loss to check."
            )
        cfg = training_sae.cfg
        self.shift_invariant = (
            not getattr(cfg, "transcode", False) and getattr(training_sae, "W_skip", None) is None
        )

    @property
    def name(self) -> str:
        return f"{type(self.training_sae).__qualname__} (sparsify adapter)"

    def decoder_bias(self) -> torch.Tensor:
        return self.training_sae.b_dec

    def decoder_weight(self) -> torch.Tensor:
        return self.training_sae.W_dec

    def aux_pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        out = self.training_sae.encode(x)
        pre = getattr(out, "pre_acts", None)
        return pre if pre is not None else out[2]

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        return self.training_sae(x).sae_out

    def aux_loss(self, x: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
        return self.training_sae(x, dead_mask=dead_mask).auxk_loss

    def reduce_aux_error(self, squared_error: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return squared_error.sum() / (x - x.mean(0)).pow(2).sum()


def _sparsify_adapter(training_sae: object) -> SparsifyAdapter | None:
    if not _from_package(training_sae, "sparsify"):
        return None
    cls = _import_optional("sparsify.sparse_coder", "SparseCoder")
    if cls is not None and isinstance(training_sae, cls):
        return SparsifyAdapter(training_sae)
    return None


def builtin_training_adapter(training_sae: object) -> AuxLossAdapterBase | None:
    """The built-in adapter for ``training_sae``, or ``None`` when no built-in one applies."""
    adapter: AuxLossAdapterBase | None = _sae_lens_adapter(training_sae)
    return adapter if adapter is not None else _sparsify_adapter(training_sae)
