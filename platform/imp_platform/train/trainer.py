"""Build and run the Ray Train V2 ``TorchTrainer`` for a pretraining config.

``build_trainer`` is the one place that maps ``PretrainConfig.run`` onto Ray's scaling, storage,
failure and checkpoint settings, so ``pretrain`` and the tune stream's trials train identically.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imp_platform.config import ConfigError
from imp_platform.config.base import split_secrets
from imp_platform.config.train import PretrainConfig, interval_seconds
from imp_platform.train.phases import PhaseTimer

log = logging.getLogger(__name__)

PLATFORM_DIR = Path(__file__).resolve().parents[2]


@dataclass
class PretrainResult:
    checkpoint: str | None  # path (local) or URI of the latest checkpoint
    metrics: dict[str, Any]  # the last reported metrics (includes the final held-out eval)
    metrics_path: str | None = None  # metrics.json of the final eval (path or URI, beside the checkpoints)
    report_path: str | None = None  # the PNG report
    phases: PhaseTimer | None = None  # the driver's wall time per phase


def arrow_storage(path: str, storage_options: dict[str, Any] | None) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) as Ray takes storage: local paths made absolute; s3:// with options via fsspec."""
    if "://" not in path:
        return str(Path(path).resolve()), None
    if not storage_options:
        return path, None
    import pyarrow.fs

    from imp_platform.data.sources import filesystem

    fs, stripped = filesystem(path, storage_options)
    return stripped, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def build_trainer(cfg: PretrainConfig, *, callbacks: tuple = (), run_config: Any = None,
                  resume_from: str | None = None):
    """A ``TorchTrainer`` for ``cfg``; ``run_config`` (e.g. from a Tune trial) replaces the one built here.

    ``resume_from`` (a checkpoint URI of another run, e.g. a PBT donor's) is where the run starts
    while it has no checkpoint of its own: its weights and training state, this config's hyperparameters.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from imp_platform.train.loop import SECRETS_ENV, train_loop_per_worker
    from imp_platform.train.preemption import worker_callback

    cfg = cfg.with_absolute_paths()
    callbacks = (*callbacks, worker_callback())  # SIGTERM checkpoints (train/preemption.py)
    if cfg.run.num_workers == 0:
        log.warning("run.num_workers=0: Ray Train local mode runs in this process and persists no checkpoints "
                    "(nothing to resume or evaluate afterwards); use 1+ workers for a real run")
    # Credentials travel in the workers' environment, never in train_loop_config (which Ray keeps and shows).
    public, secrets = split_secrets(cfg.model_dump(mode="json"))
    if secrets:
        log.warning("credentials found in the config (%s): they reach the workers through their environment; "
                    "prefer AWS_* variables, a Kubernetes Secret or IRSA", ", ".join(sorted(secrets)))
    # Two glibc arenas: each data stream's prefetch thread otherwise gets an arena of its own that keeps
    # its high-water mark (batches are allocated there and freed by the loop), so worker memory grows
    # with every stream opened (in-process: 1.26x over 400 steps of the demo's streams; 1.08x with 2).
    env = {"MALLOC_ARENA_MAX": "2", **cfg.run.worker_env, **({SECRETS_ENV: json.dumps(secrets)} if secrets else {})}
    if run_config is None:
        storage_path, storage_fs = arrow_storage(cfg.run.storage_path, cfg.run.storage_options)
        run_config = RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=list(callbacks) or None,
            worker_runtime_env={"env_vars": env} if env else None,
        )
    else:
        run_config.callbacks = list(run_config.callbacks or []) + list(callbacks) or None
        if env:
            runtime_env = dict(run_config.worker_runtime_env or {})
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
            run_config.worker_runtime_env = runtime_env
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": public, **({"resume_from": resume_from} if resume_from else {})},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=interval_seconds(cfg.run.elastic_resize_every)),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
    )


def ensure_ray(cfg: PretrainConfig, attempts: int = 3) -> None:
    """Join the cluster Ray points us at (``ray job submit`` sets RAY_ADDRESS), else start a local one.

    Locally we declare more logical CPUs than cores, so fractional-CPU train workers and Ray
    Data's decode tasks can run side by side on a 2-core box (REFERENCE.md, Ray 2.60 facts).
    The dashboard stays on: besides the UI, it serves the State API, without which Ray Train's
    placement-group cleaner logs a warning every second or two of the run. On a machine so busy
    that the dashboard misses Ray's 60 s start-up deadline every time, the last attempt starts
    without it (a noisy log rather than a failed job).
    """
    import ray

    if ray.is_initialized():
        return
    for attempt in range(1, attempts + 1):
        dashboard = attempt < attempts
        started_before = child_pids()
        try:
            if os.environ.get("RAY_ADDRESS"):
                ray.init()
            else:
                ray.init(address="local", num_cpus=cfg.run.ray_num_cpus, include_dashboard=dashboard,
                         runtime_env={"env_vars": {"PYTHONPATH": str(PLATFORM_DIR)}})
            return
        except Exception as exc:  # a raylet that times out on a busy box: Ray raises a bare Exception
            if attempt == attempts:
                raise
            log.warning("ray.init failed (%s); retrying (%d/%d)%s", exc, attempt, attempts,
                        "" if attempt + 1 < attempts else " without the dashboard")
            ray.shutdown()
            kill_new_children(started_before)


def child_pids() -> set[int]:
    """PIDs of this process's descendants (to tell afterwards what a ``ray.init`` attempt started)."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def kill_new_children(before: set[int]) -> None:
    """Kill this process's descendants that are not in ``before``: what a failed ``ray.init`` started.

    A start-up timeout leaves the GCS, dashboard and monitor it had already started running
    (``ray.shutdown`` knows no node to stop), and each retry would add another set.
    """
    import psutil

    for proc in psutil.Process().children(recursive=True):
        if proc.pid not in before:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def _exists(url: str, storage_options: dict | None) -> bool:
    from imp_platform.data.sources import filesystem

    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def prepare_data(cfg: PretrainConfig, phases: PhaseTimer | None = None) -> bool:
    """Make the processed train and eval splits if missing: synth shards (if configured), then preprocess.

    Returns whether anything was preprocessed; ``phases`` gets the ``synth`` and ``preprocess`` times.
    """
    from imp_platform.config.pipeline import load_pipeline
    from imp_platform.data.manifest import MANIFEST_NAME
    from imp_platform.data.pipeline import preprocess

    phases = phases or PhaseTimer()
    ran = False
    for split in dict.fromkeys([cfg.data.train_split, cfg.data.eval_split, *(t.split for t in cfg.tasks.values())]):
        processed = cfg.data.processed_path(split)
        if _exists(f"{processed}/{MANIFEST_NAME}", cfg.data.storage_options):
            continue
        raw = f"{cfg.data.raw_root}/{split}"
        if not _exists(raw, cfg.data.storage_options):
            if cfg.data.synth is None:
                raise ConfigError(f"data.root: no processed split {split!r} at {processed} and no raw shards at {raw} "
                                  "(set data.synth to generate moving digits)")
            from imp_platform.data.synth import write_dataset

            samples = cfg.data.synth.test_samples if split == cfg.data.eval_split else cfg.data.synth.train_samples
            log.info("writing %d synthetic %s samples to %s", samples, split, raw)
            with phases.phase("synth"):
                write_dataset(cfg.data.raw_root, samples=samples, shards=cfg.data.synth.shards,
                              seed=cfg.data.synth.seed, split=split)
        pipeline = load_pipeline(cfg.data.pipeline, [f"source.paths=[{raw}]", f"output.path={processed}"])
        log.info("preprocessing %s -> %s", raw, processed)
        with phases.phase("preprocess"):
            preprocess(pipeline)
        ran = True
    return ran


