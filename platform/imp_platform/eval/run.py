"""Evaluate a checkpoint on its run's held-out split; write metrics.json and the PNG report."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    metrics_path: Path
    report_path: Path


def write_outputs(metrics: dict[str, Any], history: list[dict[str, Any]], out_dir: str | Path,
                  title: str = "imp-platform run") -> tuple[Path, Path]:
    """``out_dir/metrics.json`` and ``out_dir/report.png`` (history plus the final metrics as the last point)."""
    from imp_platform.eval.report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    points = list(history)
    if metrics.get("step") is not None and not any(r.get("step") == metrics["step"] for r in points):
        points.append(metrics)
    report_path = write_report(points, out_dir / "report.png", title=title)
    return metrics_path, report_path


def evaluate_checkpoint(path: str, out_dir: str | Path | None = None, *, max_samples: int | None = None,
                        storage_options: dict[str, Any] | None = None) -> EvalResult:
    """Load model + run config from a checkpoint (local or s3://), score the held-out split, write outputs."""
    from ray.train import Checkpoint

    from imp_platform.eval.zeroshot import HeldOut
    from imp_platform.train.checkpoint import load_history, load_model, load_run_config, load_train_state

    filesystem = None
    if "://" in path and storage_options:
        import pyarrow.fs

        from imp_platform.data.sources import filesystem as fsspec_fs

        fs, path = fsspec_fs(path, storage_options)
        filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    checkpoint = Checkpoint(path, filesystem=filesystem) if filesystem else Checkpoint(path)
    with checkpoint.as_directory() as directory:
        cfg = load_run_config(directory)
        model, _ = load_model(directory)
        history = load_history(directory)
        step = int(load_train_state(directory)["step"])
    if max_samples is not None:
        cfg.eval.max_samples = max_samples
    metrics: dict[str, Any] = {"step": step, **HeldOut.open(cfg).evaluate(model)}
    out_dir = Path(out_dir) if out_dir else Path("runs") / cfg.run.name / "eval"
    metrics_path, report_path = write_outputs(metrics, history, out_dir, title=f"{cfg.run.name} @ step {step}")
    log.info("eval of %s: %s", path, {k: round(v, 4) for k, v in metrics.items() if "top1" in k or k.endswith("_r1")})
    return EvalResult(metrics, metrics_path, report_path)
