"""The configuration pieces every layer may use: the error type, the check helper and the fields
every method config has. :mod:`pipeline.config` (the run's full schema and its validation) builds on
these and on the method registry; methods and models import from here, so nothing below the config
imports :mod:`pipeline.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key path."""


def require(cond: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``cond`` (for method / dataset validators)."""
    if not cond:
        raise ConfigError(f"config error at '{key}': {msg}")


@dataclass
class MethodConfig:
    """Fields every method has; methods subclass it with their own."""

    name: str = MISSING
    gamma: float = 1.0  # weight of the forget loss
    alpha: float = 1.0  # weight of the retain loss
