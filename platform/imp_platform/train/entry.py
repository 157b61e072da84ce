"""What ``jobs/pretrain.py``, ``platform pretrain`` and ``platform demo`` share: run and summarize."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from imp_platform.config.train import load_pretrain_config
from imp_platform.memory import PeakMemory

log = logging.getLogger(__name__)

HEADLINE = ("zeroshot_video_top1", "zeroshot_audio_top1", "zeroshot_image_top1", "retrieval_video_text_r1",
            "retrieval_video_text_r1_semantic")


def run_pretrain(config: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Load the config (default: the embedded demo), pretrain, print where the results are."""
    from imp_platform.train.phases import PhaseTimer
    from imp_platform.train.trainer import pretrain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_pretrain_config(config, overrides)
    began = time.perf_counter()
    phases = PhaseTimer(since_process_start=True)
    with PeakMemory(interval=1.0) as memory:  # a locally started Ray runs as this process's children
        result = pretrain(cfg, phases)
    summary = {k: result.metrics[k] for k in HEADLINE if k in result.metrics}
    print(f"\npretraining {cfg.run.name} done in {time.perf_counter() - began:.0f}s at step "
          f"{result.metrics.get('step')}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    print(f"peak memory (this process and its children): {memory.peak_pss_mb / 1024:.1f} GiB PSS, "
          f"{memory.peak_mb / 1024:.1f} GiB summed RSS; largest at the peak: {memory.top_processes()}")
    print(f"time per phase (this process, from its start):\n{phases.table()}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.metrics_path}")
    print(f"report:     {result.report_path}")
    return {"checkpoint": result.checkpoint, "metrics": result.metrics,
            "metrics_path": str(result.metrics_path), "report_path": str(result.report_path)}


def run_eval(checkpoint: str, out: str | Path | None = None, max_samples: int | None = None) -> dict:
    from imp_platform.eval.run import evaluate_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = evaluate_checkpoint(checkpoint, out, max_samples=max_samples)
    print(", ".join(f"{k} {result.metrics[k]:.3f}" for k in HEADLINE if k in result.metrics))
    print(f"metrics: {result.metrics_path}")
    print(f"report:  {result.report_path}")
    return result.metrics
