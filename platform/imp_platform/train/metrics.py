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

import torch

log = logging.getLogger(__name__)

Scalar = float | torch.Tensor


class MetricsWindow:
    """Accumulates step records between two flushes.

    Losses, grad norms and expert loads may be tensors (as the step leaves them): they are kept
    as tensors and moved to the host once per flush, so recording a step never waits on the device.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = defaultdict(list)  # loss/<task>, part/<task>/<name>, grad_norm
        self._tasks: dict[str, int] = defaultdict(int)
        self._tokens = 0
        self._samples = 0
        self._step_time = 0.0
        self._data_time = 0.0
        self._started = time.perf_counter()

    def record(self, *, task: str, loss: Scalar, parts: dict[str, Scalar], tokens: int, samples: int,
               step_time: float, data_time: float, grad_norm: Scalar,
               expert_load: dict[str, dict[str, Any]] | None = None) -> None:
        """One optimizer step of ``task`` (``expert_load``: modality -> layer -> per-expert fraction)."""
        self._add(f"loss/{task}", loss)
        for name, value in parts.items():
            self._add(f"part/{task}/{name}", value)
        self._tasks[task] += 1
        self._tokens += tokens
        self._samples += samples
        self._step_time += step_time
        self._data_time += data_time
        self._add("grad_norm", grad_norm)
        for modality, layers in (expert_load or {}).items():
            for layer, load in layers.items():
                self._add(f"expert_load/{modality}/{layer}", load)

    def _add(self, key: str, value: Any) -> None:
        self._values[key].append(torch.as_tensor(value).detach().to(torch.float64).reshape(-1))

    def restart_clock(self) -> None:
        """Exclude time spent outside training steps (eval, checkpointing) from throughput."""
        self._started = time.perf_counter()

    def flush(self, step: int, lr: float) -> dict[str, Any]:
        """Window averages as one flat dict, then start a new window."""
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        means = self._means()
        out: dict[str, Any] = {"step": step, "lr": lr}
        losses = [v for key, values in self._values.items() if key.startswith("loss/") for v in values]
        out["loss"] = float(torch.cat(losses).mean()) if losses else float("nan")
        for task, count in self._tasks.items():
            out[f"loss/{task}"] = means[f"loss/{task}"][0]
            out[f"steps/{task}"] = count
        out.update({k: v[0] for k, v in means.items() if k.startswith("part/")})
        out["tokens_per_s"] = self._tokens / elapsed
        out["samples_per_s"] = self._samples / elapsed
        out["data_wait_frac"] = self._data_time / max(self._step_time, 1e-9)
        out["grad_norm"] = means["grad_norm"][0] if "grad_norm" in means else 0.0
        out.update({k: [round(x, 4) for x in v] for k, v in means.items() if k.startswith("expert_load/")})
        self._reset()
        return out

    def _means(self) -> dict[str, list[float]]:
        """Each key's mean over the window, all moved to the host in one transfer."""
        if not self._values:
            return {}
        keys = list(self._values)
        means = [torch.stack([v.to(self._values[keys[0]][0].device) for v in self._values[k]]).mean(0) for k in keys]
        flat = torch.cat(means).cpu().tolist()
        out, offset = {}, 0
        for key, mean in zip(keys, means, strict=True):
            out[key] = flat[offset: offset + mean.numel()]
            offset += mean.numel()
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
