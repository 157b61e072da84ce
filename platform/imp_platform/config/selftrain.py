"""Typed config of ``platform selftrain`` (Video-STaR): grow a labelled seed split with the model's
own captions and labels on an unlabelled split, round after round.

Data, optimizer, run and eval come from one pretrain YAML (the ``base``); the self-training
config names the two raw splits under its ``data.root`` (``ROOT/raw/<split>``), the tasks to
train (a caption objective among them: kept samples carry generated captions), which of the
model's predictions gives the kept label, and the filter that decides what is kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from imp_platform.config.base import ConfigError, StrictModel, load_config
from imp_platform.config.train import CurriculumStage, ModelSpec, TaskConfig
from imp_platform.data import modalities as registry


def is_prediction(column: str) -> bool:
    """An infer output with a class and a score: zero-shot of a non-text modality towards text, or a classification head."""
    return column in {f"zeroshot_{m}" for m in registry.media()} or re.fullmatch(r"head_\w+", column) is not None


class KeepFilter(StrictModel):
    """When a sample of the unlabelled split is kept; the weak label is the split's label column
    (-1: none, which fails the two checks that need one)."""

    caption_names_label: bool = True  # Video-STaR's label verification: the weak label's class name is a caption word
    class_agrees: bool = False  # the predicted class equals the weak label
    min_score: float | None = Field(None, ge=0.0, le=1.0)  # the predicted class's probability at least this
    combine: Literal["all", "any"] = "all"  # every enabled check must pass, or one is enough

    @model_validator(mode="after")
    def _something_checked(self) -> KeepFilter:
        if not (self.caption_names_label or self.class_agrees or self.min_score is not None):
            raise ValueError("keep: enable at least one check (caption_names_label, class_agrees, min_score)")
        return self


class SelfTrainConfig(StrictModel):
    name: str = "selftrain"
    base: str | None = None  # pretrain YAML for data, optim, run, eval (None: the embedded jobs/configs/pretrain.yaml)
    base_overrides: list[str] = Field(default_factory=list)  # ``--set`` style, applied to the base
    model: ModelSpec | None = None  # None: the base's model
    tasks: dict[str, TaskConfig] | None = None  # None: the base's tasks; they train on seed (+ kept) data
    seed_split: str = "seed"  # labelled raw shards in ROOT/raw/<seed_split>
    unlabeled_split: str = "unlabeled"  # raw shards whose labels only the filter sees (weak labels, hidden truth)
    checkpoint: str | None = None  # round 0's model as is; None: round 0 trains on the seed split from scratch
    rounds: int = Field(2, ge=1)  # self-training rounds after round 0
    round0_steps: int = Field(300, gt=0)
    # Round 0's AGD stages over ``tasks`` (fine-tuning rounds run the tasks at their own rates).
    round0_curriculum: list[CurriculumStage] = Field(default_factory=list)
    steps_per_round: int = Field(150, gt=0)  # each round fine-tunes the previous round's model this long
    predict: str = "zeroshot_video"  # infer output whose class is the kept label: zeroshot_<modality> or head_<task>
    keep: KeepFilter = Field(default_factory=KeepFilter)
    heldout_metric: str = "zeroshot_video_top1"  # the held-out eval's figure logged as heldout_top1
    infer_batch_size: int = Field(32, ge=1)
    caption_max_len: int = Field(12, ge=1)
    samples_per_shard: int = Field(256, ge=1)  # kept samples per written tar shard

    @model_validator(mode="after")
    def _consistent(self) -> SelfTrainConfig:
        if not is_prediction(self.predict):
            raise ValueError(f"predict: {self.predict!r} is not zeroshot_<modality> or head_<task>")
        if self.seed_split == self.unlabeled_split:
            raise ValueError(f"seed_split and unlabeled_split are both {self.seed_split!r}")
        if self.round0_curriculum and self.tasks is None:
            raise ValueError("round0_curriculum: set tasks too (the base's tasks keep the base's curriculum)")
        if self.tasks is not None:
            if not any(o.kind == "caption" for t in self.tasks.values() for o in t.objectives):
                raise ValueError("tasks: no caption objective: kept samples carry the model's captions, so the "
                                 "model needs a text decoder")
            unknown = {t for stage in self.round0_curriculum for t in stage.weights} - set(self.tasks)
            if unknown:
                raise ValueError(f"round0_curriculum names unknown tasks {sorted(unknown)}")
            if self.predict.startswith("head_") and self.predict[5:] not in self.tasks:
                raise ValueError(f"predict: {self.predict!r} names no task of tasks ({sorted(self.tasks)})")
        return self

    @property
    def prediction_what(self) -> str:
        """The infer output (``--what``) that yields ``predict``."""
        return "zeroshot" if self.predict.startswith("zeroshot_") else "classify"


def load_selftrain_config(path: str | Path, overrides: list[str] | None = None) -> SelfTrainConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"selftrain config not found: {path}")
    return load_config(SelfTrainConfig, path, overrides)
