"""Defaults shared by the engine, the plugin and the report. Imports nothing (the plugin loads it at start-up)."""

DEFAULT_N_TOKENS = 16_384
"""Tokens evaluated per SAE unless the ``n_tokens`` setting says otherwise."""

DEFAULT_BATCH_SIZE = 16
"""Sequences per forward pass unless the ``batch_size`` setting (or argument) says otherwise."""

DEFAULT_CONTEXT_SIZE = 128
"""Tokens per evaluated sequence when neither the settings nor the SAE's config (``context_size``) give one."""

INTERVAL_LEVEL = 0.95
"""The confidence level of every interval the plugin computes or shows unless told otherwise."""
