"""A sweep submitted with ``ray job submit`` to a real ``ray start --head``, its storage on S3 (moto),
survives a SIGKILL of its driver: ``platform tune --resume`` (submitted the same way) finishes it
without rerunning the trial that had finished.

Two trials, one at a time. The driver is killed once the experiment state in the bucket (what a
resume starts from) shows the first trial finished and the second one has reported a
checkpoint. Every Train run start and restore is recorded through the loop's debug hooks.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import s3fs
import yaml

from imp_platform.tune.lineage import POINTER
from ray_session import driver_pid, lines

REPO = Path(__file__).resolve().parents[2]
EVERY, REPORTS = 4, 4
STEPS = EVERY * REPORTS


def _submit(ray_head: dict, argv: list[str], *, wait: bool, job_id: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo>`, retried while the head's job agent is not up yet."""
    command = [ray_head["ray"], "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
               "--submission-id", job_id, *([] if wait else ["--no-wait"]), "--", *argv]
    deadline = time.monotonic() + 90
    while True:
        out = subprocess.run(command, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in out.stdout + out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(2)


def _statuses(bucket: s3fs.S3FileSystem, experiment: str) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Tune has uploaded (what a resume reads)."""
    bucket.invalidate_cache()
    states = sorted(bucket.glob(f"{experiment}/experiment_state-*.json"))
    if not states:
        return {}
    trials = [json.loads(trial) for trial, _ in json.loads(bucket.cat(states[-1]))["trial_data"]]
    return {trial["trial_id"]: trial["status"] for trial in trials}


@pytest.mark.slow
def test_submitted_s3_sweep_resumes_after_its_driver_is_killed(ray_head, s3_server, tiny_overrides, tmp_path):
    debug, report = tmp_path / "debug", tmp_path / "report"
    prefix = f"{s3_server['bucket']}/sweeps-{os.getpid()}"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "killed", "base": str(REPO / "jobs/configs/pretrain.yaml"), "steps": STEPS, "num_samples": 2,
        "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "metric": "lr", "mode": "max",
        "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1, "resources": {"cpus_per_worker": 0.5},
        "storage_path": f"s3://{prefix}", "storage_options": s3_server["storage_options"], "report_dir": str(report),
        "overrides": [*tiny_overrides, f"run.eval_every={EVERY}", "eval.enabled=false",
                      f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {debug}}}"],
    }))
    bucket = s3fs.S3FileSystem(**s3_server["storage_options"])
    experiment = f"{prefix}/killed"

    out = _submit(ray_head, ["python", "jobs/tune.py", "--space", str(sweep_file)], wait=False, job_id="sweep-1")
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 600
    while True:  # until the uploaded state has one trial finished and the other has a Train checkpoint
        statuses = _statuses(bucket, experiment)
        done = [t for t, status in statuses.items() if status == "TERMINATED"]
        running = [t for t in statuses if t not in done]
        # The running trial's first report reached Tune: its Train checkpoint is registered.
        if len(done) == 1 and running and bucket.glob(f"{experiment}/*{running[0]}*/checkpoint_*/{POINTER}"):
            break
        assert time.monotonic() < deadline and len(done) < 2, f"no state to kill the driver in: {statuses}"
        time.sleep(0.5)
    os.kill(driver_pid("jobs/tune.py", str(sweep_file)), signal.SIGKILL)
    (finished,), (unfinished,) = done, running
    before = lines(debug / "rank0-starts")
    assert before == ["0", "0"], before  # the two trials' Train runs, each from step 0

    resumed = _submit(ray_head, ["platform", "tune", "--space", str(sweep_file), "--resume"], wait=True,
                      job_id="sweep-2")
    log = (resumed.stdout + resumed.stderr)[-6000:]
    assert resumed.returncode == 0 and "succeeded" in resumed.stdout, log
    # Only the unfinished trial's Train run started again, from its own checkpoint (not step 0) ...
    starts = lines(debug / "rank0-starts")
    restores = [line.split() for line in lines(debug / "rank0-restores")]
    assert len(starts) == 3 and 0 < int(starts[2]) < STEPS, (starts, log)
    assert [(run, int(step)) for run, step, *_ in restores] == [(f"trial-{unfinished}", int(starts[2]))], restores
    # ... and both trials are in the resumed sweep's table, each having run every step.
    with (report / "trials.csv").open() as fh:
        table = {row["trial"].removesuffix(" *"): row for row in csv.DictReader(fh)}
    assert set(table) == {finished, unfinished}, (table.keys(), log)
    assert all(int(float(row["steps"])) == STEPS for row in table.values()), table
