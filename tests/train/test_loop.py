"""Real Ray Train V2 runs (2 gloo workers): learning, identical grads, resume, a killed worker, eval."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from imp_platform.config.train import load_pretrain_config
from imp_platform.train.checkpoint import load_history

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _cfg(overrides, *extra):
    return load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", [*overrides, *extra])


def _fit(cfg):
    from imp_platform.train.trainer import build_trainer

    return build_trainer(cfg).fit()


def _lines(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def test_two_workers_learn_with_identical_grads_then_resume(ray_local, tiny_overrides, tmp_path):
    debug = tmp_path / "debug"
    # Round-robin: audio_cls every step-ish (its loss is comparable across buckets, unlike NCE whose
    # chance level is log(batch)), the other five tasks once per 4 steps.
    rr = ["agd.mode=round_robin", *[f"tasks.{t}.interval=4" for t in ("video_text", "video_audio", "audio_text",
                                                                      "image_cls", "video_cls")],
          "tasks.audio_cls.interval=1"]
    cfg = _cfg(tiny_overrides, "run.steps=16", "run.eval_every=8", f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {debug}}}", *rr)
    result = _fit(cfg)
    assert result.error is None
    assert result.metrics["step"] == 16
    for key in ("val_loss", "zeroshot_video_top1", "zeroshot_audio_top1", "zeroshot_image_top1",
                "retrieval_video_text_r1", "loss", "tokens_per_s"):
        assert key in result.metrics, key
    # Same task each step on both ranks, and the averaged grads match bit for bit.
    rank0, rank1 = _lines(debug / "rank0-grads"), _lines(debug / "rank1-grads")
    assert len(rank0) == 16 and rank0 == rank1
    assert len({line.split()[1] for line in rank0}) == 6  # round-robin visited every task
    # Training loss goes down on the main task.
    with result.checkpoint.as_directory() as directory:
        history = load_history(directory)
        files = sorted(os.listdir(directory))
    assert "cursor-rank-001-of-002.pt" in files and "model.safetensors" in files and "pretrain.yaml" in files
    cls = [row["loss/audio_cls"] for row in history if "loss/audio_cls" in row]
    assert cls[-1] < cls[0], cls
    # A rerun with the same storage_path + name resumes at step 16 and continues to 20.
    more = _fit(_cfg(tiny_overrides, "run.steps=20", "run.eval_every=4", f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {debug}}}",
                     *rr))
    assert more.metrics["step"] == 20
    assert _lines(debug / "rank0-starts") == ["0", "16"]
    assert len(_lines(debug / "rank0-grads")) == 20  # only 4 new steps ran


def test_killed_worker_restarts_from_last_checkpoint(ray_local, tiny_overrides, tmp_path):
    debug = tmp_path / "debug"
    cfg = _cfg(tiny_overrides, "run.steps=12", "run.eval_every=4", "run.name=killme", "run.max_failures=2",
               f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {debug}}}")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", _fit(cfg)))
    thread.start()
    # Kill only once the controller has registered the step-4 checkpoint (its snapshot names it).
    snapshot = Path(cfg.run.storage_path) / "killme" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not (snapshot.exists() and "checkpoint_0000004" in snapshot.read_text()):
        time.sleep(0.2)
    assert snapshot.exists(), "no registered checkpoint before the deadline"
    victim = int(_lines(debug / "rank1-pids")[0])
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    result = outcome["result"]
    assert result.error is None
    assert result.metrics["step"] == 12
    starts = [int(s) for s in _lines(debug / "rank0-starts")]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 4 and starts[1] % 4 == 0, starts
    assert len(_lines(debug / "rank1-pids")) == 2


def test_eval_of_a_trained_checkpoint_writes_metrics_and_report(trained_checkpoint, tmp_path):
    from imp_platform.eval.run import evaluate_checkpoint

    out = evaluate_checkpoint(trained_checkpoint, tmp_path / "eval", max_samples=24)
    metrics = json.loads(out.metrics_path.read_text())
    for key in ("zeroshot_video_top1", "zeroshot_audio_top1", "zeroshot_image_top1", "retrieval_video_text_r1",
                "retrieval_audio_text_r5", "retrieval_video_audio_r10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["step"] == 4 and metrics["eval_samples"] == 24
    assert out.report_path.stat().st_size > 10_000
