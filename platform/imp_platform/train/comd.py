"""Rounds of distillation between two models (CoMD): the teacher teaches the student, then, with
``bidirectional``, the student's gains are distilled back into the teacher.

Every training is a real pretrain run (``trainer.pretrain``: Ray Train, final eval, PNG report)
of the base config with the role's tasks; round r continues each model from its previous checkpoint (``model.init_from``), with a
fresh optimizer and schedule. Each run ends with the held-out eval, whose head top-1 and ECE
are logged per round and model, into ``comd.json`` and ``comd.png``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imp_platform.config import validate
from imp_platform.config.distill import DistillConfig, DistillRole
from imp_platform.config.train import PretrainConfig, load_pretrain_config

log = logging.getLogger(__name__)


@dataclass
class Trained:
    checkpoint: str  # path or URI of the run's latest checkpoint
    metrics: dict[str, Any]  # the final held-out eval (scalars, confusion, reliability bins)
    wall_s: float
    report: str | None  # the run's PNG report (reliability diagram included)


def role_tasks(role: DistillRole, dc: DistillConfig, teacher: str | None = None,
               teacher_role: DistillRole | None = None) -> dict[str, Any]:
    """``role``'s tasks as plain data; with a ``teacher`` checkpoint (of ``teacher_role``), each
    classification objective becomes a distill objective seeing the teacher role's modalities."""
    tasks = {name: task.model_dump(mode="json", exclude_none=True) for name, task in role.tasks.items()}
    if teacher is None:
        return tasks
    heads = teacher_role.heads()
    objective = {"kind": "distill", "teacher": teacher, "teacher_modalities": list(heads), "teacher_heads": heads,
                 "temperature": dc.temperature, "alpha": dc.alpha, "features": dc.features}
    for task in tasks.values():
        task["objectives"] = [{**objective, "weight": o["weight"]} if o["kind"] == "classification" else o
                              for o in task["objectives"]]
    return tasks


def run_config(base: PretrainConfig, name: str, tasks: dict[str, Any], steps: int, *,
               model: Any = None, init_from: str | None = None) -> PretrainConfig:
    """``base`` with ``tasks`` in place of its own (no curriculum), ``steps`` steps, run ``name``,
    the role's ``model`` (None: the base's), started from ``init_from``."""
    data = base.model_dump(mode="json")
    data["tasks"] = tasks
    data["agd"]["curriculum"] = []
    data["run"].update(name=name, steps=steps)
    if model is not None:
        data["model"] = model.model_dump(mode="json")
    data["model"]["init_from"] = init_from
    return validate(PretrainConfig, data, source=f"run {name}")


def train(cfg: PretrainConfig) -> Trained:
    """One run through ``pretrain`` (data prepared first, eval and report at the end)."""
    from imp_platform.train.trainer import pretrain

    began = time.perf_counter()
    result = pretrain(cfg)
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name} kept no checkpoint (run.num_workers=0 keeps none): nothing to "
                           "distil from")
    return Trained(result.checkpoint, result.metrics, time.perf_counter() - began, result.report_path)


def head_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """The held-out head metrics of a run (``head_<task>_top1`` / ``_ece``)."""
    return {k: v for k, v in metrics.items() if k.startswith("head_") and isinstance(v, (int, float))}


def base_config(dc: DistillConfig) -> PretrainConfig:
    return load_pretrain_config(dc.base, dc.base_overrides)


def run_comd(dc: DistillConfig, out_dir: str | Path) -> dict[str, Any]:
    """All rounds; writes ``comd.json`` (a row per round and model) and ``comd.png`` into ``out_dir``."""
    base = base_config(dc)
    rows: list[dict[str, Any]] = []

    def step(role: str, rnd: int, tasks: dict[str, Any], steps: int, init_from: str | None) -> str:
        spec = dc.teacher if role == "teacher" else dc.student
        log.info("distill %s: round %d, %s (%d steps)", dc.name, rnd, role, steps)
        done = train(run_config(base, f"{dc.name}-{role}-r{rnd}", tasks, steps, model=spec.model, init_from=init_from))
        rows.append({"round": rnd, "model": role, "checkpoint": done.checkpoint, "report": done.report,
                     "wall_s": round(done.wall_s, 1), **head_scores(done.metrics)})
        return done.checkpoint

    teacher = dc.teacher.checkpoint or step("teacher", 0, role_tasks(dc.teacher, dc), dc.teacher_steps, None)
    student = dc.student.checkpoint
    for rnd in range(1, dc.rounds + 1):
        student = step("student", rnd, role_tasks(dc.student, dc, teacher, dc.teacher), dc.steps_per_round, student)
        if dc.bidirectional:
            teacher = step("teacher", rnd, role_tasks(dc.teacher, dc, student, dc.student), dc.steps_per_round,
                           teacher)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"name": dc.name, "rounds": dc.rounds, "bidirectional": dc.bidirectional, "rows": rows,
               "teacher": teacher, "student": student}
    (out_dir / "comd.json").write_text(json.dumps(payload, indent=2))
    write_rounds_plot(rows, out_dir / "comd.png", title=f"{dc.name}: {dc.rounds} round(s)"
                      + (", bidirectional" if dc.bidirectional else ""))
    return payload


def write_rounds_plot(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    """Head top-1 and ECE of each model against the round (round 0: the teacher's first training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, suffix, label in ((axes[0], "_top1", "held-out top-1"), (axes[1], "_ece", "ECE (15 bins)")):
        series: dict[str, tuple[list[int], list[float]]] = {}
        for row in rows:
            for key, value in row.items():
                if key.startswith("head_") and key.endswith(suffix):
                    xs, ys = series.setdefault(f"{row['model']} {key[5:-len(suffix)]}", ([], []))
                    xs.append(row["round"])
                    ys.append(value)
        for name, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, marker="o", label=name)
        ax.set(xlabel="round", ylabel=label, title=label, xticks=sorted({row["round"] for row in rows}))
        if series:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
