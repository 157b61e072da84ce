"""Objective specs are one class per kind: a field of another kind is an error naming it, and the
flat form that older checkpoints saved (every kind's field, null where unused) still loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imp_platform.config import ConfigError, dump_yaml
from imp_platform.config.train import (CaptionObjective, ContrastiveObjective, DistillObjective,
                                       load_pretrain_config)

FLAT_NULLS = {"teacher": None, "teacher_modalities": None, "teacher_heads": None, "temperature": None,
              "alpha": None, "features": None, "teacher_column": None, "label_smoothing": None}


def test_each_kind_keeps_only_its_own_fields(tmp_path: Path) -> None:
    cfg = load_pretrain_config(None, ["tasks.video_cls.objectives=[{kind: distill, teacher: t, "
                                      "teacher_modalities: [audio_mel]}]"])
    saved = yaml.safe_load(dump_yaml(cfg, tmp_path / "pretrain.yaml").read_text())
    assert saved["tasks"]["video_text"]["objectives"] == [{"kind": "nce", "weight": 1.0}]
    assert isinstance(cfg.tasks["video_text"].objectives[0], ContrastiveObjective)
    assert isinstance(cfg.tasks["video_cls"].objectives[0], DistillObjective)


@pytest.mark.parametrize("task,objective,field,owner", [
    ("video_text", "{kind: nce, teacher: t}", "teacher", "distill"),
    ("video_audio", "{kind: mil_nce, alpha: 0.3}", "alpha", "distill"),
    ("video_cls", "{kind: classification, label_smoothing: 0.1}", "label_smoothing", "caption"),
])
def test_a_field_of_another_kind_is_a_config_error_naming_it(task: str, objective: str, field: str,
                                                             owner: str) -> None:
    with pytest.raises(ConfigError, match=rf"tasks\.{task}\.objectives\.0: .*{field}: only a {owner} objective"):
        load_pretrain_config(None, [f"tasks.{task}.objectives=[{objective}]"])


def test_flat_checkpoint_yaml_with_null_fields_loads(tmp_path: Path) -> None:
    """A pretrain.yaml saved by the flat ObjectiveSpec: every objective lists every field, null where unused."""
    cfg = load_pretrain_config(None, [
        "tasks.video_cls.objectives=[{kind: distill, teacher: t, teacher_modalities: [audio_mel], alpha: 0.7}]",
        "tasks.video_text.objectives=[{kind: nce}, {kind: caption}]"])
    flat = yaml.safe_load(dump_yaml(cfg, tmp_path / "new.yaml").read_text())
    for task in flat["tasks"].values():
        task["objectives"] = [{**FLAT_NULLS, **o} for o in task["objectives"]]
    assert flat["tasks"]["video_text"]["objectives"][0]["teacher"] is None  # the old form, as saved
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(flat))
    again = load_pretrain_config(tmp_path / "pretrain.yaml")
    assert again.tasks == cfg.tasks
    nce, caption = again.tasks["video_text"].objectives
    assert isinstance(nce, ContrastiveObjective) and isinstance(caption, CaptionObjective)
    assert caption.label_smoothing == 0.0 and again.tasks["video_cls"].objectives[0].alpha == 0.7
