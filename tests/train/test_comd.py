"""``platform distill`` (CoMD): the shipped YAML validates, rounds turn classification into distillation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from imp_platform.cli import app
from imp_platform.config import ConfigError
from imp_platform.config.distill import load_distill_config
from imp_platform.train.comd import base_config, role_tasks, run_config, write_rounds_plot
from imp_platform.train.tasks import task_columns

SHIPPED = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "distill.yaml"
REDUCED = ["teacher_steps=2", "steps_per_round=2", "rounds=1"]


def test_shipped_config_builds_every_round_run_with_sizes_reduced() -> None:
    dc = load_distill_config(SHIPPED, REDUCED)
    base = base_config(dc)
    first = run_config(base, "t0", role_tasks(dc.teacher, dc), dc.teacher_steps, model=dc.teacher.model)
    assert first.run.steps == 2 and first.agd.curriculum == [] and first.model.init_from is None
    assert [o.kind for t in first.tasks.values() for o in t.objectives] == ["classification", "classification"]

    student = run_config(base, "s1", role_tasks(dc.student, dc, "/ckpt/teacher", dc.teacher), dc.steps_per_round,
                         model=dc.student.model, init_from="/ckpt/student")
    (objective,) = student.tasks["video_cls"].objectives
    assert (objective.kind, objective.teacher, objective.teacher_heads) == (
        "distill", "/ckpt/teacher", {"video": "video_cls", "audio_mel": "audio_cls"})
    assert student.model.init_from == "/ckpt/student" and student.model.overrides == {"depth": 2}
    assert task_columns(student.tasks["video_cls"]) == ["video", "audio_mel", "label"]

    back = run_config(base, "t1", role_tasks(dc.teacher, dc, "/ckpt/student", dc.student), 2, init_from="/ckpt/t")
    audio = back.tasks["audio_cls"].objectives[0]
    assert audio.teacher_modalities == ["video"] and audio.teacher_heads == {"video": "video_cls"}
    assert task_columns(back.tasks["audio_cls"]) == ["audio_mel", "video", "label"]


def test_roles_need_classification_tasks_and_list_no_distill(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="student.tasks: no classification task"):
        load_distill_config(SHIPPED, ["student.tasks.video_cls.objectives=[{kind: nce}]",
                                      "student.tasks.video_cls.modalities=[video, text]"])
    with pytest.raises(ConfigError, match="teacher.tasks.audio_cls: list classification objectives"):
        load_distill_config(SHIPPED, ["teacher.tasks.audio_cls.objectives=[{kind: distill, teacher: x, "
                                      "teacher_modalities: [video]}]"])
    with pytest.raises(ConfigError, match="not found"):
        load_distill_config(tmp_path / "missing.yaml")


def test_rounds_plot(tmp_path: Path) -> None:
    rows = [{"round": 0, "model": "teacher", "head_video_cls_top1": 0.5, "head_video_cls_ece": 0.2},
            {"round": 1, "model": "student", "head_video_cls_top1": 0.6, "head_video_cls_ece": 0.1},
            {"round": 1, "model": "teacher", "head_video_cls_top1": 0.7, "head_video_cls_ece": 0.05}]
    out = write_rounds_plot(rows, tmp_path / "comd.png", "t")
    assert Image.open(out).size[0] > 1000


def test_cli_names_a_bad_key_and_exits_2() -> None:
    result = CliRunner().invoke(app, ["distill", str(SHIPPED), "--rounds", "0"])
    assert result.exit_code == 2 and "rounds" in result.output


@pytest.mark.slow
def test_a_bidirectional_round_runs_end_to_end(tiny_overrides: list[str], tmp_path: Path) -> None:
    """A real round (1 worker, 2 steps per run): roles alternate, every run leaves a model and its
    held-out head metrics, and the teacher continues from its own previous model while learning
    from the student's latest (a second round would repeat this with the roles' next models)."""
    from imp_platform.config import validate
    from imp_platform.config.distill import DistillConfig
    from imp_platform.train.checkpoint import load_run_config
    from imp_platform.train.comd import run_comd

    small = [f"{role}.tasks.{task}.token_budget=384" for role, task in
             (("teacher", "video_cls"), ("teacher", "audio_cls"), ("student", "video_cls"))]
    shipped = load_distill_config(SHIPPED, ["rounds=1", "bidirectional=true", "teacher_steps=2",
                                            "steps_per_round=2", *small])
    dc = validate(DistillConfig, {**shipped.model_dump(mode="json"),
                                  "base_overrides": [*tiny_overrides, "run.num_workers=1", "eval.report=false"]})
    payload = run_comd(dc, tmp_path / "comd")

    rows = payload["rows"]
    assert [(r["round"], r["model"]) for r in rows] == [
        (0, "teacher"), (1, "student"), (1, "teacher")]
    for row in rows:
        assert Path(row["checkpoint"], "pretrain.yaml").exists()
        assert 0 <= row["head_video_cls_top1"] <= 1 and 0 <= row["head_video_cls_ece"] <= 1
    assert all("head_audio_cls_top1" in r for r in rows if r["model"] == "teacher")
    assert (payload["teacher"], payload["student"]) == (rows[2]["checkpoint"], rows[1]["checkpoint"])
    assert json.loads((tmp_path / "comd" / "comd.json").read_text())["rows"] == rows
    assert (tmp_path / "comd" / "comd.png").exists()

    ckpt = [r["checkpoint"] for r in rows]
    starts = [None, None, ckpt[0]]
    teachers = [set(), {ckpt[0]}, {ckpt[1]}]
    for checkpoint, start, teacher in zip(ckpt, starts, teachers, strict=True):
        cfg = load_run_config(checkpoint)
        assert cfg.model.init_from == start
        assert {o.teacher for t in cfg.tasks.values() for o in t.objectives if o.kind == "distill"} == teacher
