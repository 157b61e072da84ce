"""End to end: the pretrain RayJob's entrypoint, read from the manifest, submitted in the same form
(`ray job submit --working-dir <repo> -- ENTRYPOINT`) to a real `ray start --head`, on a tiny config.
This is also the end-to-end test of `jobs/pretrain.py` (synth -> preprocess -> train -> eval -> report).

Only the appended ``--set`` overrides differ from the cluster: CPU instead of GPU, a moto S3
server instead of the real bucket for the Ray Train storage (checkpoints written there by both
workers, read back for the final report), a local data folder, and a few steps on small
synthesized data (the manifest sets ``data.synth=null``; the overrides turn synthesis back on).
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import s3fs
from infra_manifests import REPO, entrypoint_argv, of_kind, rendered


def _tiny(tmp_path, s3: dict) -> list[str]:
    return [
        "run.use_gpu=false", "run.num_workers=2", "run.steps=4", "run.eval_every=4", "run.name=infra-e2e",
        f"run.storage_path=s3://{s3['bucket']}/runs", f"run.storage_options={json.dumps(s3['storage_options'])}",
        f"data.root={tmp_path / 'data'}",
        "data.synth.train_samples=64", "data.synth.test_samples=32", "data.synth.shards=2", "eval.max_samples=32",
    ]


def _submit(command: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent has not registered yet (the dashboard port
    opens first); that refusal happens before any job exists, so a retry cannot run it twice."""
    deadline = time.monotonic() + 90
    while True:
        out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in out.stdout + out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(2)


@pytest.mark.slow
def test_pretrain_rayjob_entrypoint_runs_through_ray_job_submit(ray_head, s3_server, tmp_path):
    (job,) = [j for j in of_kind(rendered("base"), "RayJob") if j["metadata"]["name"] == "imp-pretrain"]
    argv = entrypoint_argv(job)
    overrides = [arg for item in _tiny(tmp_path, s3_server) for arg in ("--set", item)]
    # On the cluster runtimeEnvYAML's working_dir is the image's copy of the repo; here it is the repo.
    command = [ray_head["ray"], "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
               "--", *argv, *overrides]
    out = _submit(command, ray_head["env"])
    log = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0 and "succeeded" in out.stdout, log
    # Both ranks' checkpoint files landed in the bucket (rank 1 writes its data cursors and RNG state).
    bucket = s3fs.S3FileSystem(**s3_server["storage_options"])
    run_dir = f"{s3_server['bucket']}/runs/infra-e2e"
    saved = {p.rsplit("/", 1)[-1] for p in bucket.find(f"{run_dir}/checkpoint_0000004")}
    assert {"model.safetensors", "rank-001-of-002.json", "COMPLETE.json"} <= saved, f"checkpoint in {run_dir}: {saved}\n{log}"
    # The job ends by printing where its results are; the workers' progress lines reach the job log.
    printed = {key: re.search(rf"{key}:\s+(\S+)", out.stdout).group(1) for key in ("metrics", "report", "checkpoint")}
    assert printed["checkpoint"] == f"s3://{run_dir}/checkpoint_0000004"
    # metrics.json and the PNG report sit beside the checkpoints, in the bucket.
    assert printed["metrics"] == f"s3://{run_dir}/report/metrics.json"
    assert json.loads(bucket.cat(printed["metrics"]))["step"] == 4
    assert bucket.cat(printed["report"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"step\s+4/4", out.stdout), log
    assert re.search(r"peak memory \(this process and its children\): [0-9.]+ GiB PSS", out.stdout), log
