"""``platform bench scale``: data-parallel layouts at 1 and 2 CPU workers (gloo), no Ray, synthetic batches.

Each worker count runs in one group of processes that holds both layouts (``replicate`` and
``fsdp``) and alternates timed rounds between them, so a busy machine slows both alike (a paired
comparison). Per layout and worker count: tokens/s per worker; bytes sent through collectives
per step, counted from the tensors handed to ``torch.distributed`` (all-reduce, all-gather,
reduce-scatter, broadcast, all-to-all); the parameters + grads + AdamW state a worker holds; and
the peak RSS growth over building the model and two steps, each layout in fresh processes
(``/proc/self/status`` VmHWM: CPU has no allocator peak counter), at the largest worker count.

``weak_scaling_efficiency``: tokens/s per worker at 2 workers over 1 (same micro-batch per worker).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imp_platform.bench.common import write_results

log = logging.getLogger(__name__)

LAYOUTS = ("fsdp", "replicate")
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_gather",
               "all_to_all_single")
ROWS = 8  # samples per worker and step (weak scaling: fixed per worker)


def _config(preset: str):
    from imp_platform.config import validate
    from imp_platform.config.train import PretrainConfig

    return validate(PretrainConfig, {"model": {"preset": preset, "moe": True}, "tasks": {
        "vt": {"modalities": ["video", "text"], "objectives": [{"kind": "nce"}]}}})


def _batch(rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rank)
    return {"video": rng.integers(0, 255, (ROWS, 8, 32, 32, 3), dtype=np.uint8),
            "text_ids": rng.integers(1, 100, (ROWS, 16)), "text_mask": np.ones((ROWS, 16), dtype=bool)}


@contextmanager
def _counted(sent: list[int]):
    """Add the bytes of every tensor handed to a ``torch.distributed`` collective to ``sent``."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            given = [a for a in args if isinstance(a, torch.Tensor)]
            tensor = kwargs.get("input", kwargs.get("tensor", given[-1] if given else None))  # what this rank sends
            sent.append(tensor.numel() * tensor.element_size() if tensor is not None else 0)
            return originals[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _peak_rss_reset() -> int:
    """Reset the process's RSS high-water mark; the RSS now (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class _Arm:
    """One layout's model, optimizer and step on this rank."""

    def __init__(self, layout: str, preset: str) -> None:
        from imp_platform.config.train import ParallelConfig
        from imp_platform.model import build_model
        from imp_platform.train.agd import Choice
        from imp_platform.train.optim import build_optimizer
        from imp_platform.train.parallel import apply_parallelism
        from imp_platform.train.tasks import resolve_model_config, tokens_per_sample

        self.cfg = _config(preset)
        torch.manual_seed(0)
        self.model = build_model(resolve_model_config(self.cfg))
        self.plan = apply_parallelism(self.model, ParallelConfig(data=layout), torch.device("cpu"))
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.choice = Choice("vt", "b")
        shapes = {"video": [8, 32, 32, 3], "text_ids": [16]}
        self.tokens = ROWS * tokens_per_sample(self.model, self.cfg.tasks["vt"], shapes)

    def step(self, batch: dict[str, np.ndarray]) -> None:
        from imp_platform.train.loop import forward_backward

        self.optimizer.zero_grad(set_to_none=True)
        forward_backward(self.model, self.cfg, [self.choice], [[batch]], torch.device("cpu"), self.plan)
        self.optimizer.step()

    def state_bytes(self) -> int:
        """Parameters, grads and optimizer state this rank holds (its shards only)."""
        from imp_platform.train.parallel import local

        tensors = [*self.plan.params, *(p.grad for p in self.plan.params)]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in local(tensors) if t is not None)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _speed_worker(rank: int, world: int, port: int, preset: str, rounds: int, steps: int, out: str) -> None:
    """Both layouts alive, timed rounds alternating; the collective bytes of one step of each."""
    _init(rank, world, port)
    try:
        batch = _batch(rank)
        arms = {layout: _Arm(layout, preset) for layout in LAYOUTS}
        result = {layout: {"seconds": 0.0, "tokens": 0} for layout in LAYOUTS}
        for layout, arm in arms.items():
            arm.step(batch)
            sent: list[int] = []
            with _counted(sent):
                arm.step(batch)
            result[layout].update(bytes_per_step=sum(sent), state_mb=arm.state_bytes() / 2**20)
        for _ in range(rounds):
            for layout, arm in arms.items():
                dist.barrier()
                began = time.perf_counter()
                for _ in range(steps):
                    arm.step(batch)
                result[layout]["seconds"] += time.perf_counter() - began
                result[layout]["tokens"] += steps * arm.tokens
        if rank == 0:
            torch.save(result, Path(out) / f"speed{world}.pt")
    finally:
        dist.destroy_process_group()


