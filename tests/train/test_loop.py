"""Real Ray Train V2 runs (2 gloo workers): learning, identical grads, a killed worker, resume, eval."""

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


def _fit_and_kill_rank1_after(cfg, step: int):
    """Fit in a thread; SIGKILL rank 1 once the controller has registered the ``step`` checkpoint."""
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", _fit(cfg)))
    thread.start()
    snapshot = Path(cfg.run.storage_path) / cfg.run.name / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not (snapshot.exists() and f"checkpoint_{step:07d}" in snapshot.read_text()):
        time.sleep(0.2)
    assert snapshot.exists(), "no registered checkpoint before the deadline"
    debug = Path(cfg.run.worker_env["IMP_TRAIN_DEBUG_DIR"])
    os.kill(int(_lines(debug / "rank1-pids")[0]), signal.SIGKILL)
    thread.join(timeout=600)
    return outcome["result"]


def _grads_by_step(path: Path) -> dict[int, str]:
    """The last logged (task, grad digest) of each step: steps rerun after a restart overwrite."""
    return {int(line.split()[0]): line for line in _lines(path)}


def test_two_workers_learn_survive_a_killed_worker_and_resume(ray_local, tiny_overrides, tmp_path):
    """One run checks learning, identical grads, a killed worker (restart from the last checkpoint),
    and a rerun that resumes: each Train run costs ~20 s of start-up here, so they share one."""
    debug = tmp_path / "debug"
    # Round-robin: audio_cls every step-ish (its loss is comparable across buckets, unlike NCE whose
    # chance level is log(batch)), the other five tasks once per 4 steps.
    rr = ["agd.mode=round_robin", *[f"tasks.{t}.interval=4" for t in ("video_text", "video_audio", "audio_text",
                                                                      "image_cls", "video_cls")],
          "tasks.audio_cls.interval=1", "run.name=twoworkers", f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {debug}}}"]
    cfg = _cfg(tiny_overrides, "run.steps=16", "run.eval_every=8", "run.max_failures=2", *rr)
    result = _fit_and_kill_rank1_after(cfg, 8)
    assert result.error is None
    assert result.metrics["step"] == 16
    for key in ("val_loss", "zeroshot_video_top1", "zeroshot_audio_top1", "zeroshot_image_top1",
                "retrieval_video_text_r1", "loss", "tokens_per_s"):
        assert key in result.metrics, key
    # The killed worker came back (a second pid) and both ranks restarted from the step-8 checkpoint.
    assert len(_lines(debug / "rank1-pids")) == 2
    assert _lines(debug / "rank0-starts") == _lines(debug / "rank1-starts") == ["0", "8"]
    # Same task each step on both ranks, and the averaged grads match bit for bit.
    rank0, rank1 = _grads_by_step(debug / "rank0-grads"), _grads_by_step(debug / "rank1-grads")
    assert sorted(rank0) == list(range(16)) and rank0 == rank1
    assert len({line.split()[1] for line in rank0.values()}) == 6  # round-robin visited every task
    # Training loss goes down on the main task (halves compared: one 2-step window is noisy).
    with result.checkpoint.as_directory() as directory:
        history = load_history(directory)
        files = sorted(os.listdir(directory))
    assert "cursor-rank-001-of-002.pt" in files and "model.safetensors" in files and "pretrain.yaml" in files
    cls = [row["loss/audio_cls"] for row in history if "loss/audio_cls" in row]
    half = len(cls) // 2
    assert sum(cls[half:]) / (len(cls) - half) < sum(cls[:half]) / half, cls
    # A rerun with the same storage_path + name resumes at step 16 and continues to 20.
    more = _fit(_cfg(tiny_overrides, "run.steps=20", "run.eval_every=4", *rr))
    assert more.metrics["step"] == 20
    assert _lines(debug / "rank0-starts") == ["0", "8", "16"]
    assert sorted(_grads_by_step(debug / "rank0-grads")) == list(range(20))


def test_eval_of_a_trained_checkpoint_writes_metrics_and_report(trained_checkpoint, tmp_path):
    from imp_platform.eval.run import evaluate_checkpoint

    out = evaluate_checkpoint(trained_checkpoint, tmp_path / "eval", max_samples=24)
    metrics = json.loads(out.metrics_path.read_text())
    for key in ("zeroshot_video_top1", "zeroshot_audio_top1", "zeroshot_image_top1", "retrieval_video_text_r1",
                "retrieval_audio_text_r5", "retrieval_video_audio_r10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["step"] == 4 and metrics["eval_samples"] == 24
    assert out.report_path.stat().st_size > 10_000
