"""Dotted sweep keys into a ``PretrainConfig``: check them against the real base config, set them.

Every key must be a value path of the base config (``model.<ModelConfig path>`` goes through the
model spec's overrides and is checked against the *resolved* model) and every distribution's
extreme values must give a valid config, so a typo or an out-of-range bound fails before any
trial starts, with a message naming the key. List items are addressed by index
(``agd.curriculum.1.weights.video_text``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from imp_platform.config import ConfigError, validate
from imp_platform.config.model import ModelConfig
from imp_platform.config.train import PretrainConfig
from imp_platform.config.tune import LogUniform, SweepConfig, Uniform, load_base, read_sweep
from imp_platform.train.tasks import resolve_model_config


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, PretrainConfig]:
    """Read a sweep YAML (+ ``--set`` overrides), load its base config and check the space against it."""
    sweep = read_sweep(path, overrides)
    base = load_base(sweep)
    check_space(sweep, base, source=str(path))
    return sweep, base


def check_space(sweep: SweepConfig, base: PretrainConfig, source: str = "<sweep>") -> None:
    """Every key must be a value path of ``base`` and every distribution's extremes a valid config."""
    for key, dist in sweep.space.items():
        current = _check_path(base, key, source)
        if isinstance(dist, (Uniform, LogUniform)) and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(f"{source}: space.{key}: {dist.kind} samples floats but {key} is an integer; use randint or choice")
        for value in dist.probe_values():
            try:
                apply_values(base, {key: value})
            except ConfigError as exc:
                detail = str(exc).split("\n", 1)[-1].strip()
                raise ConfigError(f"{source}: space.{key}: value {value!r} is not valid here: {detail}") from None


def apply_values(base: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
    """A new config: ``base`` with each dotted path set to its value, validated as a whole."""
    data = base.model_dump(mode="json")
    for key, value in values.items():
        model_key = _model_override_key(key)
        if model_key is not None:
            data["model"].setdefault("overrides", {})[model_key] = value
            continue
        node = data
        parts = [int(part) if part.isdigit() else part for part in key.split(".")]  # list items by index
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    cfg = validate(PretrainConfig, data, source="sweep values")
    if any(_model_override_key(key) for key in values):
        _resolved_model(cfg)
    return cfg


def _model_override_key(key: str) -> str | None:
    """``model.moe.num_experts`` -> ``moe.num_experts`` when it addresses the ModelConfig, not ModelSpec.

    The train config keeps ``model`` as a preset plus dotted ``overrides`` into ``ModelConfig``;
    sweeping ``model.X`` for a ``ModelConfig`` field X goes through those overrides.
    """
    parts = key.split(".")
    if parts[0] != "model" or len(parts) < 2:
        return None
    spec_fields = PretrainConfig.model_fields["model"].annotation.model_fields  # type: ignore[union-attr]
    if len(parts) == 2 and parts[1] in spec_fields:
        return None
    return ".".join(parts[1:])


def _resolved_model(cfg: PretrainConfig) -> ModelConfig:
    """The ModelConfig a PretrainConfig's model spec resolves to (the train stream's resolution)."""
    try:
        return resolve_model_config(cfg)
    except ValueError as exc:  # an unknown preset
        raise ConfigError(f"model: {exc}") from None


def _check_path(base: PretrainConfig, key: str, source: str) -> Any:
    """The base value at ``key``; a ConfigError naming the key and the known keys if there is none."""
    model_key = _model_override_key(key)
    node: Any = _resolved_model(base) if model_key is not None else base
    parts = model_key.split(".") if model_key is not None else key.split(".")
    prefix = ["model"] if model_key is not None else []
    for depth, part in enumerate(parts):
        where = ".".join(prefix + parts[:depth]) or "<root>"
        if isinstance(node, BaseModel):
            known = list(type(node).model_fields)
            if part not in known:
                raise ConfigError(f"{source}: space.{key}: {where} has no key {part!r} (keys: {', '.join(known)})")
            node = getattr(node, part)
        elif isinstance(node, dict):
            if part not in node:
                raise ConfigError(f"{source}: space.{key}: {where} has no entry {part!r} (entries: {', '.join(map(str, node))})")
            node = node[part]
        elif isinstance(node, list):  # agd.curriculum.1.weights.video_text: list items by index
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: space.{key}: {where} is a list of {len(node)}; index it with 0-{len(node) - 1}")
            node = node[int(part)]
        elif node is None:
            raise ConfigError(f"{source}: space.{key}: {where} is null in the base config; set it there first")
        else:
            raise ConfigError(f"{source}: space.{key}: {where} is a value ({type(node).__name__}), it has no key {part!r}")
    if isinstance(node, (BaseModel, dict, list)):
        raise ConfigError(f"{source}: space.{key}: is a whole section; sweep one of its values")
    return node
