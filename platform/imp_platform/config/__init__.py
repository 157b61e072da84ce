"""Typed configs: one pydantic model per concern, loaded from YAML with ``--set`` overrides."""

from imp_platform.config.base import (
    ConfigError,
    StrictModel,
    apply_overrides,
    dump_yaml,
    load_config,
    read_yaml,
    validate,
)

__all__ = ["ConfigError", "StrictModel", "apply_overrides", "dump_yaml", "load_config", "read_yaml", "validate"]
