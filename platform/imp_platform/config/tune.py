"""Typed config of a Ray Tune sweep over pretraining configs (``jobs/mixing.yaml``).

A sweep names a base ``PretrainConfig`` and a search space whose keys are dotted paths into
it (``tasks.video_text.weight``, ``model.moe.num_experts``, ``optim.lr``) and whose values are
distributions written as one-key mappings (``{loguniform: [1e-4, 3e-3]}``). Paths are checked
against the *real* base config and every distribution's extreme values are validated as full
``PretrainConfig`` objects, so a typo or an out-of-range bound fails before any trial starts,
with a message naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from imp_platform.config.base import ConfigError, StrictModel, apply_overrides, parse_override, read_yaml, validate
from imp_platform.config.model import ModelConfig
from imp_platform.config.train import PretrainConfig, load_pretrain_config

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class _Range(StrictModel):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    def probe_values(self) -> list[Any]:
        return [self.low, self.high]


class Uniform(_Range):
    kind: Literal["uniform"] = "uniform"


class LogUniform(_Range):
    kind: Literal["loguniform"] = "loguniform"

    @field_validator("low")
    @classmethod
    def _positive(cls, low: float) -> float:
        if low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {low}")
        return low


class RandInt(StrictModel):
    """Integers in ``[low, high)`` (upper bound exclusive, as ``tune.randint``)."""

    kind: Literal["randint"] = "randint"
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self) -> RandInt:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high}); high is exclusive")
        return self

    def probe_values(self) -> list[Any]:
        return [self.low, self.high - 1]


class _Values(StrictModel):
    values: list[Any] = Field(min_length=1)

    def probe_values(self) -> list[Any]:
        return list(self.values)


class Choice(_Values):
    kind: Literal["choice"] = "choice"


class Grid(_Values):
    kind: Literal["grid"] = "grid"


Distribution = Annotated[Union[Uniform, LogUniform, RandInt, Choice, Grid], Field(discriminator="kind")]


def _expand_distribution(key: str, spec: Any) -> dict[str, Any]:
    """``{uniform: [0.1, 1]}`` -> ``{"kind": "uniform", "low": 0.1, "high": 1}`` (errors name the key)."""
    example = "e.g. {uniform: [0.1, 1.0]} or {choice: [2, 4, 8]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"space.{key}: must be a one-key mapping {{DIST: ARGS}} with DIST in {DISTRIBUTIONS}, {example}; got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        hint = f" (space keys are dotted paths: write '{key}.{kind}:')" if isinstance(args, dict) else ""
        raise ValueError(f"space.{key}: unknown distribution {kind!r}; use one of {DISTRIBUTIONS}{hint}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list):
            raise ValueError(f"space.{key}: {kind} takes a list of values, got {args!r}")
        return {"kind": kind, "values": args}
    if isinstance(args, dict):
        return {"kind": kind, **args}
    if not isinstance(args, list) or len(args) != 2:
        raise ValueError(f"space.{key}: {kind} takes [low, high], got {args!r}")
    return {"kind": kind, "low": args[0], "high": args[1]}


class AshaScheduler(StrictModel):
    """Asynchronous successive halving; time is counted in reports (one per eval interval)."""

    name: Literal["asha"] = "asha"
    grace_period: int = Field(1, gt=0)
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, gt=0)


class FifoScheduler(StrictModel):
    name: Literal["fifo"] = "fifo"


class PbtScheduler(StrictModel):
    """Population-based training; mutations are drawn from the same search space."""

    name: Literal["pbt"] = "pbt"
    perturbation_interval: int = Field(2, gt=0)  # in reports
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)


SchedulerConfig = Annotated[Union[AshaScheduler, FifoScheduler, PbtScheduler], Field(discriminator="name")]


class SearchConfig(StrictModel):
    name: Literal["random", "optuna"] = "random"
    seed: int | None = 0


class TrialResources(StrictModel):
    """What one trial's Train run takes; replaces ``run.num_workers`` / ``cpus_per_worker`` / ``use_gpu``."""

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False  # one GPU per worker, as Ray Train's ScalingConfig gives
    # The Tune trial itself only drives the Train run; a small share keeps it from taking a core.
    driver_cpus: float = Field(0.25, gt=0)