def _memory_worker(rank: int, world: int, port: int, preset: str, layout: str, out: str) -> None:
    """Peak RSS growth of building one layout's model and taking two steps, in a fresh process."""
    _init(rank, world, port)
    try:
        batch = _batch(rank)
        before = _peak_rss_reset()
        arm = _Arm(layout, preset)
        for _ in range(2):
            arm.step(batch)
        if rank == 0:
            torch.save({"peak_rss_growth_mb": (_status("VmHWM") - before) / 2**20}, Path(out) / f"mem-{layout}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(quick: bool, out: Path, preset: str = "tiny") -> dict[str, Any]:
    rounds, steps = (2, 2) if quick else (4, 5)
    worlds = (1, 2)
    top = f"workers_{worlds[-1]}"
    layouts: dict[str, dict[str, Any]] = {layout: {} for layout in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="imp-bench-scale-") as tmp:
        for world in worlds:
            log.info("speed, %d worker(s): %d rounds x %d steps per layout", world, rounds, steps)
            mp.spawn(_speed_worker, args=(world, _free_port(), preset, rounds, steps, tmp), nprocs=world, join=True)
            speed = torch.load(Path(tmp) / f"speed{world}.pt", weights_only=True)
            for layout, got in speed.items():
                layouts[layout][f"workers_{world}"] = {
                    "tokens_per_s_per_worker": round(got["tokens"] / got["seconds"], 1),
                    "collective_bytes_per_step": int(got["bytes_per_step"]),
                    "state_mb_per_worker": round(got["state_mb"], 2)}
        for layout in LAYOUTS:
            log.info("memory, %s on %d workers", layout, worlds[-1])
            mp.spawn(_memory_worker, args=(worlds[-1], _free_port(), preset, layout, tmp), nprocs=worlds[-1], join=True)
            memory = torch.load(Path(tmp) / f"mem-{layout}.pt", weights_only=True)
            layouts[layout][top]["peak_rss_growth_mb_per_worker"] = round(memory["peak_rss_growth_mb"], 1)

    def ratio(layout: str, key: str, den: str = "workers_1", base: str | None = None) -> float:
        a, b = layouts[layout][top][key], layouts[base or layout][den][key]
        return round(a / b, 3) if b else float("nan")

    results = {
        "config": {"preset": preset, "moe": True, "rows_per_worker": ROWS, "rounds": rounds, "steps": steps,
                   "workers": list(worlds), "note": "gloo on CPU, one torch thread per worker; paired rounds"},
        "layouts": layouts,
        "weak_scaling_efficiency": ratio("replicate", "tokens_per_s_per_worker"),
        "weak_scaling_efficiency_fsdp": ratio("fsdp", "tokens_per_s_per_worker"),
        "fsdp_speed_ratio_vs_replicate": ratio("fsdp", "tokens_per_s_per_worker", den=top, base="replicate"),
        "fsdp_peak_mem_ratio_vs_replicate": ratio("fsdp", "peak_rss_growth_mb_per_worker", den=top, base="replicate"),
        "fsdp_state_mem_ratio_vs_replicate": ratio("fsdp", "state_mb_per_worker", den=top, base="replicate"),
        "fsdp_bytes_ratio_vs_replicate": ratio("fsdp", "collective_bytes_per_step", den=top, base="replicate"),
    }
    return write_results(out, "scale", results)
