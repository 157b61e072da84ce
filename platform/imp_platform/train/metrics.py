"""Per-task training metrics: window averages, a readable progress line, TensorBoard.

Metrics are accumulated over a logging window and flushed into one flat dict whose keys
are what ``ray.train.report``, TensorBoard and the PNG report all use:
``loss/<task>``, ``loss``, ``tokens_per_s``, ``data_wait_frac``, ``lr``, ``grad_norm``,
``expert_load/<modality>/<layer>`` (a list: fraction of routed tokens per expert); the loop adds
``nonfinite_skips`` (steps skipped since step 0) and ``worker_pss_mb`` (a list: each rank's PSS).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class MetricsWindow:
    """Accumulates step records between two flushes."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._loss: dict[str, list[float]] = defaultdict(list)
        self._parts: dict[str, list[float]] = defaultdict(list)
        self._load: dict[str, list[np.ndarray]] = defaultdict(list)
        self._tasks: dict[str, int] = defaultdict(int)
        self._tokens = 0
        self._samples = 0
        self._step_time = 0.0
        self._data_time = 0.0
        self._grad_norm: list[float] = []
        self._started = time.perf_counter()

    def record(self, *, task: str, loss: float, parts: dict[str, float], tokens: int, samples: int,
               step_time: float, data_time: float, grad_norm: float,
               expert_load: dict[str, dict[str, list[float]]] | None = None) -> None:
        """One optimizer step of ``task`` (``expert_load``: modality -> layer -> per-expert fraction)."""
        self._loss[task].append(loss)
        for name, value in parts.items():
            self._parts[f"{task}/{name}"].append(value)
        self._tasks[task] += 1
        self._tokens += tokens
        self._samples += samples
        self._step_time += step_time
        self._data_time += data_time
        self._grad_norm.append(grad_norm)
        for modality, layers in (expert_load or {}).items():
            for layer, load in layers.items():
                self._load[f"expert_load/{modality}/{layer}"].append(np.asarray(load, dtype=float))

    def restart_clock(self) -> None:
        """Exclude time spent outside training steps (eval, checkpointing) from throughput."""
        self._started = time.perf_counter()

    def flush(self, step: int, lr: float) -> dict[str, Any]:
        """Window averages as one flat dict, then start a new window."""
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        out: dict[str, Any] = {"step": step, "lr": lr}
        all_losses = [v for values in self._loss.values() for v in values]
        out["loss"] = float(np.mean(all_losses)) if all_losses else float("nan")
        for task, values in self._loss.items():
            out[f"loss/{task}"] = float(np.mean(values))
            out[f"steps/{task}"] = self._tasks[task]
        for name, values in self._parts.items():
            out[f"part/{name}"] = float(np.mean(values))
        out["tokens_per_s"] = self._tokens / elapsed
        out["samples_per_s"] = self._samples / elapsed
        out["data_wait_frac"] = self._data_time / max(self._step_time, 1e-9)
        out["grad_norm"] = float(np.mean(self._grad_norm)) if self._grad_norm else 0.0
        for key, loads in self._load.items():
            out[key] = np.mean(np.stack(loads), axis=0).round(4).tolist()
        self._reset()
        return out


def progress_line(row: dict[str, Any], total_steps: int) -> str:
    """``step  120/400 | loss 2.31 | vt_nce 2.9 va_nce 3.1 ... | 5.1k tok/s | data 3% | lr 8.0e-04``."""
    tasks = " ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in sorted(row.items()) if k.startswith("loss/"))
    extra = "".join(f" | {k} {row[k]:.3f}" for k in ("val_loss", "zeroshot_video_top1") if k in row)
    if row.get("nonfinite_skips"):
        extra += f" | skipped {row['nonfinite_skips']} non-finite"
    return (f"step {row['step']:>5}/{total_steps} | loss {row['loss']:.3f} | {tasks} | "
            f"{row['tokens_per_s'] / 1000:.1f}k tok/s | data {100 * row['data_wait_frac']:.0f}% | "
            f"lr {row['lr']:.1e}{extra}")


class TensorBoardLogger:
    """Scalars (and expert-load histograms as per-expert scalars) under ``logdir``; rank 0 only."""

    def __init__(self, logdir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key == "step":
                continue
            if isinstance(value, list):
                for index, item in enumerate(value):
                    self.writer.add_scalar(f"{key}/e{index}", float(item), step)
            elif isinstance(value, (int, float)):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def scalar_metrics(row: dict[str, Any]) -> dict[str, float]:
    """Only the numeric entries (what Ray Train result tables and Tune want)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
