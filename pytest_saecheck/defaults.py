"""Defaults shared by the engine, the plugin and the report. Imports nothing (the plugin loads it at start-up)."""

DEFAULT_N_TOKENS = 16_384
"""Tokens evaluated per SAE unless the ``n_tokens`` setting says otherwise."""

DEFAULT_BATCH_SIZE = 16
"""Sequences per forward pass unless the ``batch_size`` setting (or argument) says otherwise."""

DEFAULT_CONTEXT_SIZE = 128
"""Tokens per evaluated sequence when neither the settings nor the SAE's config (``context_size``) give one."""

INTERVAL_LEVEL = 0.95
"""The confidence level of every interval the plugin computes or shows unless told otherwise."""

WEIGHT_BUDGET_MIB = 2048
"""MiB of a cross-layer transcoder's weights kept in memory through a pass unless the ``weight_budget_mib`` setting
says otherwise; a larger CLT is streamed per layer (``pytest_saecheck.clt.WeightCache``)."""
