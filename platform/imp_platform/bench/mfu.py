"""CPU model-FLOPs utilisation of a training step: counted training FLOP/s over fp32 GEMM FLOP/s.

Both are measured in this process with the same ``torch`` thread count (the recipe's threads
per worker), so the ratio says how much of what this machine's cores do on a plain matrix
product a training step gets, whatever else runs on the machine at the time. The step is
the loop's own ``forward_backward`` + AdamW step on the recipe's real batches (its buckets,
token budgets and DropToken), one task at a time, in the rates the recipe's last curriculum
stage samples them (the most sampled ones); the FLOPs are ``model.flops``' count from the shapes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from imp_platform.bench.common import time_call
from imp_platform.config.train import PretrainConfig, TaskConfig

GEMM_SIZE = 1024  # big enough that the product runs at the kernel's rate, not its call overhead


def gemm_flops_per_s(threads: int, size: int = GEMM_SIZE, repeats: int = 5) -> float:
    """fp32 ``[size, size] x [size, size]`` FLOP/s on ``threads`` intra-op threads (median of ``repeats``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        seconds = time_call(lambda: torch.mm(a, b, out=out), warmup=2, repeats=repeats)["median_s"]
    finally:
        torch.set_num_threads(previous)
    return 2.0 * size**3 / seconds


def task_step_flops(model_cfg: Any, task: TaskConfig, shapes: dict[str, list[int]], batch: int) -> float:
    """Training FLOPs of one micro-batch of ``batch`` samples of ``task`` (stored per-sample ``shapes``)."""
    from imp_platform.data import modalities as registry
    from imp_platform.model.flops import sample_train

    return batch * sum(sample_train(model_cfg, m, shapes[registry.modality(m).column], task.drop_rate(m)) for m in task.modalities)


def _task_weights(cfg: PretrainConfig, coverage: float) -> dict[str, float]:
    """The most sampled tasks of the recipe's last curriculum stage (its rates without one), most first,
    until they make ``coverage`` of its steps: each one's share of steps (of all tasks)."""
    stages = cfg.agd.curriculum
    weights = dict(stages[-1].weights) if stages else {n: t.rate for n, t in cfg.tasks.items()}
    total = sum(weights.values())
    out: dict[str, float] = {}
    for name, weight in sorted(weights.items(), key=lambda kv: -kv[1]):
        if sum(out.values()) >= coverage or weight <= 0:
            break
        out[name] = weight / total
    return out


def step_mfu(cfg: PretrainConfig, threads: int, steps: int, coverage: float = 0.75) -> dict[str, Any]:
    """Train ``cfg``'s model in this process for ``steps`` timed steps per task (after one untimed) on
    ``threads`` threads; training FLOP/s (tasks weighted by their step share) over GEMM FLOP/s.

    Only the most sampled tasks making ``coverage`` of the steps run (the demo: video_cls and
    video_text, 3/4 of its steps), which keeps the small preset's measurement short on 1 core.
    """
    from imp_platform.data.stream import ProcessedDataset
    from imp_platform.model import build_model
    from imp_platform.train.agd import Choice
    from imp_platform.train.loop import Streams, forward_backward, plan_buckets
    from imp_platform.train.optim import build_optimizer
    from imp_platform.train.parallel import apply_parallelism
    from imp_platform.train.tasks import resolve_model_config

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model_cfg = resolve_model_config(cfg)
    model = build_model(model_cfg)
    parallel = apply_parallelism(model, cfg.parallel, device)
    optimizer = build_optimizer(model, cfg.optim)
    datasets = {s: ProcessedDataset.open(cfg.data.processed_path(s), storage_options=cfg.data.storage_options)
                for s in {t.split for t in cfg.tasks.values()}}
    world = cfg.run.max_workers or 1
    plans = plan_buckets(cfg, model, datasets, world)  # one worker's batches of a `world`-worker run
    streams = Streams(cfg, datasets, plans, rank=0, world_size=world)
    tasks: dict[str, dict[str, float]] = {}
    try:
        for name, share in _task_weights(cfg, coverage).items():
            bucket, plan = max(plans[name].items(), key=lambda kv: kv[1].count)
            choice = Choice(name, bucket)
            flops = task_step_flops(model_cfg, cfg.tasks[name], plan.info.shape, plan.batch_size)
            seconds = []
            for i in range(steps + 1):
                batch = streams.next(choice)
                began = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                forward_backward(model, cfg, [choice], [[batch]], device, parallel)
                optimizer.step()
                if i:
                    seconds.append(time.perf_counter() - began)
            step_s = sum(seconds) / len(seconds)
            tasks[name] = {"share": round(share, 3), "batch": plan.batch_size,
                           "tokens": plan.batch_size * plan.tokens_per_sample, "step_flops": flops,
                           "step_s": round(step_s, 4), "flops_per_s": flops / step_s}
    finally:
        streams.close()
        torch.set_num_threads(previous)
    # The mix's FLOP/s: its expected FLOPs per step over its expected time per step.
    achieved = (sum(t["share"] * t["step_flops"] for t in tasks.values())
                / sum(t["share"] * t["step_s"] for t in tasks.values()))
    gemm = gemm_flops_per_s(threads)
    return {"preset": model_cfg.preset, "threads": threads, "steps_per_task": steps,
            "train_gflops_per_s": round(achieved / 1e9, 2), "gemm_gflops_per_s": round(gemm / 1e9, 2),
            "cpu_mfu": round(achieved / gemm, 3),
            "tasks": {n: {**t, "cpu_mfu": round(t["flops_per_s"] / gemm, 3)} for n, t in tasks.items()}}
