"""Per-task window metrics, the progress line, TensorBoard event files."""

from __future__ import annotations

import pytest

from imp_platform.train.metrics import MetricsWindow, TensorBoardLogger, progress_line, scalar_metrics


def _record(window, task, loss, load=None):
    window.record(task=task, loss=loss, parts={"nce": loss}, tokens=1000, samples=10, step_time=0.5,
                  data_time=0.1, grad_norm=2.0, expert_load=load)


def test_window_averages_per_task_and_resets():
    window = MetricsWindow()
    _record(window, "vt", 2.0, {"video": {"2": [0.5, 0.5]}})
    _record(window, "vt", 4.0, {"video": {"2": [1.0, 0.0]}})
    _record(window, "cls", 1.0)
    row = window.flush(step=3, lr=1e-3)
    assert row["loss/vt"] == 3.0 and row["loss/cls"] == 1.0
    assert row["loss"] == pytest.approx(7 / 3)
    assert row["steps/vt"] == 2 and row["part/vt/nce"] == 3.0
    assert row["data_wait_frac"] == pytest.approx(0.2)
    assert row["tokens_per_s"] > 0
    assert row["expert_load/video/2"] == [0.75, 0.25]
    assert "loss/vt" not in window.flush(step=4, lr=1e-3)
    line = progress_line(row, 100)
    assert line.startswith("step     3/100 | loss 2.333 |") and "vt 3.000" in line and "lr 1.0e-03" in line
    assert "expert_load/video/2" not in scalar_metrics(row)


def test_tensorboard_writes_event_file(tmp_path):
    window = MetricsWindow()
    _record(window, "vt", 2.0, {"video": {"2": [0.5, 0.5]}})
    tb = TensorBoardLogger(tmp_path)
    tb.log(window.flush(step=1, lr=1e-3))
    tb.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "loss/vt" in tags and "expert_load/video/2/e1" in tags
