"""Shared fixtures: a real local Ray, a real `ray start --head`, a moto S3 server, small synth shards.

Everything here starts the real thing we ship on; nothing is mocked.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Before Ray is imported (it reads this once): workers run this interpreter directly instead of
# re-syncing the uv environment in a working-dir copy, as Ray does for a `uv run` driver.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller collects reports, sees a finished or failed worker group, only when it polls
# (every 2 s by default): the suite's short runs spend a second or two per run and per restart waiting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Logical CPUs for local Ray: more than the 2 real cores, so fractional-CPU train workers
# and Ray Data tasks can run side by side (see REFERENCE.md, "Ray 2.60 facts").
RAY_TEST_CPUS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def ensure_local_ray() -> None:
    """Start the shared local Ray (4 logical CPUs) unless this process already has one with every CPU free.

    A test that leaves CPUs reserved (an actor or placement group that outlived its run) would
    starve the next test's placement groups, which then wait forever; a fresh Ray costs seconds.
    """
    import ray

    if ray.is_initialized() and not _all_cpus_free():
        import warnings

        warnings.warn(f"local Ray: CPUs still reserved after the previous test ({ray.available_resources()}); "
                      "restarting it", stacklevel=2)
        ray.shutdown()
    from imp_platform.train.trainer import child_pids, kill_new_children

    for attempt in range(3):  # a raylet that misses Ray's fixed 30 s start-up wait on a loaded box: retry
        if ray.is_initialized():
            break
        started_before = child_pids()
        try:
            ray.init(
                address="local",
                num_cpus=RAY_TEST_CPUS,
                # As ensure_ray ships it: the dashboard serves the State API, without which Ray Train's
                # placement-group cleaner never frees the workers of a controller killed mid-run (an
                # ASHA-stopped trial), and a sweep then waits forever for CPUs.
                include_dashboard=True,
                dashboard_port=free_port(),  # not 8265: another Ray on this machine may hold it
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "platform")}},
            )
        except Exception:  # Ray raises a bare Exception for the timeout
            ray.shutdown()
            kill_new_children(started_before)
            if attempt == 2:
                raise


def _all_cpus_free(wait_s: float = 10.0) -> bool:
    """Whether the local Ray's logical CPUs all become available within ``wait_s`` (releases are asynchronous)."""
    import ray

    deadline = time.monotonic() + wait_s
    while ray.available_resources().get("CPU", 0.0) < RAY_TEST_CPUS:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture
def ray_local() -> Iterator[None]:
    """A real local Ray with 4 logical CPUs, started once and reused by later tests."""
    ensure_local_ray()
    yield


@pytest.fixture
def fresh_ray() -> Iterator[None]:
    """A newly started local Ray for a test that needs every CPU for a long time (a sweep, PBT).

    Whatever earlier tests' runs left alive (an idle Train controller, a retrying run) dies with
    the old session instead of starving this test's placement groups. Afterwards the test's own
    runs must have released every CPU: a leaked placement group fails the test, naming it.
    """
    import ray

    ray.shutdown()
    ensure_local_ray()
    yield
    if not _all_cpus_free(wait_s=60.0):
        from ray.util import placement_group_table

        free = ray.available_resources().get("CPU", 0.0)
        alive = {pg: info["bundles"] for pg, info in placement_group_table().items() if info["state"] != "REMOVED"}
        ray.shutdown()
        pytest.fail(f"{free} of {RAY_TEST_CPUS} CPUs free 60 s after the test; placement groups alive: {alive}")


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real `ray start --head` with a dashboard for `ray job submit`; stopped afterwards.

    The in-process Ray of ``ray_local`` is shut down first so the two never share a session. The head
    gets a ``RAY_TMPDIR`` of its own, so afterwards exactly its processes are killed (`ray stop` would
    stop every Ray of the user on this machine, other test runs' included).
    """
    import ray
    from ray_session import ray_tmpdir

    ray.shutdown()
    with ray_tmpdir() as ray_tmp:
        yield from _ray_head(ray_tmp)


def _ray_head(ray_tmp: Path) -> Iterator[dict[str, str]]:
    ray_bin = str(Path(sys.executable).parent / "ray")
    dash_port, gcs_port = free_port(), free_port()
    # The job driver runs `python ...` from the head's PATH: make that this project's venv.
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
           "RAY_TMPDIR": str(ray_tmp)}
    # `ray start` turns token auth on when ~/.ray/auth_token exists, but the job client only sends
    # the token with RAY_AUTH_MODE=token: mirror the head's decision for every client we start.
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in env and token.is_file():
        env["RAY_AUTH_MODE"] = "token"
    subprocess.run(
        [ray_bin, "start", "--head", f"--port={gcs_port}", f"--num-cpus={RAY_TEST_CPUS}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=180,
    )
    wait_for_port(dash_port, timeout=60)
    yield {"address": f"http://127.0.0.1:{dash_port}", "gcs": f"127.0.0.1:{gcs_port}", "ray": ray_bin, "env": env}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, object]]:
    """moto's S3 in server mode on localhost (as s3fs's own tests use), with a bucket `imp-test`.

    Yields ``endpoint_url`` and ``storage_options`` ready for s3fs / our configs.
    """
    port = free_port()
    moto_bin = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert moto_bin, "moto_server missing: the dev dependency moto[server] is required"
    proc = subprocess.Popen([moto_bin, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        storage_options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        import s3fs

        fs = s3fs.S3FileSystem(**storage_options)
        fs.mkdir("imp-test")
        yield {"endpoint_url": endpoint, "storage_options": storage_options, "bucket": "imp-test"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small moving-digits shards (train and test splits) written once per test session."""
    from imp_platform.data.synth import write_dataset

    root = tmp_path_factory.mktemp("moving_digits")
    write_dataset(root, samples=96, shards=3, seed=0, split="train")
    write_dataset(root, samples=40, shards=2, seed=0, split="test")
    return {"root": root, "train": root / "train", "test": root / "test"}


