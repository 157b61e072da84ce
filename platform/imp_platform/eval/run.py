"""Evaluate a checkpoint on its run's held-out split; write metrics.json and the PNG report."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # scalars, plus ``zeroshot_<family>_confusion`` as nested lists
    metrics_path: Path
    report_path: Path


def write_outputs(metrics: dict[str, Any], history: list[dict[str, Any]], out_dir: str | Path,
                  title: str = "imp-platform run", classes: Sequence[str] | None = None) -> tuple[Path, Path]:
    """``out_dir/metrics.json`` and ``out_dir/report.png`` (history plus the final metrics as the last point).

    ``metrics`` may hold ``zeroshot_<family>_confusion`` (nested lists) besides scalars;
    ``classes`` names the zero-shot classes in the report. Its ``caption_examples`` go to
    ``out_dir/captions.jsonl`` and the report's captions panel rather than ``metrics.json``.
    """
    from imp_platform.eval.captioning import EXAMPLES_KEY, write_examples
    from imp_platform.eval.report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps({k: v for k, v in metrics.items() if k != EXAMPLES_KEY}, indent=2,
                                       sort_keys=True))
    if metrics.get(EXAMPLES_KEY):
        write_examples(metrics[EXAMPLES_KEY], out_dir / "captions.jsonl")
    report_path = write_report(report_points(metrics, history), out_dir / "report.png", title=title, classes=classes)
    return metrics_path, report_path


def report_points(metrics: dict[str, Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history with the eval's metrics joined to the row of their step (a checkpoint's last
    row is the training-time eval of that step, scalars only), or appended as a new point."""
    points = [dict(row) for row in history]
    if metrics.get("step") is not None:
        same = [row for row in points if row.get("step") == metrics["step"]]
        if same:
            same[-1].update(metrics)
        else:
            points.append(metrics)
    return points


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
    heldout = HeldOut.open(cfg)
    metrics: dict[str, Any] = {"step": step, **heldout.run(model).as_json()}
    out_dir = Path(out_dir) if out_dir else Path("runs") / cfg.run.name / "eval"
    metrics_path, report_path = write_outputs(metrics, history, out_dir, title=f"{cfg.run.name} @ step {step}",
                                              classes=heldout.card.classes)
    log.info("eval of %s: %s", path, {k: round(v, 4) for k, v in metrics.items()
                                      if k.endswith(("_top1", "_r1", "_r1_semantic"))})
    return EvalResult(metrics, metrics_path, report_path)
