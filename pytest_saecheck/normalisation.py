"""Activation normalisation: the scaling an SAE Lens training checkpoint expects its inputs to carry.

SAE Lens trains with ``normalize_activations="expected_average_only_in"`` by multiplying activations by
``sqrt(d_in) / E‖x‖`` (``ActivationScaler.estimate_scaling_factor``), and saves that factor as
``activation_scaler.json`` beside each checkpoint. At the end of training it folds the factor into the weights
and sets ``normalize_activations="none"``; a released SAE therefore needs nothing, but a checkpoint does. The
engine then feeds the SAE ``scale(x)`` and maps its output back with ``unscale``, exactly as SAE Lens'
``run_evals`` does with an ``ActivationScaler``, so every metric stays in the model's activation units.
(Other settings, ``constant_norm_rescale`` and ``layer_norm``, are applied inside the SAE's own ``encode`` and
``decode`` and need nothing here.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_saecheck.errors import ConfigError, LoadError, UnsupportedDictionaryError

ACTIVATION_SCALER_FILENAME = "activation_scaler.json"
"""SAE Lens' file name for a checkpoint's activation scaler (``sae_lens.constants.ACTIVATION_SCALER_CFG_FILENAME``)."""

EXPECTED_AVERAGE = "expected_average_only_in"
WHITENING = "covariance_whitening"

GIVEN, FROM_FILE, ESTIMATED, NOT_NEEDED = "given", "activation_scaler.json", "estimated", "not needed"


@dataclass(frozen=True)
class Normalisation:
    """The input scaling applied around the SAE: ``x ↦ scaling_factor · x`` in, the inverse out.

    ``source`` says where the factor came from: ``"given"``, ``"activation_scaler.json"``, ``"estimated"``
    (sqrt(d_in) / E‖x‖ over the evaluated positions, as SAE Lens' ActivationsStore estimates it), or
    ``"not needed"`` (``scaling_factor`` is None).
    """

    scaling_factor: float | None
    source: str
    whitening: Any = None  # sae_lens ActivationWhitening, read from a checkpoint

    @property
    def active(self) -> bool:
        return self.scaling_factor is not None or self.whitening is not None

    def scaler(self) -> Any:
        """An SAE Lens ``ActivationScaler`` with this factor (and whitening)."""
        from sae_lens.training.activation_scaler import ActivationScaler

        scaler = ActivationScaler(scaling_factor=self.scaling_factor)
        if self.whitening is not None:
            scaler.whitening = self.whitening
        return scaler

    def to_dict(self) -> dict[str, Any]:
        return {
            "scaling_factor": self.scaling_factor,
            "source": self.source,
            "whitening": self.whitening is not None,
        }


NONE = Normalisation(None, NOT_NEEDED)


def read_activation_scaler(directory: str | Path) -> Normalisation | None:
    """The normalisation saved beside a checkpoint (``activation_scaler.json``), or None when there is none.

    Raises :class:`LoadError` when the file exists but cannot be read.
    """
    path = Path(directory) / ACTIVATION_SCALER_FILENAME
    if not path.is_file():
        return None
    try:
        factor = json.loads(path.read_text()).get("scaling_factor")
    except (OSError, ValueError, AttributeError) as error:
        raise LoadError(f"could not read the activation scaler {path}: {error}") from None
    whitening = None
    try:
        from sae_lens.training.activation_scaler import ActivationScaler

        scaler = ActivationScaler()
        scaler.load(str(path))
        whitening = getattr(scaler, "whitening", None)
    except Exception as error:  # an older SAE Lens without whitening support reads the factor only
        if (path.parent / "activation_whitening.safetensors").is_file():
            raise LoadError(f"could not read the activation whitening beside {path}: {error}") from None
    if factor is not None and not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise LoadError(f"{path} holds scaling_factor={factor!r}; expected a positive finite number or null")
    return Normalisation(float(factor) if factor is not None else None, FROM_FILE, whitening)


ATTACHED = "saecheck_normalisation"
"""The attribute :func:`attach_activation_scaler` sets on an SAE loaded from a checkpoint directory."""


def attach_activation_scaler(sae: Any, directory: str | Path) -> None:
    """Carry the ``activation_scaler.json`` beside a checkpoint on the SAE loaded from it (nothing when there is
    none), so that ``evaluate(model, load_sae(dir), tokens)`` uses the training factor, as the plugin does.

    Raises :class:`LoadError` when the file exists but cannot be read.
    """
    found = read_activation_scaler(directory)
    if found is not None:
        setattr(sae, ATTACHED, found)


def attached_normalisation(sae: Any) -> Normalisation | None:
    """The normalisation :func:`attach_activation_scaler` put on ``sae``, or None."""
    value = getattr(sae, ATTACHED, None)
    return value if isinstance(value, Normalisation) else None


def as_normalisation(value: object) -> Normalisation | None:
    """``evaluate(activation_scaler=...)``: None, a positive factor, an SAE Lens ``ActivationScaler``, a
    :class:`Normalisation`, or a checkpoint directory holding ``activation_scaler.json``."""
    if value is None or isinstance(value, Normalisation):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"activation_scaler must be a positive number, got {value!r}")
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"activation_scaler must be a positive finite number, got {value!r}")
        return Normalisation(float(value), GIVEN)
    if isinstance(value, (str, Path)):
        path = Path(value)
        found = read_activation_scaler(path.parent if path.name == ACTIVATION_SCALER_FILENAME else path)
        if found is None:
            raise ConfigError(f"no {ACTIVATION_SCALER_FILENAME} in {str(Path(value).resolve())!r}")
        return found
    if hasattr(value, "scaling_factor"):
        factor = value.scaling_factor
        return Normalisation(
            float(factor) if factor is not None else None, GIVEN, getattr(value, "whitening", None)
        )
    raise ConfigError(
        "activation_scaler must be None, a positive number, an SAE Lens ActivationScaler or a checkpoint "
        f"directory, got {type(value).__name__}"
    )


def needs_estimate(mode: str, given: Normalisation | None) -> bool:
    """True when the SAE expects a scaling factor and none was given: the engine estimates one.

    Raises :class:`UnsupportedDictionaryError` for whitening checkpoints without their statistics, which cannot
    be estimated faithfully from evaluation tokens.
    """
    if given is not None and given.active:
        return False
    if mode == WHITENING:
        raise UnsupportedDictionaryError(
            "the SAE was trained with normalize_activations='covariance_whitening' and its whitening statistics "
            f"were not found: evaluate the checkpoint directory (with its {ACTIVATION_SCALER_FILENAME} and "
            "activation_whitening.safetensors), pass activation_scaler=, or fold them with "
            "sae.fold_activation_whitening(...) first"
        )
    return mode == EXPECTED_AVERAGE


def estimated(d_in: int, mean_norm: float) -> Normalisation:
    """SAE Lens' estimate ``sqrt(d_in) / E‖x‖`` (``ActivationScaler.estimate_scaling_factor``)."""
    if not (math.isfinite(mean_norm) and mean_norm > 0):
        raise ConfigError(
            f"cannot estimate the activation scaling factor: the mean activation norm is {mean_norm!r}"
        )
    return Normalisation(math.sqrt(d_in) / mean_norm, ESTIMATED)
