"""The per-worker training loop that Ray Train runs: AGD steps, grad sync, eval, checkpoints.

The model is laid out as ``parallel:`` says (train/parallel.py: replicated or FSDP2, expert
parallel, checkpointed, compiled). A task with ``global_token_budget`` accumulates grads over
micro-batches so its step's batch does not depend on the worker count. Metrics stay tensors
until the log interval: the step's one host sync is the all-rank finite check below.

Every worker makes the same calls in the same order: the AGD sampler is seeded identically,
eval runs on rank 0 and its metrics are broadcast, and every worker calls ``ray.train.report``
at the same steps (a mismatch hangs Train V2, ray #50874). Metrics always travel with a
checkpoint (metrics without one are not kept, ray #56718).

Checkpoints are taken every ``run.checkpoint_every`` (steps, or wall-clock time such as "10m"),
at every eval, at the end and at the step after a SIGTERM (train/preemption.py), with each
rank's RNG states and stream cursors, so a resumed run computes what an uninterrupted one would
have. With ``parallel.async_checkpoint`` a checkpoint's shards are written while the next steps
run; Ray Train gets it once written (at the next checkpoint, at the end, at once on SIGTERM).
A step whose loss (on any rank) or averaged gradient is not finite is skipped
on every rank: no optimizer update (the lr schedule still advances: it is a function of the
step, and the skipped batch is lost data, not a pause); ``run.max_nonfinite_skips`` in a row
stop the run with an error naming the tasks and buckets.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from imp_platform.config.train import PretrainConfig, TaskConfig
from imp_platform.memory import release_free_heap, reuse_large_allocations
from imp_platform.train import checkpoint as ckpt
from imp_platform.train import preemption
from imp_platform.train.agd import AGDSampler, Choice
from imp_platform.train.dist import broadcast_object, broadcast_parameters, is_distributed
from imp_platform.train.metrics import MetricsWindow, TensorBoardLogger, progress_line, scalar_metrics
from imp_platform.train.optim import build_optimizer, build_scheduler
from imp_platform.train.parallel import Parallelism, apply_parallelism, full_state_dict, local, set_gradient_sync
from imp_platform.train.tasks import TaskOutput, resolve_model_config, run_task, task_columns, tokens_per_sample

if TYPE_CHECKING:
    from imp_platform.data.stream import BucketInfo

log = logging.getLogger(__name__)

# Tests set this (worker env) to get each attempt's pid, resume step and per-step grad/weight digests.
DEBUG_DIR_ENV = "IMP_TRAIN_DEBUG_DIR"
# The config's credentials ({dotted.key: value}), set by ``build_trainer`` in the workers' environment.
SECRETS_ENV = "IMP_CONFIG_SECRETS"


def with_worker_secrets(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` (redacted in ``train_loop_config``) with the credentials from ``$IMP_CONFIG_SECRETS`` put back."""
    import json

    from imp_platform.config.base import merge_secrets

    secrets = os.environ.get(SECRETS_ENV)
    if not secrets:
        return cfg
    return PretrainConfig.model_validate(merge_secrets(cfg.model_dump(mode="json"), json.loads(secrets)))


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
    batch_size: int  # one worker's micro-batch
    tokens_per_sample: int
    accum: int = 1  # micro-batches per optimizer step (gradient accumulation)

    @property
    def count(self) -> int:
        return self.info.count


def plan_buckets(cfg: PretrainConfig, model: Any, datasets: dict[str, Any],
                 world_size: int = 1) -> dict[str, dict[str, BucketPlan]]:
    """task -> view -> batch size from the token budget (``batch_size_for``).

    A task's views are the stored buckets that have its columns, merged by those columns'
    shapes (``ProcessedDataset.views``): each is one uniform-shape stream for the task.
    """
    plans: dict[str, dict[str, BucketPlan]] = {}
    for name, task in cfg.tasks.items():
        plans[name] = {}
        for info in datasets[task.split].views(task_columns(task), task.buckets):
            tps = tokens_per_sample(model, task, info.shape)
            batch, accum = micro_batching(tps, task, info.count, world_size)
            if batch >= 2:
                plans[name][info.name] = BucketPlan(info, batch, tps, accum)
        if not plans[name]:
            raise ValueError(f"task {name!r}: no bucket of split {task.split!r} has columns {task_columns(task)}")
    return plans