def pretrain(cfg: PretrainConfig, phases: PhaseTimer | None = None) -> PretrainResult:
    """Prepare data, train on Ray, write metrics.json and the PNG report of the final eval.

    ``phases`` (the driver's timer) gets set-up, synth, preprocess, training and eval_report;
    the metrics JSON carries them as ``time_<phase>_s``.
    """
    import ray

    phases = phases or PhaseTimer()
    own_local_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    with phases.phase("setup"):
        ensure_ray(cfg)
    if prepare_data(cfg, phases) and own_local_ray:
        # Preprocessing leaves idle Ray workers behind (~0.5 GB each: Ray Data imported, object-store
        # pages mapped) that would sit beside training all run; on a laptop a fresh local Ray is cheaper.
        log.info("restarting the local Ray so preprocessing's idle workers do not stay beside training")
        with phases.phase("ray_restart"):
            ray.shutdown()
            ensure_ray(cfg)
    with phases.phase("training"):
        result = build_trainer(cfg).fit()
    checkpoint = result.checkpoint
    metrics = dict(result.metrics or {})
    out = PretrainResult(checkpoint=checkpoint_uri(cfg, checkpoint.path) if checkpoint else None, metrics=metrics,
                         phases=phases)
    if checkpoint is not None and cfg.eval.report:
        with phases.phase("eval_report"):
            from imp_platform.train.checkpoint import load_history, load_model

            with checkpoint.as_directory() as directory:
                history = load_history(directory)
                model, _ = load_model(directory)
            classes = None
            if cfg.eval.enabled:  # the workers report scalars; the report also wants the confusion matrices
                from imp_platform.eval.zeroshot import HeldOut

                heldout = HeldOut.open(cfg)
                metrics = {**metrics, **heldout.run(model).as_json()}
                classes = heldout.card.classes
            out.metrics_path, out.report_path = publish_report(cfg, {**metrics, **phases.metrics()}, history, classes)
    return out


def checkpoint_uri(cfg: PretrainConfig, path: str) -> str:
    """A checkpoint path as users pass it on: Ray drops the scheme when it is handed a filesystem."""
    scheme, sep, _ = cfg.run.storage_path.partition("://")
    return f"{scheme}://{path}" if sep and "://" not in path else path


def publish_report(cfg: PretrainConfig, metrics: dict[str, Any], history: list[dict[str, Any]],
                   classes: list[str] | None = None) -> tuple[str, str]:
    """metrics.json, report.png (and captions.jsonl) in ``storage_path/name/report``, beside the checkpoints,
    local or s3://."""
    import tempfile

    from imp_platform.data.sources import filesystem
    from imp_platform.eval.run import write_outputs

    target = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}/report"
    if "://" not in target:
        local = write_outputs(metrics, history, Path(target).resolve(), title=cfg.run.name, classes=classes)
        return str(local[0]), str(local[1])
    fs, base = filesystem(target, cfg.run.storage_options)
    fs.makedirs(base, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_outputs(metrics, history, tmp, title=cfg.run.name, classes=classes)
        for path in Path(tmp).iterdir():  # metrics.json, report.png and, with a decoder, captions.jsonl
            fs.put_file(str(path), f"{base}/{path.name}")
    return f"{target}/metrics.json", f"{target}/report.png"
