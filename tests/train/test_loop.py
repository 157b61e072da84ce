"""Real Ray Train V2 runs (2 gloo workers): learning, identical grads, a killed worker, bit-for-bit
resume, checkpoint interval, a checkpoint on SIGTERM, a NaN batch skipped on every rank, no
credentials at rest, eval."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imp_platform.config.train import load_pretrain_config
from imp_platform.train.checkpoint import load_history

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
KEYS = {"key": "AKIAPLANTEDACCESSKEY", "secret": "planted/secret+value"}  # must end up in no file


def _cfg(overrides, *extra):
    return load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", [*overrides, *extra])


def _fit(cfg):
    from imp_platform.train.trainer import build_trainer

    return build_trainer(cfg).fit()


def _lines(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _fit_and_kill_rank1_after(cfg, step: int, sig: int = signal.SIGKILL):
    """Fit in a thread; send ``sig`` to rank 1's latest process once the controller has registered the
    ``step`` checkpoint and rank 1 has run a step past it (after a SIGKILL, some steps run twice:
    before the kill and after the resume)."""
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", _fit(cfg)))
    thread.start()
    snapshot = Path(cfg.run.storage_path) / cfg.run.name / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 400
    debug = Path(cfg.run.worker_env["IMP_TRAIN_DEBUG_DIR"])

    def ready() -> bool:
        registered = snapshot.exists() and f"checkpoint_{step:07d}" in snapshot.read_text()
        return registered and any(int(line.split()[0]) > step for line in _lines(debug / "rank1-grads"))

    while time.monotonic() < deadline and not ready():
        time.sleep(0.1)
    assert ready(), "no registered checkpoint before the deadline"
    os.kill(int(_lines(debug / "rank1-pids")[-1]), sig)
    thread.join(timeout=600)
    return outcome["result"]


def _grads_by_step(path: Path) -> dict[int, str]:
    """The logged (task, grad digest, weight digest) of each step; a step run twice (before a kill and
    after the resume) must have logged the same line twice: the resume is bit-for-bit."""
    by_step: dict[int, str] = {}
    for line in _lines(path):
        step = int(line.split()[0])
        assert by_step.setdefault(step, line) == line, f"step {step} differs after the resume"
    return by_step


def _plant_nan(root: Path) -> None:
    """NaN in ``audio_mel`` of the first row of the train split's largest file (row groups kept as they were)."""
    path = max((root / "processed" / "train").glob("*/*.parquet"), key=lambda p: pq.ParquetFile(p).metadata.num_rows)
    source = pq.ParquetFile(path)
    table = source.read()
    index = table.schema.get_field_index("audio_mel")
    column = table.column(index).combine_chunks()
    lists = column.storage if isinstance(column, pa.ExtensionArray) else column  # Ray's tensor type, if loaded
    values = lists.values.to_numpy(zero_copy_only=False).copy()
    values[: int(lists.offsets[1].as_py())] = np.nan
    planted = pa.LargeListArray.from_arrays(lists.offsets, pa.array(values, lists.type.value_type))
    if isinstance(column, pa.ExtensionArray):
        planted = pa.ExtensionArray.from_storage(column.type, planted)
    table = table.set_column(index, table.schema.field(index), planted)
    sizes = [source.metadata.row_group(i).num_rows for i in range(source.metadata.num_row_groups)]
    with pq.ParquetWriter(path, table.schema) as writer:
        for start, size in zip(np.cumsum([0, *sizes[:-1]]), sizes):
            writer.write_table(table.slice(int(start), size), row_group_size=size)


def _nan_data(processed_root: Path, tmp_path: Path) -> Path:
    """A copy of the session's processed data whose train split has a few NaN rows."""
    import shutil

    root = tmp_path / "nan-data"
    shutil.copytree(processed_root / "processed", root / "processed")
    (root / "raw").symlink_to(processed_root / "raw", target_is_directory=True)  # the tokenizer for eval
    _plant_nan(root)
    return root


