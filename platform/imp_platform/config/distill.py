"""Typed config of ``platform distill`` (CoMD): a teacher and a student that teach each other over rounds.

Each role lists its own tasks (a classification task per modality it sees; other objectives are
kept as they are). When a role learns from the other, each of its classification objectives
becomes a ``distill`` objective whose teacher is the other role's latest checkpoint, seeing the
other role's modalities through its classification heads. Everything else (data, optimizer,
run, eval) comes from one pretrain YAML, the ``base``.
"""

from __future__ import annotations

from pathlib import Path
from pydantic import Field, model_validator

from imp_platform.config.base import ConfigError, StrictModel, load_config
from imp_platform.config.train import ModelSpec, TaskConfig


class DistillRole(StrictModel):
    """One of the two models: its tasks, its model (None = the base's), a trained checkpoint to start from."""

    tasks: dict[str, TaskConfig] = Field(min_length=1)
    model: ModelSpec | None = None
    # teacher: used as is in round 1 (no first training); student: initialises round 1.
    checkpoint: str | None = None

    def heads(self) -> dict[str, str]:
        """modality -> the classification head (task) that reads it; the first task per modality wins."""
        out: dict[str, str] = {}
        for name, task in self.tasks.items():
            if any(o.kind == "classification" for o in task.objectives):
                out.setdefault(task.modalities[0], name)
        return out


class DistillConfig(StrictModel):
    name: str = "comd"
    base: str | None = None  # pretrain YAML for data, optim, run, eval (None: the embedded jobs/configs/pretrain.yaml)
    base_overrides: list[str] = Field(default_factory=list)  # ``--set`` style, applied to the base
    rounds: int = Field(1, ge=1)
    bidirectional: bool = False  # CoMD: after the student learns from the teacher, the teacher learns back
    teacher_steps: int = Field(200, gt=0)  # the teacher's first training (when teacher.checkpoint is unset)
    steps_per_round: int = Field(100, gt=0)  # each role's training in each round
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    features: bool = False
    teacher: DistillRole
    student: DistillRole

    @model_validator(mode="after")
    def _roles_have_heads(self) -> DistillConfig:
        roles = {"teacher": self.teacher, "student": self.student}
        for role, spec in roles.items():
            if not spec.heads():
                raise ValueError(f"{role}.tasks: no classification task: distillation goes through class heads")
            for name, task in spec.tasks.items():
                if any(o.kind == "distill" for o in task.objectives):
                    raise ValueError(f"{role}.tasks.{name}: list classification objectives; rounds turn them into "
                                     "distill objectives")
        return self


def load_distill_config(path: str | Path, overrides: list[str] | None = None) -> DistillConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"distill config not found: {path}")
    return load_config(DistillConfig, path, overrides)
