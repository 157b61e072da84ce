"""End to end: the pretrain RayJob's entrypoint, read from the manifest, submitted in the same form
(`ray job submit --working-dir <repo> -- ENTRYPOINT`) to a real `ray start --head`, on a tiny config.
This is also the end-to-end test of `jobs/pretrain.py` (synth -> preprocess -> train -> eval -> report).

Only the appended ``--set`` overrides differ from the cluster: CPU instead of GPU, a moto S3
server instead of the real bucket for the Ray Train storage (checkpoints written there by both
workers, read back for the final report), a local data folder, and a few steps on small
synthesized data (the manifest sets ``data.synth=null``; the overrides turn synthesis back on).

The same run is also the chaos test "driver SIGKILL, then `ray job submit` again": the first submission's
driver is SIGKILLed once Ray Train has registered a checkpoint (in the run's snapshot in the bucket,
what a restore reads); the identical second submission finds the processed data, restores the
run from that checkpoint through Ray Train (same run.name and storage_path; recorded by the loop's
debug hooks) and finishes with the final checkpoint and the report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import s3fs
from infra_manifests import REPO, entrypoint_argv, of_kind, rendered
from ray_session import driver_pid, lines

EVERY, STEPS = 4, 12  # checkpoint interval and run length: the kill lands after the first registered checkpoint


def _tiny(tmp_path, s3: dict) -> list[str]:
    return [
        "run.use_gpu=false", "run.num_workers=2", f"run.steps={STEPS}", f"run.eval_every={STEPS}",
        f"run.checkpoint_every={EVERY}", "run.name=infra-e2e", f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {tmp_path / 'debug'}}}",
        f"run.storage_path=s3://{s3['bucket']}/runs", f"run.storage_options={json.dumps(s3['storage_options'])}",
        f"data.root={tmp_path / 'data'}",
        "data.synth.train_samples=64", "data.synth.test_samples=32", "data.synth.shards=2", "eval.max_samples=32",
    ]


def _registered_step(bucket: s3fs.S3FileSystem, run_dir: str) -> int:
    """The newest checkpoint step in Ray Train's checkpoint-manager snapshot of the run (0 when none)."""
    bucket.invalidate_cache()
    try:
        snapshot = bucket.cat(f"{run_dir}/checkpoint_manager_snapshot.json").decode()
    except FileNotFoundError:
        return 0
    return max((int(step) for step in re.findall(r"checkpoint_(\d{7})", snapshot)), default=0)


def _submit(command: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent has not registered yet (the dashboard port
    opens first); that refusal happens before any job exists, so a retry cannot run it twice."""
    deadline = time.monotonic() + 300  # the agent registers within seconds on a quiet machine, minutes on a loaded one
    while True:
        out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in out.stdout + out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(2)


@pytest.mark.slow
@pytest.mark.chaos
def test_pretrain_rayjob_entrypoint_runs_through_ray_job_submit_and_resumes_after_a_driver_kill(
        ray_head, s3_server, tmp_path):
    (job,) = [j for j in of_kind(rendered("base"), "RayJob") if j["metadata"]["name"] == "imp-pretrain"]
    argv = entrypoint_argv(job)
    overrides = [arg for item in _tiny(tmp_path, s3_server) for arg in ("--set", item)]
    # On the cluster runtimeEnvYAML's working_dir is the image's copy of the repo; here it is the repo.
    command = [ray_head["ray"], "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO)]
    bucket = s3fs.S3FileSystem(**s3_server["storage_options"])
    run_dir = f"{s3_server['bucket']}/runs/infra-e2e"

    first = _submit([*command, "--no-wait", "--", *argv, *overrides], ray_head["env"])
    assert first.returncode == 0, first.stdout + first.stderr
    deadline = time.monotonic() + 600
    while not (registered := _registered_step(bucket, run_dir)):
        assert time.monotonic() < deadline, "no checkpoint registered in 600 s"
        time.sleep(0.5)
    os.kill(driver_pid("jobs/pretrain.py", str(tmp_path)), signal.SIGKILL)
    assert registered < STEPS, f"the kill must land mid-run (registered: step {registered})"

    out = _submit([*command, "--", *argv, *overrides], ray_head["env"])
    log = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0 and "succeeded" in out.stdout, log
    # A resume through Ray Train's restore of the run (not a restart from step 0): the second run's
    # workers start at the registered checkpoint (at most one interval lost), restored from the bucket.
    debug = tmp_path / "debug"
    starts, restores = lines(debug / "rank0-starts"), [line.split() for line in lines(debug / "rank0-restores")]
    assert starts[0] == "0" and int(starts[-1]) >= registered and len(starts) == 2, (starts, log)
    assert [(name, int(step)) for name, step, *_ in restores] == [("infra-e2e", int(starts[-1]))], restores
    assert restores[0][2].endswith(f"{run_dir}/checkpoint_{int(starts[-1]):07d}"), restores
    # Both ranks' checkpoint files landed in the bucket (rank 1 writes its data cursors and RNG state).
    final = f"{run_dir}/checkpoint_{STEPS:07d}"
    saved = {p.rsplit("/", 1)[-1] for p in bucket.find(final)}
    assert {"model.safetensors", "rank-001-of-002.json", "COMPLETE.json"} <= saved, f"checkpoint in {run_dir}: {saved}\n{log}"
    # The job ends by printing where its results are; the workers' progress lines reach the job log.
    printed = {key: re.search(rf"{key}:\s+(\S+)", out.stdout).group(1) for key in ("metrics", "report", "checkpoint")}
    assert printed["checkpoint"] == f"s3://{final}"
    # metrics.json and the PNG report sit beside the checkpoints, in the bucket.
    assert printed["metrics"] == f"s3://{run_dir}/report/metrics.json"
    assert json.loads(bucket.cat(printed["metrics"]))["step"] == STEPS
    assert bucket.cat(printed["report"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(rf"step\s+{STEPS}/{STEPS}", out.stdout), log
    assert re.search(r"peak memory \(this process and its children\): [0-9.]+ GiB PSS", out.stdout), log