class SweepConfig(StrictModel):
    name: str = "mixing"
    base: str | None = None  # pretrain YAML, relative to the sweep file; None = the embedded default
    overrides: list[str] = Field(default_factory=list)  # --set style, applied to the base config
    space: dict[str, Distribution] = Field(min_length=1)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(1, gt=0)
    scheduler: SchedulerConfig = Field(default_factory=AshaScheduler)
    search: SearchConfig = Field(default_factory=SearchConfig)
    max_concurrent_trials: int = Field(2, gt=0)
    resources: TrialResources = Field(default_factory=TrialResources)
    steps: int = Field(gt=0)  # per-trial step budget (run.steps of every trial)
    storage_path: str = "runs/tune"  # local folder or s3://bucket/prefix
    storage_options: dict[str, Any] | None = None  # s3fs options (endpoint_url, key, secret)
    report_dir: str | None = None  # local folder for table/PNG/best YAML; None = <experiment>/report

    @field_validator("space", mode="before")
    @classmethod
    def _expand(cls, space: Any) -> Any:
        if not isinstance(space, dict):
            raise ValueError(f"space must map dotted config paths to distributions, got {type(space).__name__}")
        return {key: _expand_distribution(key, spec) for key, spec in space.items()}

    @field_validator("storage_path")
    @classmethod
    def _absolute_storage(cls, path: str) -> str:
        return _absolute(path)

    @model_validator(mode="after")
    def _search_fits_space(self) -> SweepConfig:
        grids = [key for key, dist in self.space.items() if isinstance(dist, Grid)]
        if grids and self.search.name != "random":
            raise ValueError(f"space.{grids[0]}: grid needs search 'random' ({self.search.name} cannot enumerate grids)")
        if isinstance(self.scheduler, PbtScheduler) and grids:
            raise ValueError(f"space.{grids[0]}: pbt mutates values and cannot use grid; use choice")
        return self

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, PretrainConfig]:
    """Read a sweep YAML (+ ``--set`` overrides), load its base config and check the space against it."""
    path = Path(path)
    data = read_yaml(path)
    plain = [text for text in overrides or [] if not text.startswith("space.")]
    for text in overrides or []:
        if text.startswith("space."):  # ``space.optim.lr={...}``: the rest of the key is one dotted path
            key, value = parse_override(text)
            data.setdefault("space", {})[".".join(key[1:])] = value
    sweep = validate(SweepConfig, apply_overrides(data, plain), source=str(path))
    if sweep.base is not None:
        sweep.base = str((path.parent / sweep.base).resolve())  # an absolute base stays as it is
    base = load_base(sweep)
    check_space(sweep, base, source=str(path))
    return sweep, base


def load_base(sweep: SweepConfig) -> PretrainConfig:
    """The base pretraining config of a sweep, with the sweep's overrides applied, paths absolute."""
    if sweep.base is None:
        base = load_pretrain_config(None, sweep.overrides)
    else:
        base = validate(PretrainConfig, apply_overrides(read_yaml(sweep.base), sweep.overrides), source=sweep.base)
    return with_absolute_paths(base)


def with_absolute_paths(base: PretrainConfig) -> PretrainConfig:
    """``base`` with its local data and storage paths absolute (trials run in their own directories)."""
    return apply_values(base, {"data.root": _absolute(base.data.root), "data.pipeline": _absolute(base.data.pipeline),
                               "run.storage_path": _absolute(base.run.storage_path)})


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


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
        parts = key.split(".")
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
    from imp_platform.train.tasks import resolve_model_config

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
        elif node is None:
            raise ConfigError(f"{source}: space.{key}: {where} is null in the base config; set it there first")
        else:
            raise ConfigError(f"{source}: space.{key}: {where} is a value ({type(node).__name__}), it has no key {part!r}")
    if isinstance(node, (BaseModel, dict)):
        raise ConfigError(f"{source}: space.{key}: is a whole section; sweep one of its values")
    return node