@pytest.fixture(scope="session")
def processed_root(synth_shards, tmp_path_factory) -> Path:
    """``ROOT/raw`` -> the synth shards, ``ROOT/processed/{train,test}`` preprocessed once per session."""
    from imp_platform.train.trainer import prepare_data

    ensure_local_ray()
    root = tmp_path_factory.mktemp("processed")
    (root / "raw").symlink_to(synth_shards["root"], target_is_directory=True)
    assert prepare_data(processed_config(root)), "nothing was preprocessed"
    return root


def processed_config(root: Path):
    """The pretrain config whose data lives under ``root`` (raw shards in ``root/raw``, no synth)."""
    from imp_platform.config.train import load_pretrain_config

    return load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", [
        f"data.root={root}", "data.synth=null", f"data.pipeline={REPO / 'pipelines/moving_digits.yaml'}"])


@pytest.fixture
def processed_cfg(processed_root):
    """The pretrain config of the session's ``processed_root`` data."""
    return processed_config(processed_root)


def tiny_settings(processed_root: Path, storage: Path) -> list[str]:
    """--set keys that make a run tiny: few steps, small batches, a capped held-out eval."""
    return [
        f"data.root={processed_root}", "data.synth=null",
        f"data.pipeline={REPO / 'pipelines/moving_digits.yaml'}",
        f"run.storage_path={storage}", "run.name=tiny", "run.steps=8", "run.eval_every=4",
        "run.log_every=2", "run.cpus_per_worker=0.5", "run.tensorboard=false",
        "eval.max_samples=24", "eval.batch_size=24", "optim.lr=2e-3", "schedule.warmup_steps=2",
        "agd.curriculum=[]",  # the demo's stages would confine a few-step run to its first stage
        *[f"tasks.{t}.token_budget=768" for t in ("video_text", "video_audio", "audio_text")],
        *[f"tasks.{t}.token_budget=384" for t in ("image_cls", "video_cls", "audio_cls")],
    ]


@pytest.fixture
def tiny_overrides(processed_root, tmp_path) -> list[str]:
    return tiny_settings(processed_root, tmp_path / "ray")


@pytest.fixture(scope="session")
def trained_checkpoint(processed_root, tmp_path_factory) -> str:
    """A 4-step, 1-worker Ray Train run of the tiny config, shared by the eval tests: its last checkpoint."""
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train.trainer import build_trainer

    ensure_local_ray()
    storage = tmp_path_factory.mktemp("trained") / "ray"
    cfg = load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", [
        *tiny_settings(processed_root, storage), "run.steps=4", "run.num_workers=1", "run.name=evalme"])
    result = build_trainer(cfg).fit()
    assert result.error is None, result.error
    return result.checkpoint.path


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny-tensor tests run faster on one intra-op thread, and are immune to a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