def micro_batching(tokens_per_sample: int, task: TaskConfig, rows: int, world_size: int) -> tuple[int, int]:
    """(one worker's micro-batch, micro-batches per step) of a bucket of ``rows`` samples.

    Without ``global_token_budget`` a worker's batch is its ``token_budget`` and there is no
    accumulation. With it, the step's batch over all workers is fixed by the recipe and split
    into ``world_size x accum`` equal micro-batches no bigger than ``token_budget`` each, so the
    same config takes the same optimizer steps on any worker count. A micro-batch never holds
    more rows than one rank's share: a batch that wraps its epoch would hold the same clip
    twice, a false negative for NCE.
    """
    from imp_platform.data.buckets import batch_size_for

    cap = min(batch_size_for(tokens_per_sample, task.token_budget), rows // world_size)
    if task.global_token_budget is None or cap < 1:
        return cap, 1
    step_batch = batch_size_for(tokens_per_sample, task.global_token_budget)
    accum = math.ceil(step_batch / (world_size * cap))
    return step_batch // (world_size * accum), accum


def stream_seed(run_seed: int, task: str, bucket: str) -> int:
    return (run_seed * 1_000_003 + zlib.crc32(f"{task}/{bucket}".encode())) % (2**31)


class Streams:
    """Per-(task, bucket) resumable streams of this rank's shard, opened lazily, at most ``max_open`` at once.

    Each open stream holds a prefetch thread, two shuffle windows and its parquet file handles;
    the least recently used one is closed past ``max_open`` (its position kept, so it reopens
    exactly where it was).
    """

    def __init__(self, cfg: PretrainConfig, datasets: dict[str, Any], plans: dict[str, dict[str, BucketPlan]],
                 rank: int, world_size: int):
        self.cfg, self.datasets, self.plans = cfg, datasets, plans
        self.rank, self.world_size = rank, world_size
        self._streams: OrderedDict[str, Any] = OrderedDict()
        self._pending: dict[str, list[dict[str, Any]]] = {}  # key -> saved states (of every rank, any world size)

    def next(self, choice: Choice) -> dict[str, Any]:
        key = f"{choice.task}/{choice.bucket}"
        if key not in self._streams:
            self._streams[key] = self._open(key)
            self._pending.pop(key, None)
            while len(self._streams) > self.cfg.run.max_open_streams:
                cold, stream = self._streams.popitem(last=False)
                self._pending[cold] = [stream.state_dict()]
                stream.close()
        self._streams.move_to_end(key)
        return next(self._streams[key])

    def _open(self, key: str) -> Any:
        """A stream of ``key``, continued from its saved states if there are any."""
        task_name, bucket = key.split("/", 1)
        task, plan = self.cfg.tasks[task_name], self.plans[task_name][bucket]
        stream = self.datasets[task.split].stream(
            plan.info, plan.batch_size, task_columns(task),
            self.rank, self.world_size, stream_seed(self.cfg.run.seed, task_name, bucket),
            shuffle_window=self.cfg.run.shuffle_batches * plan.batch_size)
        if key in self._pending:
            stream.resume(self._pending[key])
        return stream

    def _pending_state(self, key: str) -> dict[str, Any]:
        """This rank's position in a stream not opened since the resume (or closed as cold)."""
        for state in self._pending[key]:
            if (state["rank"], state["world_size"]) == (self.rank, self.world_size):
                return state
        stream = self._open(key)  # saved by another world size: resolve our share of it
        try:
            return stream.state_dict()
        finally:
            stream.close()

    def state_dict(self) -> dict[str, Any]:
        return {**{k: self._pending_state(k) for k in self._pending},
                **{k: s.state_dict() for k, s in self._streams.items()}}

    def load_state_dict(self, states: dict[str, list[dict[str, Any]]]) -> None:
        """``key -> [state of each rank that saved it]`` (from every rank's file of a checkpoint).

        A bucket this world size does not plan (too few rows per rank for a batch) is dropped.
        """
        planned = {f"{task}/{bucket}" for task, buckets in self.plans.items() for bucket in buckets}
        self._pending = {k: list(v) for k, v in states.items() if k in planned}

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()


def _open_datasets(cfg: PretrainConfig, splits: set[str]) -> dict[str, Any]:
    from imp_platform.data.stream import ProcessedDataset

    return {s: ProcessedDataset.open(cfg.data.processed_path(s), storage_options=cfg.data.storage_options)
            for s in sorted(splits)}


def worker_threads(cfg: PretrainConfig) -> int:
    """Intra-op threads of each train worker (``platform bench train`` measures its MFU with as many)."""
    return cfg.run.threads_per_worker or max(1, math.floor(cfg.run.cpus_per_worker))


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped steps; stops the run after ``limit`` in a row, naming what they ran."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total, self._streak = limit, 0, []

    def passed(self) -> None:
        self._streak = []

    def skipped(self, step: int, choices: list[Choice]) -> None:
        self.total += 1
        self._streak.append(f"step {step}: " + ", ".join(f"task {c.task} bucket {c.bucket}" for c in choices))
        log.warning("non-finite loss or gradient at %s: step skipped (%d in a row)",
                    self._streak[-1], len(self._streak))
        if len(self._streak) >= self.limit:
            raise NonFiniteError(f"{len(self._streak)} consecutive steps had a non-finite loss or gradient "
                                 f"(run.max_nonfinite_skips={self.limit}): " + "; ".join(self._streak))

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "streak": list(self._streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self._streak = int(state["total"]), list(state["streak"])


def _any_rank(values: tuple[torch.Tensor, ...], flags: list[bool]) -> list[bool]:
    """[any of ``values`` not finite, *flags], each true on every rank if true on any rank: the step's one host sync."""
    nonfinite = torch.stack([~torch.isfinite(v.detach().float()).all() for v in values]).any().reshape(1)
    flag = torch.cat([nonfinite, torch.tensor(flags, dtype=torch.bool, device=nonfinite.device)]).float()
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return [bool(x) for x in flag.tolist()]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: ``config = {"cfg": PretrainConfig as a dict}`` (credentials come from the worker env)."""
    import ray.train

    from imp_platform.model import build_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = with_worker_secrets(PretrainConfig.model_validate(config["cfg"]))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(worker_threads(cfg))
    _debug(rank, "pids", str(os.getpid()))
    device = _device(cfg)
    if device.type == "cpu":
        reuse_large_allocations()  # MoE weight grads would page-fault afresh every step
    _seed_everything(cfg.run.seed)

    model_cfg = resolve_model_config(cfg)
    model = build_model(model_cfg).to(device)
    from imp_platform.model.init import init_model  # model.init_from / freeze; a resume loads its own weights later

    resume_from = config.get("resume_from")  # another run's checkpoint (a PBT donor's), see build_trainer
    init_model(model, cfg.model, model_cfg, cfg.run.storage_options,
               resuming=ray.train.get_checkpoint() is not None or resume_from is not None)
    broadcast_parameters(model)
    parallel = apply_parallelism(model, cfg.parallel, device)
    sharded, params = parallel.sharded, parallel.params
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim, cfg.run.steps)

    datasets = _open_datasets(cfg, {t.split for t in cfg.tasks.values()})
    plans = plan_buckets(cfg, model, datasets, world)
    sampler = AGDSampler(cfg.agd, {n: t.rate for n, t in cfg.tasks.items()},
                         {n: {b: p.count for b, p in bp.items()} for n, bp in plans.items()})
    streams = Streams(cfg, datasets, plans, rank, world)
    guard = NonFiniteGuard(cfg.run.max_nonfinite_skips)
    history: list[dict[str, Any]] = []
    state = _TrainState(model, model_cfg, optimizer, scheduler, sampler, streams, guard, history, cfg, rank, world,
                        sharded, ckpt.async_checkpoint_group() if sharded and cfg.parallel.async_checkpoint else None)
    start = state.restore(resume_from)
    _debug(rank, "starts", str(start))

    evaluator = _Evaluator(cfg, device, model_cfg if sharded else None) if cfg.eval.enabled and rank == 0 else None
    tb = TensorBoardLogger(Path(cfg.run.storage_path) / cfg.run.name / "tensorboard") \
        if cfg.run.tensorboard and rank == 0 and "://" not in cfg.run.storage_path else None
    if rank == 0:
        log.info("training %s from step %d to %d on %d worker(s); buckets: %s", cfg.run.name, start,
                 cfg.run.steps, world, {t: {b: p.batch_size for b, p in bp.items()} for t, bp in plans.items()})
        if start >= cfg.run.steps:  # nothing re-reported: a registered checkpoint is never rewritten
            log.info("%s already reached step %d: nothing to do", cfg.run.name, start)
    window = MetricsWindow()
    clock = ckpt.CheckpointClock(cfg.run.checkpoint_steps, cfg.run.checkpoint_seconds)
    preemption.arm()
    try:
        for step in range(start, cfg.run.steps):
            model.train()
            began = time.perf_counter()
            choices = sampler.next()
            batches = [[streams.next(c) for _ in range(plans[c.task][c.bucket].accum)] for c in choices]
            data_time = time.perf_counter() - began
            optimizer.zero_grad(set_to_none=True)
            outputs, loss, grad_norm = forward_backward(model, cfg, choices, batches, device, parallel)
            # The averaged grads (so their norm) agree on every rank; the loss is each rank's own.
            # SIGTERM on any rank, or any rank's checkpoint time up: every rank checkpoints this step.
            nonfinite, stop, time_up = _any_rank((loss, grad_norm), [preemption.requested(), clock.time_up()])
            if nonfinite:
                guard.skipped(step, choices)
            else:
                guard.passed()
                optimizer.step()
                # realised mix (tune): applied steps only
                sampler.mix.add_samples({c.task: o.samples * world for c, o in zip(choices, outputs)})
                window.record(
                    task="+".join(c.task for c in choices), loss=loss,
                    parts={f"{c.task}.{k}" if len(choices) > 1 else k: v
                           for c, o in zip(choices, outputs) for k, v in o.parts.items()},
                    tokens=sum(plans[c.task][c.bucket].tokens_per_sample * o.samples for c, o in zip(choices, outputs)),
                    samples=sum(o.samples for o in outputs), step_time=time.perf_counter() - began,
                    data_time=data_time, grad_norm=grad_norm, expert_load=_merge_loads(o.expert_load for o in outputs))
            scheduler.step()
            if os.environ.get(DEBUG_DIR_ENV):
                _debug(rank, "grads", f"{step} {choices[0].task} {_digest(local(p.grad for p in params))!r} "
                                      f"{_digest(local(params))!r}")
            done = step + 1
            is_eval = done % cfg.run.eval_every == 0 or done == cfg.run.steps
            is_report = is_eval or stop or time_up or clock.step_due(done)
            if done % cfg.run.log_every == 0 or is_report:
                extra = {}
                if is_eval:
                    extra.update(_evaluate(evaluator, model, sharded))
                if is_report:
                    extra.update(sampler.mix.metrics())  # steps_frac_<task>, samples_<task> since step 0
                release_free_heap()  # so the row's PSS is the memory held, not the heap's free space
                row = _row(window, done, scheduler.get_last_lr()[0], guard, extra)
                if rank == 0:
                    history.append(row)
                    log.info(progress_line(row, cfg.run.steps))
                    if tb:
                        tb.log(row)
            if is_report:
                state.report(row, done, wait=stop)  # a preempted worker leaves only once it is written
                window.restart_clock()
                clock.restart()
            if stop and done < cfg.run.steps:
                _debug(rank, "preempted", str(done))
                preemption.leave(done)
        state.finish_pending()
    finally:
        preemption.disarm()
        state.discard_pending()
        streams.close()
        if tb:
            tb.close()


def forward_backward(model: torch.nn.Module, cfg: PretrainConfig, choices: list[Choice],
                     batches: list[list[dict[str, Any]]], device: torch.device,
                     parallel: Parallelism) -> tuple[list[TaskOutput], torch.Tensor, torch.Tensor]:
    """Forward and backward each task's micro-batches (``batches[i]``: task ``i``'s), average grads
    over ranks and clip them.

    Each micro-batch's loss is divided by the task's micro-batch count, so accumulating gives the
    mean over the step's batch; FSDP reduces grads only after the last micro-batch. Returns
    (each task's output, averaged over its micro-batches; the step's loss on this rank; the
    global grad norm before clipping, the same on every rank), all tensors: nothing here waits
    on the device.
    """
    outputs: list[TaskOutput] = []
    for i, (choice, micro) in enumerate(zip(choices, batches, strict=True)):
        done: list[TaskOutput] = []
        for j, batch in enumerate(micro):
            set_gradient_sync(model, i == len(choices) - 1 and j == len(micro) - 1)
            with _autocast(device):
                out = run_task(model, choice.task, cfg.tasks[choice.task], batch, device)
            (out.loss / len(micro)).backward()
            done.append(out)
        outputs.append(_mean_output(done))
    loss = torch.stack([o.loss for o in outputs]).sum()
    return outputs, loss, parallel.sync_and_clip(cfg.optim.grad_clip)


def _mean_output(outs: list[TaskOutput]) -> TaskOutput:
    """One task's micro-batch outputs as one: mean loss, parts and expert load (detached), summed samples."""
    def mean(values):
        return torch.stack(list(values)).mean(0)

    return TaskOutput(
        loss=mean(o.loss.detach() for o in outs),
        parts={k: mean(o.parts[k] for o in outs) for k in outs[0].parts},
        samples=sum(o.samples for o in outs),
        expert_load={m: {layer: mean(o.expert_load[m][layer] for o in outs) for layer in layers}
                     for m, layers in outs[0].expert_load.items()})


def _evaluate(evaluator: _Evaluator | None, model: torch.nn.Module, sharded: bool) -> dict[str, Any]:
    """Rank 0's held-out metrics on every rank; a sharded model is gathered first (every rank takes part)."""
    state = full_state_dict(model) if sharded else None
    return broadcast_object(evaluator.run(model, state) if evaluator else {})


def _row(window: MetricsWindow, done: int, lr: float, guard: NonFiniteGuard, extra: dict[str, Any]) -> dict[str, Any]:
    """One logged row: the window's averages, run-wide counters, then ``extra`` (eval, task mix)."""
    row = window.flush(done, lr)
    row["nonfinite_skips"] = guard.total
    row["worker_pss_mb"] = _gather_pss()
    row.update(extra)
    return row


def _gather_pss() -> list[float]:
    """Each rank's proportional set size in MiB (rank order): the per-worker memory the benchmark tracks."""
    import psutil

    pss = torch.tensor([psutil.Process().memory_full_info().pss / 2**20], dtype=torch.float64)
    if not is_distributed():
        return [round(float(pss), 1)]
    import torch.distributed as dist

    gathered = [torch.zeros_like(pss) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, pss)
    return [round(float(t), 1) for t in gathered]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _digest(tensors) -> float:
    """A bit-sensitive fingerprint of tensors (debug lines: identical ranks and resumes)."""
    return float(sum(t.double().abs().sum() + t.double().sum() for t in tensors if t is not None))


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


@dataclass
class _TrainState:
    """Everything a checkpoint saves and a resume restores, in one place."""

    model: torch.nn.Module
    model_cfg: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: AGDSampler
    streams: Streams
    guard: NonFiniteGuard
    history: list[dict[str, Any]]
    cfg: PretrainConfig
    rank: int
    world: int
    sharded: bool  # FSDP or expert-parallel: model and optimizer state go through DCP, every rank its shards
    async_group: Any = None  # parallel.async_checkpoint: the process group of the background shard writes
    _pending: tuple[ckpt.PendingCheckpoint, dict[str, Any], int] | None = field(default=None, init=False)

    def restore(self, resume_from: str | None = None) -> int:
        """Resume from Ray Train's latest checkpoint (failure restart or a rerun of the same name); the step.

        A run without one starts from ``resume_from`` if given (another run's checkpoint URI): its
        weights and training state, with this run's optimizer hyperparameters (a PBT exploit).
        """
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        adopted = checkpoint is None and resume_from is not None
        if adopted:
            checkpoint = ckpt.ray_checkpoint(resume_from, self.cfg.run.storage_options)
        if checkpoint is None:
            return 0
        own_hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        with checkpoint.as_directory() as directory:
            state, ranks = ckpt.open_for_resume(directory)
            ckpt.load_training_state(directory, state, self.model, self.optimizer)  # saved in any layout
            self.scheduler.load_state_dict(state["scheduler"])
            if adopted:
                self._use_hyperparameters(own_hyperparameters)
            self.sampler.load_state_dict(state["sampler"])
            self.guard.load_state_dict(state["nonfinite"])
            self.history.extend(ckpt.load_history(directory))
        step = int(state["step"])
        cursors: dict[str, list[dict[str, Any]]] = {}
        for saved in ranks:
            for key, cursor in saved["cursors"].items():
                cursors.setdefault(key, []).append(cursor)
        self.streams.load_state_dict(cursors)
        own = [r for r in ranks if (r["rank"], r["world_size"]) == (self.rank, self.world)]
        if own:
            ckpt.set_rng_state(own[0]["rng"])
        else:  # another world size wrote it: a fresh, step-derived seed per rank
            _seed_everything(self.cfg.run.seed * 1_000_003 + step * 1009 + self.rank)
        if self.rank == 0:
            log.info("resumed from %s at step %d (saved by %d worker(s))", checkpoint.path, step, len(ranks))
        if os.environ.get(DEBUG_DIR_ENV):  # which checkpoint, at which step, with which weights
            _debug(self.rank, "restores", f"{self.cfg.run.name} {step} {checkpoint.path} "
                                          f"{_digest(local(p.detach() for p in self.model.parameters()))!r}")
        return step

    def _use_hyperparameters(self, groups: list[dict[str, Any]]) -> None:
        """Put this run's lr, betas, eps and decay back over an adopted optimizer state (moments and step kept),
        and the lr its schedule gives at the adopted step."""
        for group, own in zip(self.optimizer.param_groups, groups):
            group.update(own)
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)

    def report(self, row: dict[str, Any], step: int, wait: bool = False) -> None:
        """Every rank writes its share of the checkpoint and calls report once (same count on all ranks).

        With ``async_group`` the shards are written while training goes on, and the checkpoint is
        reported (with ``row``) by ``finish_pending``: at the next checkpoint, at the end, or now if
        ``wait``. Ray Train only ever sees complete checkpoints.
        """
        self.finish_pending()
        tmp = tempfile.mkdtemp(prefix="imp-ckpt-")
        train_state = {"step": step, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                       "nonfinite": self.guard.state_dict()}
        if not self.sharded:
            train_state["optimizer"] = self.optimizer.state_dict()
        rank_state = {"rank": self.rank, "world_size": self.world, "step": step,
                      "cursors": self.streams.state_dict(), "rng": ckpt.rng_state()}
        self._pending = (ckpt.start_checkpoint(
            tmp, rank=self.rank, world_size=self.world, rank_state=rank_state, model=self.model,
            model_cfg=self.model_cfg, cfg=self.cfg, train_state=train_state, history=self.history,
            optimizer=self.optimizer if self.sharded else None, async_group=self.async_group), row, step)
        if wait or self.async_group is None:
            self.finish_pending()

    def finish_pending(self) -> None:
        """Wait for the checkpoint being written, if any, and report it to Ray Train."""
        import ray.train
        from ray.train import Checkpoint

        if self._pending is None:
            return
        pending, row, step = self._pending
        try:
            ray.train.report(scalar_metrics(row), checkpoint=Checkpoint.from_directory(pending.finish()),
                             checkpoint_dir_name=f"checkpoint_{step:07d}")
        finally:
            self.discard_pending()

    def discard_pending(self) -> None:
        """Drop the checkpoint being written, if any (reported, or the run failed): its write is waited for,
        then the local directory deleted."""
        if self._pending is not None:
            pending, _, _ = self._pending
            self._pending = None
            pending.wait()
            shutil.rmtree(pending.directory, ignore_errors=True)


class _Evaluator:
    """Held-out zero-shot + retrieval on rank 0 (opened once, reused at each interval).

    A sharded (FSDP) run evaluates an unsharded replica (``model_cfg`` given) loaded with the
    gathered weights: rank 0 alone cannot run a sharded model.
    """

    def __init__(self, cfg: PretrainConfig, device: torch.device, model_cfg: Any = None):
        from imp_platform.eval.zeroshot import HeldOut
        from imp_platform.model import build_model

        self.heldout = HeldOut.open(cfg, device)
        self.replica = build_model(model_cfg).to(device) if model_cfg is not None else None

    def run(self, model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        if state is not None:
            self.replica.load_state_dict(state)
            model = self.replica
        model.eval()
        try:
            return self.heldout.evaluate(model)
        finally:
            model.train()
