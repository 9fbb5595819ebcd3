"""Exceptions raised by pytest-saecheck. Every one names the problem and the fix.

This module imports nothing heavy: the pytest plugin imports it at start-up.
"""

from __future__ import annotations


class SAECheckError(Exception):
    """Base class of every error pytest-saecheck raises on bad input or bad state."""


class ConfigError(SAECheckError, ValueError):
    """A setting (marker key, option, ini value, SAE config) is malformed or unknown."""


class HookNotFoundError(SAECheckError, KeyError):
    """The SAE's hook name does not exist in the model."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class NoFaithfulPointError(HookNotFoundError):
    """The dictionary's own record names a tensor that the chosen model backend has no point at (e.g. a norm's
    output with its gain applied, on a ``HookedTransformer``); the message names the backend that has one.
    Never answered with a different tensor of the same width."""


class ShapeMismatchError(SAECheckError, ValueError):
    """A width or shape disagrees (SAE d_in vs. the hook's width, tokens not 2-D, ...)."""


class EmptyTokenSetError(SAECheckError, ValueError):
    """No token position is left to evaluate after the token policy is applied."""


class NonFiniteError(SAECheckError, FloatingPointError):
    """NaN or inf where a finite number is required (SAE weights, SAE output, a metric)."""


class DegenerateActivationsError(SAECheckError, ValueError):
    """The activations have zero variance, so variance-normalised metrics are undefined."""


class LoadError(SAECheckError, RuntimeError):
    """A model, SAE or token source could not be loaded (not found, not available offline, ...)."""


class WeightsUnavailableError(LoadError):
    """Weights or data are not on this machine and cannot be downloaded (offline, no network, not cached)."""


class TrainingCheckError(SAECheckError, RuntimeError):
    """A training implementation could not be checked (unsupported class, missing adapter, ...)."""


class UnsupportedDictionaryError(SAECheckError, TypeError):
    """The dictionary cannot be spliced faithfully (a temporal SAE, a cross-layer transcoder with summed
    decoders, a transcoder that does not say where it writes), so it is refused instead of scored."""


class ModelStateError(SAECheckError, RuntimeError):
    """The model is in a state the engine cannot measure (SAEs attached, a TransformerBridge, ...)."""


class SAECheckWarning(UserWarning):
    """A result is usable but something about it deserves a look (normalisation estimated, hooks on the model,
    an activation scale far from what the SAE expects)."""
