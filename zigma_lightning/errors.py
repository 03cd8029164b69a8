"""Errors the command reports in one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work; reported in one line naming the key."""
