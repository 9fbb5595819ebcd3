"""Defaults shared by the engine, the plugin and the report. Imports nothing (the plugin loads it at start-up)."""

INTERVAL_LEVEL = 0.95
"""The confidence level of every interval the plugin computes or shows unless told otherwise."""
