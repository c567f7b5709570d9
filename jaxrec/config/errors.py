"""The one error type of configuration problems."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message names the source (file or command line) and the key."""


def config_error(source: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
