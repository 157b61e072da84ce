"""Typed-config plumbing shared by every config section.

Configuration flows one way: YAML file -> ``--set a.b=c`` overrides -> pydantic model.
Every error names the file and the dotted key, so a user can fix the YAML without
reading a traceback.

Credentials never leave a process in clear: any credential-looking key (``secret``,
``password``, ``token``, ``aws_*``..., and ``key`` inside ``storage_options`` / ``worker_env`` /
``client_kwargs``) is written as ``***`` by ``dump_yaml`` and ``redact``, and validation errors
do not echo its value. Keys belong in the environment (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, which s3fs reads), a Kubernetes Secret mounted as those variables,
or IRSA, not in a config file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)

REDACTED = "***"
_SECRET_WORDS = {"secret", "password", "passwd", "credential", "credentials", "auth", "signature"}
# "token" alone, or after one of these words, is a credential; other tokens are model tokens
# (a task's ``drop_token`` rate, ``token_budget``).
_TOKEN_KINDS = {"session", "access", "auth", "api", "bearer", "refresh", "id", "security", "oauth"}
_SECRET_SCOPES = {"storage_options", "worker_env", "client_kwargs", "config_kwargs", "env_vars", "env"}
_WORD = re.compile(r"[^a-z0-9]+")


def is_secret(path: Sequence[Any]) -> bool:
    """Whether the value at this key path looks like a credential.

    Everywhere: a name that is or ends in a secret word (``db_password``), is ``token`` or ends
    in a credential kind of token (``session_token``, not ``drop_token``), contains ``secret``
    or starts with ``aws_``. Inside a
    storage/env mapping also ``key`` and any ``*_key`` / ``*_id`` (s3fs's ``key``, ``access_key_id``).
    """
    words = [w for w in _WORD.split(str(path[-1]).lower()) if w] if path else []
    if not words:
        return False
    if words[-1] in _SECRET_WORDS or "secret" in words or "password" in words or words[0] == "aws":
        return True
    scoped = any(str(p).lower() in _SECRET_SCOPES for p in path[:-1])
    if words[-1] == "token":
        return scoped or len(words) == 1 or words[-2] in _TOKEN_KINDS
    return scoped and words[-1] in {"key", "id"}


def redact(data: Any, path: tuple[Any, ...] = ()) -> Any:
    """A copy of a config mapping (or any nested value) with every credential value replaced by ``***``."""
    if isinstance(data, dict):
        return {k: REDACTED if is_secret((*path, k)) and v not in (None, "") else redact(v, (*path, k))
                for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v, path) for v in data]
    return data


def split_secrets(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``data`` redacted, ``{dotted.key: value}`` of what was redacted), to ship the two apart."""
    secrets: dict[str, Any] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if is_secret((*path, key)) and value not in (None, ""):
                    secrets[".".join((*path, str(key)))] = value
                else:
                    walk(value, (*path, str(key)))

    walk(data, ())
    return redact(data), secrets


def merge_secrets(data: dict[str, Any], secrets: dict[str, Any]) -> dict[str, Any]:
    """Put values taken by ``split_secrets`` back at their dotted keys (in place); returns ``data``."""
    for dotted, value in secrets.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    return data


def drop_redacted(data: Any) -> Any:
    """A copy without ``***`` values, so a reloaded config falls back to credentials from the environment."""
    if isinstance(data, dict):
        return {k: drop_redacted(v) for k, v in data.items() if v != REDACTED}
    if isinstance(data, list):
        return [drop_redacted(v) for v in data]
    return data


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names where."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            loc = tuple(item["loc"])
            hidden = any(str(p).lower() in _SECRET_SCOPES or is_secret(loc[:i]) for i, p in enumerate(loc, 1))
            shown = REDACTED if hidden else redact(item.get("input"), loc)  # a storage/env value may be a key
            lines.append(f"  {key}: {item['msg']} (got {shown!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-typed value (``3`` -> int, ``[1,2]`` -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config mapping (creating mappings only where none exist)."""
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {text!r}: {where} is a {type(child).__name__}, not a mapping")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def validate(cls: type[T], data: dict[str, Any], source: str = "<config>") -> T:
    """Build a typed config from a mapping; a ValidationError becomes a ConfigError naming each key."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """YAML file + overrides -> typed config of class ``cls``."""
    data = apply_overrides(drop_redacted(read_yaml(path)), overrides)  # a saved config's *** = "from the env"
    return validate(cls, data, source=str(path))


def dump_yaml(config: BaseModel, path: str | Path) -> Path:
    """Write a config back to YAML, credentials as ``***`` (round-trips through ``load_config``;
    ``drop_redacted`` turns them back into "from the environment")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False))
    return path
