"""Typed config of a pretraining run: data, model, tasks, optimizer, schedule, AGD, run, eval.

One YAML file (``jobs/configs/pretrain.yaml``) describes a whole run, so a checkpoint that
carries this config can be re-evaluated or resumed without any other input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from imp_platform.config.base import ConfigError, StrictModel, load_config
from imp_platform.data import modalities as registry


def _known_modality(name: str) -> str:
    return registry.modality(name).name  # a clear error for an unknown name


# An encoder modality (``modalities.MODALITIES``: video, image, audio_mel, audio_wave, text, or a registered one).
Modality = Annotated[str, AfterValidator(_known_modality)]


class SynthSpec(StrictModel):
    """Moving-digits shards to write when the processed data is missing (the embedded default)."""

    train_samples: int = Field(2000, gt=0)
    test_samples: int = Field(300, gt=0)
    shards: int = Field(4, gt=0)
    seed: int = 0


class DataConfig(StrictModel):
    """Where the processed splits live; optionally how to make them (synth + preprocess)."""

    root: str = "runs/demo/data"
    pipeline: str = "pipelines/moving_digits.yaml"
    train_split: str = "train"
    eval_split: str = "test"
    synth: SynthSpec | None = Field(default_factory=SynthSpec)
    tokenizer: str | None = None  # tokenizer.json for eval prompts; None = ROOT/raw/tokenizer.json (synth writes it)
    storage_options: dict[str, Any] | None = None

    @property
    def raw_root(self) -> str:
        """Where synth writes ``<split>/*.tar`` shards and ``tokenizer.json``."""
        return f"{self.root.rstrip('/')}/raw"

    def processed_path(self, split: str) -> str:
        """Processed dataset of one split: ``ROOT/processed/<split>`` (local or s3://)."""
        return f"{self.root.rstrip('/')}/processed/{split}"


class ModelSpec(StrictModel):
    """A preset plus field overrides (dotted keys into ModelConfig, e.g. ``moe.num_experts``)."""

    preset: str = "tiny"
    moe: bool = True
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Start from another model (imp_platform.model.init): a run checkpoint or an exported dir
    # (model.safetensors + config.json), local or s3:// (read with run.storage_options). The
    # run's own checkpoint still wins on resume. Keys whose shape differs, or that one side
    # lacks, are refused by name unless declared in ``reinit`` (name globs: they keep their fresh
    # init); ``init_strict: false`` tolerates keys only one side has. ``upcycle``: experts start
    # as the source's dense FFN, routers fresh. ``freeze``: name globs of parameters never updated.
    init_from: str | None = None
    init_strict: bool = True
    reinit: list[str] = Field(default_factory=list)
    upcycle: bool = False
    freeze: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _init_options_need_a_source(self) -> ModelSpec:
        if not self.init_from:
            for name in ("reinit", "upcycle"):
                if getattr(self, name):
                    raise ValueError(f"{name}: only applies with model.init_from")
        return self


class _Objective(StrictModel):
    """Fields every objective kind takes."""

    kind: str  # each kind's class narrows it to its Literal: the union's discriminator
    weight: float = Field(1.0, ge=0)

    @property
    def uses_labels(self) -> bool:
        """Whether the task's batches need the label column (classification; distill's CE part)."""
        return self.kind in ("classification", "distill")


class ContrastiveObjective(_Objective):
    """Symmetric InfoNCE between the task's two modalities (mil_nce: against every caption of a clip)."""

    kind: Literal["nce", "mil_nce"]


class ClassificationObjective(_Objective):
    """Cross-entropy of the task's class head on its first modality."""

    kind: Literal["classification"]


class DistillObjective(_Objective):
    """Learn from a frozen teacher: loss = alpha*T^2*KL + (1-alpha)*CE, or a feature distance."""

    kind: Literal["distill"]
    teacher: str  # a run checkpoint or an exported model dir, local or s3://
    teacher_modalities: list[Modality] = Field(min_length=1)  # their logits (or features) are averaged
    teacher_heads: dict[Modality, str] = Field(default_factory=dict)  # teacher head per modality ({} = its only head)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # the KL's share
    features: bool = False  # a cosine distance between common-space features instead of the KL
    # The teacher's fused logits stored in this processed column (``platform precompute-teacher``)
    # instead of a teacher forward per step; None = run the teacher.
    teacher_column: str | None = None

    @model_validator(mode="after")
    def _teacher_outputs(self) -> DistillObjective:
        if self.features and self.teacher_column:
            raise ValueError("teacher_column: stored teacher outputs are logits; features: true needs the teacher")
        if "text" in self.teacher_modalities:
            raise ValueError("teacher_modalities: text has no class logits or pooled clip features to distil")
        if unknown := set(self.teacher_heads) - set(self.teacher_modalities):
            raise ValueError(f"teacher_heads: {sorted(unknown)} not among teacher_modalities {self.teacher_modalities}")
        return self


class CaptionObjective(_Objective):
    """CoCa captioning cross-entropy of the decoder on the task's text."""

    kind: Literal["caption"]
    label_smoothing: float = Field(0.0, ge=0, lt=1)


OBJECTIVES: dict[str, type[_Objective]] = {
    kind: cls for cls in (ContrastiveObjective, ClassificationObjective, DistillObjective, CaptionObjective)
    for kind in get_args(cls.model_fields["kind"].annotation)}


def _objective_fields(data: Any) -> Any:
    """Before the union picks a class by ``kind``: null means unset (the flat objective spec that
    checkpoints saved before the split wrote every kind's field, null where unused), and a field of
    another kind is refused naming the kind that takes it."""
    if not isinstance(data, dict) or data.get("kind") not in OBJECTIVES:
        return data
    data = {k: v for k, v in data.items() if v is not None}
    own = OBJECTIVES[data["kind"]].model_fields
    for key in data:
        owners = sorted({k for k, cls in OBJECTIVES.items() if key in cls.model_fields} - {data["kind"]})
        if key not in own and owners:
            raise ValueError(f"{key}: only a {' or '.join(owners)} objective takes it (this one is {data['kind']})")
    return data


ObjectiveSpec = Annotated[
    Annotated[ContrastiveObjective | ClassificationObjective | DistillObjective | CaptionObjective,
              Field(discriminator="kind")],
    BeforeValidator(_objective_fields)]


class TaskConfig(StrictModel):
    """One (data, objective) pair that AGD schedules as a whole optimizer step."""

    split: str = "train"
    modalities: list[Modality] = Field(min_length=1, max_length=2)
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    label: Literal["label"] = "label"  # the processed column of class ids (-1 = unlabelled)
    num_classes: int | None = Field(None, gt=1)  # None = the dataset's class count (its manifest or pipeline YAML)
    buckets: list[str] | None = None  # None = every bucket of the manifest
    token_budget: int = Field(4096, gt=0)
    # The recipe's tokens per optimizer step over all workers (None = token_budget per worker):
    # each worker's micro-batch follows from the worker count, token_budget caps it, and the
    # rest is gradient accumulation, so a recipe means the same on 1 or 64 workers.
    global_token_budget: int | None = Field(None, gt=0)
    # DropToken share of each modality's tokens: one rate for every non-text modality, or per
    # modality ({video: 0.75, audio_mel: 0.5}; unnamed ones keep all). Text is never dropped.
    drop_token: float | dict[Modality, float] = 0.0
    weight: float = Field(1.0, ge=0)
    interval: int | None = Field(None, gt=0)  # round-robin period; None -> 1/weight
    # Share of the split's samples whose label this task sees (semi-supervised runs): chosen by a
    # hash of the sample key, so the same samples in every step, run and worker count; the others
    # train as unlabelled (-1: no CE, a distill objective's KL still counts them).
    labelled_fraction: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _objectives_fit_modalities(self) -> TaskConfig:
        for obj in self.objectives:
            if obj.kind in ("nce", "mil_nce") and len(self.modalities) != 2:
                raise ValueError(f"{obj.kind} needs exactly two modalities, got {self.modalities}")
            if obj.uses_labels and self.modalities[0] == "text":
                raise ValueError(f"{obj.kind} runs on the first modality, which must not be text")
            if obj.kind == "caption" and (len(self.modalities) != 2 or self.modalities[1] != "text"
                                          or self.modalities[0] == "text"):
                raise ValueError(f"caption needs modalities [<{'|'.join(registry.media())}>, text], got {self.modalities}")
        return self

    @field_validator("drop_token")
    @classmethod
    def _rates_in_range(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        rates = value.values() if isinstance(value, dict) else [value]
        if not all(0 <= rate < 1 for rate in rates):
            raise ValueError(f"DropToken rates must be in [0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _drop_rates_name_task_modalities(self) -> TaskConfig:
        for modality in self.drop_token if isinstance(self.drop_token, dict) else {}:
            if modality not in self.modalities:
                raise ValueError(f"drop_token.{modality}: not one of the task's modalities {self.modalities}")
            if modality == "text":
                raise ValueError("drop_token.text: text tokens are never dropped")
        return self

    def drop_rate(self, modality: str) -> float:
        """The DropToken rate of ``modality`` in this task (0 for text and for unnamed modalities)."""
        if modality == "text":
            return 0.0
        if isinstance(self.drop_token, dict):
            return self.drop_token.get(modality, 0.0)
        return self.drop_token

    @property
    def rate(self) -> float:
        return 1.0 / self.interval if self.interval else self.weight


class OptimConfig(StrictModel):
    """AdamW as in IMP (betas, eps 1e-7, wd, global-norm clip)."""

    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float | None = 1.0


class ScheduleConfig(StrictModel):
    """Linear warmup then cosine to ``min_lr``."""

    warmup_steps: int = Field(20, ge=0)
    min_lr: float = Field(1e-6, ge=0)


class CurriculumStage(StrictModel):
    """From ``start`` on, these task weights replace the tasks' own (unnamed tasks get 0)."""

    start: int = Field(ge=0)
    weights: dict[str, float]


class AGDConfig(StrictModel):
    mode: Literal["random", "round_robin", "mixed"] = "random"
    seed: int = 0
    curriculum: list[CurriculumStage] = Field(default_factory=list)

    @field_validator("curriculum")
    @classmethod
    def _sorted(cls, stages: list[CurriculumStage]) -> list[CurriculumStage]:
        starts = [s.start for s in stages]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError(f"curriculum stage starts must be strictly increasing, got {starts}")
        return stages


_TIME_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def interval_seconds(text: str) -> float:
    """A wall-clock interval such as ``"10m"``, ``"90s"`` or ``"1.5h"`` in seconds (> 0)."""
    number, unit = text.strip()[:-1], text.strip()[-1:]
    try:
        seconds = float(number) * _TIME_UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"expected a step count or a time such as '10m', '90s' or '1h', got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"a time interval must be > 0, got {text!r}")
    return seconds


class RunConfig(StrictModel):
    name: str = "pretrain"
    storage_path: str = "runs/ray"
    storage_options: dict[str, Any] | None = None
    # A count (0 = Ray Train local mode: one process, no actors, no checkpoints kept) or an elastic
    # range [min, max]: the run starts on as many workers as the cluster holds (up to max), continues
    # on fewer (down to min) from its last checkpoint when a node goes, and grows back when capacity
    # returns (checked every ``elastic_resize_every``); sharded checkpoints reshard to the new count.
    num_workers: int | tuple[int, int] = 2
    elastic_resize_every: str = "60s"  # how often an elastic run looks for capacity to grow into
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = None  # None = max(1, floor(cpus_per_worker))
    use_gpu: bool = False
    steps: int = Field(400, gt=0)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)  # held-out eval interval (each eval also checkpoints)
    # Checkpoint + report interval, independent of eval: steps (200) or wall-clock time ("10m", "90s", "1h").
    checkpoint_every: int | str = 50
    max_nonfinite_skips: int = Field(10, gt=0)  # consecutive non-finite steps skipped before the run stops
    max_open_streams: int = Field(8, gt=0)  # per worker; the least recently used (task, bucket) stream closes
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(2, ge=-1)
    seed: int = 0
    tensorboard: bool = True
    shuffle_batches: int = Field(2, ge=1)  # rows shuffled together per stream, in batches (memory vs mixing)
    worker_env: dict[str, str] = Field(default_factory=dict)  # env vars of the train workers (e.g. NCCL_*)
    ray_num_cpus: int | None = 4  # logical CPUs for a locally started Ray (more than cores, see REFERENCE)

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_interval(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value <= 0:
                raise ValueError(f"checkpoint_every: a step count must be > 0, got {value}")
        else:
            interval_seconds(value)
        return value

    @property
    def checkpoint_steps(self) -> int | None:
        """The checkpoint interval in steps, or None when it is a wall-clock time."""
        return self.checkpoint_every if isinstance(self.checkpoint_every, int) else None

    @property
    def checkpoint_seconds(self) -> float | None:
        """The checkpoint interval in seconds, or None when it is a step count."""
        return None if isinstance(self.checkpoint_every, int) else interval_seconds(self.checkpoint_every)

    @field_validator("num_workers")
    @classmethod
    def _worker_count_or_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"a worker count must be >= 0, got {value}")
        elif not 1 <= value[0] <= value[1]:
            raise ValueError(f"an elastic range [min, max] needs 1 <= min <= max, got {list(value)}")
        return value

    @field_validator("elastic_resize_every")
    @classmethod
    def _resize_interval(cls, value: str) -> str:
        interval_seconds(value)
        return value

    @property
    def elastic(self) -> bool:
        """Whether ``num_workers`` is a [min, max] range (Ray Train's elastic scaling)."""
        return isinstance(self.num_workers, tuple)

    @property
    def max_workers(self) -> int:
        """The most workers the run uses (the count itself when fixed)."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def min_workers(self) -> int:
        """The fewest workers the run continues on (the count itself when fixed)."""
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers


class ParallelConfig(StrictModel):
    """How the model is spread over the workers (train/parallel.py applies it)."""

    # replicate: every worker holds the model, grads averaged after backward (fastest for tiny
    # models on CPU); fsdp: FSDP2, parameters, grads and optimizer state sharded per encoder block.
    data: Literal["replicate", "fsdp"] = "replicate"
    expert: int = Field(1, ge=1)  # expert-parallel group size (experts sharded over that many workers)
    activation_checkpointing: Literal["none", "block", "moe_only"] = "none"  # recompute in backward
    compile: bool = False  # torch.compile each encoder block
    # Write the DCP shards of a checkpoint in a background thread while training goes on; the
    # checkpoint is reported to Ray Train once written (at the next checkpoint, or at the end).
    async_checkpoint: bool = False

    @model_validator(mode="after")
    def _async_needs_shards(self) -> ParallelConfig:
        if self.async_checkpoint and self.data != "fsdp" and self.expert == 1:
            raise ValueError("async_checkpoint: only sharded checkpoints (data: fsdp or expert > 1) are written "
                             "asynchronously; a replicated one is a single safetensors file")
        return self


class EvalConfig(StrictModel):
    enabled: bool = True  # held-out eval at every eval_every and at the end
    max_samples: int | None = None  # None = the whole held-out split
    batch_size: int = Field(64, gt=0)
    report: bool = True


class PretrainConfig(StrictModel):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    tasks: dict[str, TaskConfig] = Field(min_length=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    agd: AGDConfig = Field(default_factory=AGDConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def with_absolute_paths(self) -> PretrainConfig:
        """Local relative paths made absolute (on the driver): Ray workers and Tune trials run in other directories.

        Every path the workers open: data root, pipeline, tokenizer, storage, ``model.init_from``
        and distill teachers; URLs stay as they are.
        """

        def fix(path: str | None) -> str | None:
            return path if path is None or "://" in path else os.path.abspath(path)

        data = self.data.model_copy(update={"root": fix(self.data.root), "pipeline": fix(self.data.pipeline),
                                            "tokenizer": fix(self.data.tokenizer)})
        tasks = {name: task.model_copy(update={"objectives": [
            o.model_copy(update={"teacher": fix(o.teacher)}) if isinstance(o, DistillObjective) else o
            for o in task.objectives]}) for name, task in self.tasks.items()}
        return self.model_copy(update={
            "data": data, "tasks": tasks,
            "model": self.model.model_copy(update={"init_from": fix(self.model.init_from)}),
            "run": self.run.model_copy(update={"storage_path": fix(self.run.storage_path)})})

    @field_validator("model", mode="before")
    @classmethod
    def _preset_name(cls, value: Any) -> Any:
        return {"preset": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _curriculum_names_tasks(self) -> PretrainConfig:
        for stage in self.agd.curriculum:
            unknown = set(stage.weights) - set(self.tasks)
            if unknown:
                raise ValueError(f"agd.curriculum stage at {stage.start} names unknown tasks {sorted(unknown)}")
        if self.run.elastic and self.parallel.expert > 1 and (self.run.min_workers % self.parallel.expert
                                                              or self.run.max_workers % self.parallel.expert):
            raise ValueError(f"run.num_workers: both ends of the elastic range {list(self.run.num_workers)} must be "
                             f"multiples of parallel.expert={self.parallel.expert}")
        if self.run.eval_every > self.run.steps:
            self.run.eval_every = self.run.steps
        if self.run.checkpoint_steps and self.run.checkpoint_steps > self.run.steps:
            self.run.checkpoint_every = self.run.steps
        return self


def default_config_path() -> Path:
    """``jobs/configs/pretrain.yaml`` of the working directory (ray job --working-dir), else of the repo."""
    local = Path("jobs/configs/pretrain.yaml")
    return local if local.exists() else Path(__file__).resolve().parents[3] / "jobs" / "configs" / "pretrain.yaml"


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Load a pretraining config (default: the embedded moving-digits run) with ``--set`` overrides."""
    path = Path(path) if path else default_config_path()
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    return load_config(PretrainConfig, path, overrides)
