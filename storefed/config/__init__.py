"""StoreFed's typed configuration: schema (dataclasses), hydra composition and range checks."""

from storefed.config.compose import compose
from storefed.config.validate import ConfigError

__all__ = ["ConfigError", "compose"]
