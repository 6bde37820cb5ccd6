"""The configuration's one error type."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key."""
