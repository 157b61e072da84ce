"""`python jobs/pretrain.py` and `python jobs/evaluate.py` end to end on tiny settings (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# The --set keys that make a run tiny (also what the infra stream's `ray job submit` test uses).
TINY = ["run.steps=3", "run.eval_every=3", "run.log_every=1", "run.num_workers=1", "run.cpus_per_worker=1",
        "eval.max_samples=16", "eval.batch_size=16", "run.tensorboard=false",
        *[f"tasks.{t}.token_budget=512" for t in ("video_text", "video_audio", "audio_text",
                                                    "image_cls", "video_cls", "audio_cls")]]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_pretrain_then_evaluate_scripts(synth_shards, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "raw").symlink_to(synth_shards["root"], target_is_directory=True)
    proc = _run(["jobs/pretrain.py", "--config", "jobs/configs/pretrain.yaml", f"--set=data.root={root}",
                 "--set=data.synth=null", f"--set=run.storage_path={tmp_path / 'ray'}", "--set=run.name=job",
                 *[f"--set={kv}" for kv in TINY]])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = Path(re.search(r"report:\s+(\S+)", proc.stdout).group(1))
    metrics = Path(re.search(r"metrics:\s+(\S+)", proc.stdout).group(1))
    checkpoint = re.search(r"checkpoint:\s+(\S+)", proc.stdout).group(1)
    assert report.exists() and report.suffix == ".png"
    assert json.loads(metrics.read_text())["step"] == 3
    assert "step     3/3" in proc.stdout + proc.stderr  # the progress line

    proc = _run(["jobs/evaluate.py", "--checkpoint", checkpoint, "--out", str(tmp_path / "eval"), "--max-samples", "16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"zeroshot_video_top1", "zeroshot_audio_top1", "zeroshot_image_top1", "retrieval_video_text_r1"} <= set(out)


def test_bad_config_key_is_a_clear_error():
    proc = _run(["jobs/pretrain.py", "--set", "run.stepz=3"], timeout=120)
    assert proc.returncode == 2
    assert "run.stepz: unknown key" in proc.stderr
