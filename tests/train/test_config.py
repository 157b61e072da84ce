"""The pretrain config: the embedded default loads, overrides apply, mistakes name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from imp_platform.config import ConfigError
from imp_platform.config.train import load_pretrain_config
from imp_platform.train.tasks import resolve_model_config, task_columns

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_has_the_six_tasks_and_builds_the_tiny_moe():
    cfg = load_pretrain_config()
    assert set(cfg.tasks) == {"video_text", "video_audio", "audio_text", "image_cls", "video_cls", "audio_cls"}
    assert cfg.run.num_workers == 2
    model = resolve_model_config(cfg)
    assert model.moe.enabled and model.heads == {"image_cls": 10, "video_cls": 10, "audio_cls": 10}
    assert task_columns(cfg.tasks["video_text"]) == ["video", "text_ids", "text_mask"]
    assert task_columns(cfg.tasks["audio_cls"]) == ["audio_mel", "label"]


def test_overrides_reach_every_section():
    cfg = load_pretrain_config(REPO / "jobs/configs/pretrain.yaml",
                               ["run.steps=4", "run.num_workers=1", "run.storage_path=s3://b/p", "model.preset=tiny",
                                "model.overrides={depth: 2, moe.num_experts: 8}", "agd.mode=mixed"])
    assert (cfg.run.steps, cfg.run.num_workers, cfg.run.storage_path) == (4, 1, "s3://b/p")
    assert cfg.run.eval_every == 4  # clipped to the run length
    model = resolve_model_config(cfg)
    assert model.depth == 2 and model.moe.num_experts == 8


@pytest.mark.parametrize("override, message", [
    ("run.stepz=3", "run.stepz: unknown key"),
    ("tasks.video_text.modalities=[video]", "nce needs exactly two modalities"),
    ("agd.curriculum=[{start: 0, weights: {nope: 1}}]", "unknown tasks ['nope']"),
    ("tasks.image_cls.drop_token=1.5", "tasks.image_cls.drop_token"),
])
def test_mistakes_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_pretrain_config(None, [override])


def test_model_may_be_just_a_preset_name():
    cfg = load_pretrain_config(None, ["model=tiny"])
    assert cfg.model.preset == "tiny" and cfg.model.moe is True


def test_every_path_the_workers_open_is_made_absolute(tmp_path, monkeypatch):
    """Workers and Tune trials run in other directories: data, storage, init_from and teachers all resolve here."""
    monkeypatch.chdir(tmp_path)
    cfg = load_pretrain_config(None, [
        "data.root=d", "run.storage_path=s3://bucket/runs", "model.init_from=ckpt/a",
        "tasks.video_cls.objectives=[{kind: distill, teacher: teach/b, teacher_modalities: [video]}]"])
    fixed = cfg.with_absolute_paths()
    assert fixed.data.root == str(tmp_path / "d")
    assert fixed.model.init_from == str(tmp_path / "ckpt/a")
    assert fixed.tasks["video_cls"].objectives[0].teacher == str(tmp_path / "teach/b")
    assert fixed.run.storage_path == "s3://bucket/runs"  # URLs unchanged
    assert cfg.model.init_from == "ckpt/a"  # the original is not modified
