"""Typed config of a Ray Tune sweep over pretraining configs (``jobs/mixing.yaml``).

A sweep names a base ``PretrainConfig`` and a search space whose keys are dotted paths into
it (``tasks.video_text.weight``, ``model.moe.num_experts``, ``optim.lr``) and whose values are
distributions written as one-key mappings (``{loguniform: [1e-4, 3e-3]}``). This module only
reads and types the sweep file (config/ imports nothing outside it); checking the keys against
the real base config, whose model part resolves through the model presets, is
``imp_platform.tune.values.load_sweep``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from imp_platform.config.base import StrictModel, apply_overrides, parse_override, read_yaml, validate
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
    """Population-based training: every ``perturbation_interval`` reports a trial in the bottom
    ``quantile_fraction`` restarts from a top trial's checkpoint (weights, optimizer, step) with that
    trial's values perturbed (x0.8 / x1.2, or resampled from the space with ``resample_probability``).
    ``model.*`` keys are not perturbed: the checkpoint fixes the model's shapes."""

    name: Literal["pbt"] = "pbt"
    perturbation_interval: int = Field(2, gt=0)  # in reports
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    # Synchronous: every trial pauses at each perturbation step until all are there, then the
    # bottom ones exploit; costs a restart per trial per step, but a small population always exploits.
    synch: bool = False


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
    # The held-out multi-task score (mean zero-shot top-1 and retrieval R@1, tune/report.py);
    # any metric the trials report works (val_loss with mode min, zeroshot_video_top1, ...).
    metric: str = "heldout_score"
    mode: Literal["min", "max"] = "max"
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
        if isinstance(self.scheduler, PbtScheduler) and self.search.name != "random":
            raise ValueError(f"search.name: pbt samples its population itself and takes no searcher "
                             f"({self.search.name!r}); use random")
        return self

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


def read_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read and type a sweep YAML (+ ``--set`` overrides; ``space.<key>=...`` adds or replaces a key)."""
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
    return sweep


def load_base(sweep: SweepConfig) -> PretrainConfig:
    """The base pretraining config of a sweep, with the sweep's overrides applied, paths absolute."""
    if sweep.base is None:
        base = load_pretrain_config(None, sweep.overrides)
    else:
        base = validate(PretrainConfig, apply_overrides(read_yaml(sweep.base), sweep.overrides), source=sweep.base)
    return base.with_absolute_paths()


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())