@pytest.mark.chaos
def test_two_workers_learn_survive_a_killed_worker_and_resume(ray_local, tiny_overrides, processed_root, tmp_path):
    """One run checks learning, identical grads, a killed worker (a bit-for-bit restart from the last
    checkpoint), a NaN batch, credentials kept out of what it writes, and reruns that resume or have
    nothing left to do: each Train run costs ~20 s of start-up here, so they share one."""
    debug = tmp_path / "debug"
    # Round-robin: audio_cls every step-ish (its loss is comparable across buckets, unlike NCE whose
    # chance level is log(batch)), the other five tasks once per 4 steps.
    rr = ["agd.mode=round_robin", *[f"tasks.{t}.interval=4" for t in ("video_text", "video_audio", "audio_text",
                                                                      "image_cls", "video_cls")],
          "tasks.audio_cls.interval=1", "run.name=twoworkers", f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {debug}}}",
          f"data.root={_nan_data(processed_root, tmp_path)}", f"data.storage_options={json.dumps(KEYS)}",
          "run.checkpoint_every=4"]
    cfg = _cfg(tiny_overrides, "run.steps=16", "run.eval_every=16", "run.max_failures=2", *rr)
    result = _fit_and_kill_rank1_after(cfg, 8)
    assert result.error is None
    assert result.metrics["step"] == 16
    for key in ("val_loss", "zeroshot_video_top1", "zeroshot_audio_top1", "zeroshot_image_top1",
                "retrieval_video_text_r1", "loss", "tokens_per_s", "nonfinite_skips"):
        assert key in result.metrics, key
    # The killed worker came back (a second pid) and both ranks restarted from the same checkpoint.
    assert len(_lines(debug / "rank1-pids")) == 2
    starts = _lines(debug / "rank0-starts")
    assert starts == _lines(debug / "rank1-starts") and starts[0] == "0" and starts[1] in ("8", "12")
    # Same task each step on both ranks, grads and weights match bit for bit, and so do the steps
    # run before the kill and again after the resume (RNG, data cursors, optimizer all restored).
    rank0, rank1 = _grads_by_step(debug / "rank0-grads"), _grads_by_step(debug / "rank1-grads")
    assert sorted(rank0) == list(range(16)) and rank0 == rank1
    assert len(_lines(debug / "rank0-grads")) > 16  # some steps did run twice
    assert len({line.split()[1] for line in rank0.values()}) == 6  # round-robin visited every task
    # The NaN rows were skipped on every rank (no update: the weights stayed finite) and counted.
    skipped = [step for step, line in rank0.items() if not np.isfinite(float(line.split()[2]))]
    assert skipped and result.metrics["nonfinite_skips"] == len(skipped)
    assert all(np.isfinite(float(line.split()[3])) for line in rank0.values())
    # Checkpoints every 4 steps, evals only at 16: the kept pair is 12 (no eval) and 16.
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_0000012", "checkpoint_0000016"]
    # Training loss goes down on the main task (halves compared: one 2-step window is noisy).
    with result.checkpoint.as_directory() as directory:
        history = load_history(directory)
        files = sorted(os.listdir(directory))
    assert {"rank-001-of-002.json", "COMPLETE.json", "model.safetensors", "pretrain.yaml"} <= set(files)
    assert not [f for f in files if f.endswith(".pt") and f != "train_state.pt"]
    assert all(len(row["worker_pss_mb"]) == 2 for row in history)
    cls = [row["loss/audio_cls"] for row in history if "loss/audio_cls" in row]
    half = len(cls) // 2
    assert sum(cls[half:]) / (len(cls) - half) < sum(cls[:half]) / half, cls
    # A rerun with the same storage_path + name resumes at step 16 and continues to 24. Rank 1 gets
    # SIGTERM (a preemption) after step 17: every rank checkpoints the same next step boundary and
    # stops; Ray Train restarts them from that checkpoint. One more run has nothing left to do and
    # leaves the registered checkpoint as it was.
    more = _fit_and_kill_rank1_after(_cfg(tiny_overrides, "run.steps=24", "run.eval_every=4", *rr), 16,
                                     signal.SIGTERM)
    assert more.error is None and more.metrics["step"] == 24
    preempted = _lines(debug / "rank0-preempted")
    assert len(preempted) == 1 and _lines(debug / "rank1-preempted") == preempted and 17 < int(preempted[0]) < 24
    final = run_dir / "checkpoint_0000024"
    written = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    again = _fit(_cfg(tiny_overrides, "run.steps=24", "run.eval_every=4", *rr))
    assert again.metrics["step"] == 24 and Path(again.checkpoint.path).name == final.name
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == written
    assert _lines(debug / "rank0-starts")[2:] == ["16", preempted[0], "24"]
    assert sorted(_grads_by_step(debug / "rank0-grads")) == list(range(24))
    # The keys given in storage_options are in no file the runs wrote.
    for path in [p for p in run_dir.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        assert not any(v.encode() in data for v in KEYS.values()), path


def test_eval_of_a_trained_checkpoint_writes_metrics_and_report(trained_checkpoint, tmp_path):
    from imp_platform.eval.run import evaluate_checkpoint

    out = evaluate_checkpoint(trained_checkpoint, tmp_path / "eval", max_samples=24)
    metrics = json.loads(out.metrics_path.read_text())
    for key in ("zeroshot_video_top1", "zeroshot_audio_top1", "zeroshot_image_top1", "retrieval_video_text_r1",
                "retrieval_audio_text_r5", "retrieval_video_audio_r10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["step"] == 4 and metrics["eval_samples"] == 24
    assert out.report_path.stat().st_size > 10_000
