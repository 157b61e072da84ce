"""The per-worker training loop that Ray Train runs: AGD steps, grad all-reduce, eval, checkpoints.

Every worker makes the same calls in the same order: the AGD sampler is seeded identically,
eval runs on rank 0 and its metrics are broadcast, and every worker calls ``ray.train.report``
at the same steps (a mismatch hangs Train V2, ray #50874). Metrics always travel with a
checkpoint (metrics without one are not kept, ray #56718).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from imp_platform.config.train import PretrainConfig
from imp_platform.memory import reuse_large_allocations
from imp_platform.train import checkpoint as ckpt
from imp_platform.train.agd import AGDSampler, Choice
from imp_platform.train.dist import allreduce_gradients, broadcast_object, broadcast_parameters
from imp_platform.train.metrics import MetricsWindow, TensorBoardLogger, progress_line, scalar_metrics
from imp_platform.train.optim import build_optimizer, build_scheduler, clip_gradients
from imp_platform.train.tasks import resolve_model_config, run_task, task_columns, tokens_per_sample

if TYPE_CHECKING:
    from imp_platform.data.stream import BucketInfo

log = logging.getLogger(__name__)

# Tests set this (worker env) to get each attempt's pid, resume step and per-step grad digests.
DEBUG_DIR_ENV = "IMP_TRAIN_DEBUG_DIR"


def _debug(rank: int, name: str, text: str) -> None:
    """Append a line to ``$IMP_TRAIN_DEBUG_DIR/rank<r>-<name>`` (no-op unless the env var is set)."""
    root = os.environ.get(DEBUG_DIR_ENV)
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
        with open(Path(root) / f"rank{rank}-{name}", "a") as fh:
            fh.write(text + "\n")


@dataclass
class BucketPlan:
    info: BucketInfo  # the task's view: stored buckets merged where the task's columns agree in shape
    batch_size: int
    tokens_per_sample: int

    @property
    def count(self) -> int:
        return self.info.count


def plan_buckets(cfg: PretrainConfig, model: Any, datasets: dict[str, Any],
                 world_size: int = 1) -> dict[str, dict[str, BucketPlan]]:
    """task -> view -> batch size from the token budget (``batch_size_for``).

    A task's views are the stored buckets that have its columns, merged by those columns'
    shapes (``ProcessedDataset.views``): each is one uniform-shape stream for the task.
    """
    from imp_platform.data.buckets import batch_size_for

    plans: dict[str, dict[str, BucketPlan]] = {}
    for name, task in cfg.tasks.items():
        plans[name] = {}
        for info in datasets[task.split].views(task_columns(task), task.buckets):
            tps = tokens_per_sample(model, task, info.shape)
            # Never more rows than one rank's share: a batch that wraps its epoch would hold
            # the same clip twice, a false negative for NCE.
            batch = min(batch_size_for(tps, task.token_budget), info.count // world_size)
            if batch >= 2:
                plans[name][info.name] = BucketPlan(info, batch, tps)
        if not plans[name]:
            raise ValueError(f"task {name!r}: no bucket of split {task.split!r} has columns {task_columns(task)}")
    return plans


def stream_seed(run_seed: int, task: str, bucket: str) -> int:
    return (run_seed * 1_000_003 + zlib.crc32(f"{task}/{bucket}".encode())) % (2**31)


class Streams:
    """Lazily opened per-(task, bucket) resumable streams of this rank's shard."""

    def __init__(self, cfg: PretrainConfig, datasets: dict[str, Any], plans: dict[str, dict[str, BucketPlan]],
                 rank: int, world_size: int):
        self.cfg, self.datasets, self.plans = cfg, datasets, plans
        self.rank, self.world_size = rank, world_size
        self._streams: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}

    def next(self, choice: Choice) -> dict[str, Any]:
        key = f"{choice.task}/{choice.bucket}"
        if key not in self._streams:
            task, plan = self.cfg.tasks[choice.task], self.plans[choice.task][choice.bucket]
            stream = self.datasets[task.split].stream(
                plan.info, plan.batch_size, task_columns(task),
                self.rank, self.world_size, stream_seed(self.cfg.run.seed, choice.task, choice.bucket),
                shuffle_window=self.cfg.run.shuffle_batches * plan.batch_size)
            if key in self._pending:
                stream.load_state_dict(self._pending.pop(key))
            self._streams[key] = stream
        return next(self._streams[key])

    def state_dict(self) -> dict[str, Any]:
        return {**self._pending, **{k: s.state_dict() for k, s in self._streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state)


def _open_datasets(cfg: PretrainConfig, splits: set[str]) -> dict[str, Any]:
    from imp_platform.data.stream import ProcessedDataset

    return {s: ProcessedDataset.open(cfg.data.processed_path(s), storage_options=cfg.data.storage_options)
            for s in sorted(splits)}


def _threads(cfg: PretrainConfig) -> int:
    return cfg.run.threads_per_worker or max(1, math.floor(cfg.run.cpus_per_worker))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: ``config = {"cfg": PretrainConfig as a dict}``."""
    import ray.train

    from imp_platform.model import build_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = PretrainConfig.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(_threads(cfg))
    _debug(rank, "pids", str(os.getpid()))
    device = _device(cfg)
    if device.type == "cpu":
        reuse_large_allocations()  # MoE weight grads would page-fault afresh every step
    torch.manual_seed(cfg.run.seed)

    model_cfg = resolve_model_config(cfg)
    model = build_model(model_cfg).to(device)
    broadcast_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim, cfg.run.steps)

    datasets = _open_datasets(cfg, {t.split for t in cfg.tasks.values()})
    plans = plan_buckets(cfg, model, datasets, world)
    sampler = AGDSampler(cfg.agd, {n: t.rate for n, t in cfg.tasks.items()},
                         {n: {b: p.count for b, p in bp.items()} for n, bp in plans.items()})
    streams = Streams(cfg, datasets, plans, rank, world)
    history: list[dict[str, Any]] = []
    start = _restore(model, optimizer, scheduler, sampler, streams, history, rank, world)
    _debug(rank, "starts", str(start))

    evaluator = _Evaluator(cfg, device) if cfg.eval.enabled and rank == 0 else None
    tb = TensorBoardLogger(Path(cfg.run.storage_path) / cfg.run.name / "tensorboard") \
        if cfg.run.tensorboard and rank == 0 and "://" not in cfg.run.storage_path else None
    if rank == 0:
        log.info("training %s from step %d to %d on %d worker(s); buckets: %s", cfg.run.name, start,
                 cfg.run.steps, world, {t: {b: p.batch_size for b, p in bp.items()} for t, bp in plans.items()})
    window = MetricsWindow()
    if start >= cfg.run.steps:  # a rerun of a finished run: report its final state once more
        row = {**(history[-1] if history else {}), "step": cfg.run.steps}
        _report(cfg, row, cfg.run.steps, model, model_cfg, optimizer, scheduler, sampler, streams, history, rank, world)
    for step in range(start, cfg.run.steps):
        model.train()
        began = time.perf_counter()
        choices = sampler.next()
        batches = [streams.next(c) for c in choices]
        data_time = time.perf_counter() - began
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            outputs = [run_task(model, c.task, cfg.tasks[c.task], b, device) for c, b in zip(choices, batches)]
            total = sum(o.loss for o in outputs)
        total.backward()
        loss_value = float(total.detach())
        allreduce_gradients(params)
        if os.environ.get(DEBUG_DIR_ENV):
            _debug(rank, "grads", f"{step} {choices[0].task} {_grad_digest(params)!r}")
        grad_norm = clip_gradients(params, cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        window.record(
            task="+".join(c.task for c in choices), loss=loss_value,
            parts={f"{c.task}.{k}" if len(choices) > 1 else k: v for c, o in zip(choices, outputs) for k, v in o.parts.items()},
            tokens=sum(plans[c.task][c.bucket].tokens_per_sample * o.samples for c, o in zip(choices, outputs)),
            samples=sum(o.samples for o in outputs), step_time=time.perf_counter() - began, data_time=data_time,
            grad_norm=grad_norm, expert_load=_merge_loads(o.expert_load for o in outputs))
        done = step + 1
        is_report = done % cfg.run.eval_every == 0 or done == cfg.run.steps
        if done % cfg.run.log_every == 0 or is_report:
            row = window.flush(done, scheduler.get_last_lr()[0])
            if is_report:
                row.update(broadcast_object(evaluator.run(model) if evaluator else {}))
            if rank == 0:
                history.append(row)
                log.info(progress_line(row, cfg.run.steps))
                if tb:
                    tb.log(row)
            if is_report:
                _report(cfg, row, done, model, model_cfg, optimizer, scheduler, sampler, streams, history, rank, world)
                window.restart_clock()
    if tb:
        tb.close()


def _grad_digest(params: list[torch.nn.Parameter]) -> float:
    return float(sum(p.grad.double().abs().sum() + p.grad.double().sum() for p in params if p.grad is not None))


def _merge_loads(loads) -> dict[str, dict[str, list[float]]]:
    merged: dict[str, dict[str, list[float]]] = {}
    for load in loads:
        for modality, layers in load.items():
            merged.setdefault(modality, {}).update(layers)
    return merged


def _device(cfg: PretrainConfig) -> torch.device:
    if cfg.run.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _autocast(device: torch.device):
    """bf16 autocast on CUDA only (CPU autocast is slower than fp32 for these sizes)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def _restore(model, optimizer, scheduler, sampler, streams, history, rank, world) -> int:
    """Resume from Ray Train's latest checkpoint (failure restart or a rerun of the same name)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        loaded, _ = ckpt.load_model(directory)
        model.load_state_dict(loaded.state_dict())
        state = ckpt.load_train_state(directory)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        history.extend(ckpt.load_history(directory))
        cursors = ckpt.load_cursors(directory, rank, world)
        if cursors is not None:
            streams.load_state_dict(cursors)
    if rank == 0:
        log.info("resumed from %s at step %d", checkpoint.path, state["step"])
    return int(state["step"])


def _report(cfg, row, step, model, model_cfg, optimizer, scheduler, sampler, streams, history, rank, world) -> None:
    """Every rank writes its share of the checkpoint and calls report once (same count on all ranks)."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="imp-ckpt-") as tmp:
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "sampler": sampler.state_dict()}
        ckpt.save_checkpoint(tmp, rank=rank, world_size=world, cursors=streams.state_dict(), model=model,
                             model_cfg=model_cfg, cfg=cfg, train_state=state, history=history)
        ray.train.report(scalar_metrics(row), checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:07d}")


class _Evaluator:
    """Held-out zero-shot + retrieval on rank 0 (opened once, reused at each interval)."""

    def __init__(self, cfg: PretrainConfig, device: torch.device):
        from imp_platform.eval.zeroshot import HeldOut

        self.heldout = HeldOut.open(cfg, device)

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        try:
            return self.heldout.evaluate(model)
        finally:
            model.train()
