"""Issue 13 §5: a user's own corpus end to end with YAML only, through the commands the README gives.

The coloured-shapes corpus (tests/data/realworld.py) is not moving digits and is written by
another route than the synth writer: `platform data tokenizer` -> `platform data preprocess`
(train and test) -> `platform pretrain` -> `platform eval` -> `platform data inspect`, with a
pretrain YAML that names no class count. Zero-shot video must beat chance (4 classes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from imp_platform.cli import app

PRETRAIN = {
    "data": {"train_split": "train", "eval_split": "test", "synth": None},
    "model": {"preset": "tiny", "moe": True, "overrides": {"temperature_init": 0.1}},
    "tasks": {
        "video_text": {"modalities": ["video", "text"], "objectives": [{"kind": "nce"}], "token_budget": 1024},
        "video_cls": {"modalities": ["video"], "objectives": [{"kind": "classification"}], "token_budget": 512},
    },
    "optim": {"lr": 2.0e-3},
    "schedule": {"warmup_steps": 4},
    "agd": {"mode": "round_robin"},
    "eval": {"batch_size": 16},
}


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_own_corpus_from_shards_to_report(ray_local: None, shapes_corpus: dict[str, Path], tmp_path: Path) -> None:
    from realworld import CLASSES, PIPELINE_YAML

    root = tmp_path / "shapes"
    tokenizer = tmp_path / "tokenizer.json"
    run("data", "tokenizer", "--input", str(shapes_corpus["train"]), "--out", str(tokenizer), "--vocab-size", "256")
    for split in ("train", "test"):
        out = run("data", "preprocess", str(PIPELINE_YAML), "--set", f"source.paths=[{shapes_corpus[split]}]",
                  "--set", f"output.path={root}/processed/{split}", "--set", f"text.tokenizer={tokenizer}")
        assert "skipped" not in out, out  # every sample of this corpus is good

    config = tmp_path / "shapes_pretrain.yaml"
    config.write_text(yaml.safe_dump({**PRETRAIN, "data": {**PRETRAIN["data"], "root": str(root),
                                                           "pipeline": str(PIPELINE_YAML)},
                                      "run": {"name": "shapes", "storage_path": str(tmp_path / "ray"),
                                              "num_workers": 1, "cpus_per_worker": 0.5, "threads_per_worker": 1,
                                              "steps": 40, "eval_every": 40, "log_every": 10,
                                              "tensorboard": False}}))
    out = run("pretrain", "--config", str(config))
    checkpoint = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("checkpoint:"))
    run("eval", "--checkpoint", checkpoint, "--out", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_classes"] == len(CLASSES)
    assert metrics["zeroshot_video_top1"] > 1 / len(CLASSES) + 0.15, metrics  # 16 held-out clips, chance 0.25
    assert len(metrics["zeroshot_video_confusion"]) == len(CLASSES)
    assert (tmp_path / "eval" / "report.png").stat().st_size > 10_000

    card = run("data", "inspect", str(root / "processed"), "--out", str(tmp_path / "inspect"))
    assert all(name in card for name in CLASSES), card
    assert list((tmp_path / "inspect").glob("contact_sheet_*.png"))
