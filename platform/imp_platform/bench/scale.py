"""``platform bench scale``: replicate, FSDP and FSDP + expert parallel at 1, 2 and 4 CPU workers
(gloo), no Ray, synthetic batches.

Speed (``layouts``, on ``SPEED_PRESET``): each worker count runs in one group of processes that
holds every layout it can run (``fsdp+ep`` needs a worker count that ``EXPERT`` divides) and
alternates timed rounds between them, so a busy machine slows all alike (a paired comparison).
Per layout and worker count: tokens/s per worker; the bytes of one step's collectives
(all-reduce, all-gather, reduce-scatter, broadcast, all-to-all, as ``torch.distributed`` calls
that FSDP, expert parallelism and the replicated all-reduce make), counted from the tensors
handed over (``collective_bytes_per_step``) and as sent on the wire by a ring / pairwise
algorithm (``wire_bytes_per_step``, per collective in ``wire_bytes_by_collective``); and the
parameters + grads + AdamW state a worker holds (``state_mb_per_worker``, from the live tensors).

Memory (``memory``, on ``--preset``) per worker at the largest worker count, in a fresh process
group (the largest speed group, before its rounds, when the presets are the same), each layout
built, stepped, measured and dropped in turn:

- ``peak_tensor_mb_per_worker``: the peak of live tensor bytes in two training steps (the
  profiler's allocation and free events, as ``tests/model/test_plan.py`` measures the plan),
  counting what the layout holds going in (its shards of parameters; built and sharded before).
  Nearly independent of load (two runs of the small preset: within 5%); the ratios and the plan use it.
- ``setup_peak_tensor_mb_per_worker``: the same over building the model and applying the layout.
  Every layout builds the whole model on every worker before sharding it, so this is about the
  full fp32 parameters for all of them: kept apart so it does not swamp the step figure.
- ``peak_rss_mb_per_worker``: the RSS high-water mark (``/proc/self/status`` VmHWM, reset after
  those steps) of one more step over the RSS before building, with glibc returning large frees
  to the OS (``MALLOC_MMAP_THRESHOLD_``): what the OS sees, allocator slack included. The first
  layout is measured twice and the first discarded: it pays the process's one-time allocations.
- ``state_mb_per_worker``: parameters + grads + AdamW state held after the steps (analytical).
- ``plan_vs_measured``: ``model/plan.py``'s peak for the layout over ``peak_tensor_mb_per_worker``.
  The step is NCE over video and text, which runs the encoder twice per forward: FSDP2 then
  keeps the blocks unsharded until the backward ends (measured on a toy, 8 units of 4 MB on 2
  workers: peak 30 MB with one forward, 62 MB with two), which the plan does not model.

``<layout>_peak_mem_ratio_vs_replicate`` divides the tensor peaks, ``_rss_ratio`` the RSS ones,
``_state_mem_ratio`` the analytical state.

``weak_scaling_efficiency``: replicate's tokens/s per worker at the largest worker count over one
worker alone (same micro-batch per worker); per layout and count in ``weak_scaling``. With more
workers than cores each worker gets only part of a core: ``cores`` says so and bounds it.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

from imp_platform.bench.common import ratio, write_results
from imp_platform.config.train import ParallelConfig

log = logging.getLogger(__name__)

EXPERT = 2  # expert-parallel group size of the fsdp+ep layout
LAYOUTS = {"replicate": ParallelConfig(data="replicate"), "fsdp": ParallelConfig(data="fsdp"),
           "fsdp+ep": ParallelConfig(data="fsdp", expert=EXPERT)}
WORLDS = (1, 2, 4)
# The paired rounds keep every layout alive in each worker at once: for the small preset at 4
# workers ~18 GB, where its memory phase (one layout at a time) needs ~11 GB; so speed is timed on tiny.
SPEED_PRESET = "tiny"
ROWS = 8  # samples per worker and step (weak scaling: fixed per worker)
MIB = 2**20
# Bytes a rank puts on the wire per byte of the tensor it hands over, world n: ring all-reduce
# 2(n-1)/n, ring all-gather (n-1) x its shard, reduce-scatter (n-1)/n of its input; broadcast counts
# the tensor once; all-to-all what leaves the rank (``_wire_bytes``).
WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather_into_tensor": lambda n: n - 1,
        "all_gather": lambda n: n - 1, "reduce_scatter_tensor": lambda n: (n - 1) / n,
        "broadcast": lambda n: 1.0 if n > 1 else 0.0}
COLLECTIVES = (*WIRE, "all_to_all_single")
# ``<layout>_<name>_ratio_vs_replicate`` at the largest worker count, of each of these per-worker figures
RATIOS = {"speed": "tokens_per_s_per_worker", "peak_mem": "peak_tensor_mb_per_worker", "rss": "peak_rss_mb_per_worker",
          "state_mem": "state_mb_per_worker", "wire_bytes": "wire_bytes_per_step"}


def _config(preset: str):
    from imp_platform.config import validate
    from imp_platform.config.train import PretrainConfig

    return validate(PretrainConfig, {"model": {"preset": preset, "moe": True}, "tasks": {
        "vt": {"modalities": ["video", "text"], "objectives": [{"kind": "nce"}]}}})


def _batch(rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rank)
    return {"video": rng.integers(0, 255, (ROWS, 8, 32, 32, 3), dtype=np.uint8),
            "text_ids": rng.integers(1, 100, (ROWS, 16)), "text_mask": np.ones((ROWS, 16), dtype=bool)}


def _wire_bytes(name: str, tensor: torch.Tensor, args: tuple, kwargs: dict) -> float:
    """Bytes this rank sends for one collective on ``tensor`` (what it hands over)."""
    size = tensor.numel() * tensor.element_size()
    n = dist.get_world_size(kwargs.get("group"))
    if name != "all_to_all_single":
        return WIRE[name](n) * size
    splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
    if not splits:
        return size * (n - 1) / n
    own = splits[dist.get_rank(kwargs.get("group"))]
    return (sum(splits) - own) * size / max(1, tensor.shape[0])


@contextmanager
def _counted(sent: dict[str, list[float]]) -> Iterator[None]:
    """Add, per collective, [bytes handed, bytes on the wire] of every ``torch.distributed`` call to ``sent``."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            given = [a for a in args if isinstance(a, torch.Tensor)]
            tensor = kwargs.get("input", kwargs.get("tensor", given[-1] if given else None))  # what this rank sends
            if tensor is not None:
                total = sent.setdefault(name, [0.0, 0.0])
                total[0] += tensor.numel() * tensor.element_size()
                total[1] += _wire_bytes(name, tensor, args, kwargs)
            return originals[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@contextmanager
def _tensor_bytes(into: dict[str, int]) -> Iterator[None]:
    """Fill ``into`` with the ``net`` change and the ``peak`` rise of live tensor bytes over the block
    (the profiler's allocation and free events, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        yield
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    into.update(net=live, peak=peak)


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
        from imp_platform.model import build_model
        from imp_platform.train.agd import Choice
        from imp_platform.train.optim import build_optimizer
        from imp_platform.train.parallel import apply_parallelism
        from imp_platform.train.tasks import resolve_model_config, tokens_per_sample

        self.cfg = _config(preset)
        self.model_cfg = resolve_model_config(self.cfg)
        torch.manual_seed(0)
        self.model = build_model(self.model_cfg)
        self.plan = apply_parallelism(self.model, LAYOUTS[layout], torch.device("cpu"))
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


def _layouts(world: int) -> list[str]:
    return [name for name, cfg in LAYOUTS.items() if world % cfg.expert == 0]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _memory(layout: str, preset: str, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """One layout built, stepped and measured on this rank (see the module docstring), then dropped."""
    from imp_platform.model.plan import plan

    gc.collect()
    setup: dict[str, int] = {}
    steps: dict[str, int] = {}
    before = _status("VmRSS")
    with _tensor_bytes(setup):
        arm = _Arm(layout, preset)
    with _tensor_bytes(steps):
        for _ in range(2):
            arm.step(batch)
    _peak_rss_reset()
    arm.step(batch)
    peak = setup["net"] + steps["peak"]
    cfg = LAYOUTS[layout]
    estimate = plan(arm.model_cfg, layout, dist.get_world_size(), arm.tokens, expert=cfg.expert,
                    act_bytes=4, foreach=False)  # fp32 on CPU; AdamW's CPU default is per tensor
    return {"peak_tensor_mb_per_worker": round(peak / MIB, 1),
            "state_mb_per_worker": round(arm.state_bytes() / MIB, 2),
            "setup_peak_tensor_mb_per_worker": round(setup["peak"] / MIB, 1),
            "peak_rss_mb_per_worker": round((_status("VmHWM") - before) / MIB, 1),
            "plan_peak_mb_per_worker": round(estimate.peak / MIB, 1),
            "plan_vs_measured": ratio(estimate.peak, peak)}


def _speed(world: int, preset: str, rounds: int, steps: int, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """All layouts alive, timed rounds alternating; the collective bytes of one step of each."""
    arms = {layout: _Arm(layout, preset) for layout in _layouts(world)}
    result: dict[str, dict[str, Any]] = {layout: {"seconds": 0.0, "tokens": 0} for layout in arms}
    for layout, arm in arms.items():
        arm.step(batch)
        sent: dict[str, list[float]] = {}
        with _counted(sent):
            arm.step(batch)
        result[layout].update(sent=sent, state_mb=arm.state_bytes() / MIB)
    for _ in range(rounds):
        for layout, arm in arms.items():
            dist.barrier()
            began = time.perf_counter()
            for _ in range(steps):
                arm.step(batch)
            result[layout]["seconds"] += time.perf_counter() - began
            result[layout]["tokens"] += steps * arm.tokens
    return result


def _worker(rank: int, world: int, port: int, memory_preset: str | None, speed_preset: str | None,
            rounds: int, steps: int, out: str) -> None:
    """``memory_preset``'s memory (each layout in turn, dropped after), then ``speed_preset``'s speed (either: None)."""
    _init(rank, world, port)
    try:
        batch = _batch(rank)
        if memory_preset:
            layouts = _layouts(world)
            _memory(layouts[0], memory_preset, batch)  # pays the process's one-time allocations (RSS): discarded
            memory = {layout: _memory(layout, memory_preset, batch) for layout in layouts}
            if rank == 0:
                torch.save(memory, Path(out) / "memory.pt")
        if speed_preset:
            speed = _speed(world, speed_preset, rounds, steps, batch)
            if rank == 0:
                torch.save(speed, Path(out) / f"speed{world}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _mmap_large_allocations() -> Iterator[None]:
    """Child processes started inside map allocations over 64 KiB: frees return to the OS, RSS follows live memory."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def _cores(worlds: tuple[int, ...]) -> dict[str, Any]:
    """How many cores the workers share, and the efficiency that leaves at each worker count."""
    usable = len(os.sched_getaffinity(0))
    ceiling = {f"workers_{w}": round(min(1.0, usable / w), 3) for w in worlds}
    top = worlds[-1]
    cap = (f"{top} single-threaded workers share {usable} usable cores: each gets at most {usable / top:.2f} "
           f"of a core, "
           f"so tokens/s per worker cannot exceed {usable / top:.2f}x a lone worker's (weak-scaling efficiency <= "
           f"{usable / top:.2f}) before any communication cost; the 0.8 target needs a core per worker"
           if top > usable else None)
    return {"cpu_count": os.cpu_count(), "usable_cores": usable, "efficiency_ceiling": ceiling, "cores_cap": cap}


def _check_preset(preset: str) -> None:
    """Refuse an unknown preset here, before any worker starts."""
    from imp_platform.config import ConfigError
    from imp_platform.train.tasks import resolve_model_config

    try:
        resolve_model_config(_config(preset))
    except ValueError as exc:
        raise ConfigError(f"bench scale --preset: {exc}") from None


def run(quick: bool, out: Path, preset: str | None = None, worlds: tuple[int, ...] = WORLDS) -> dict[str, Any]:
    """Time ``SPEED_PRESET`` at each worker count and measure ``preset``'s memory (tiny with ``quick``,
    small without, unless given) at the largest; write ``out``."""
    preset = preset or ("tiny" if quick else "small")
    _check_preset(preset)
    rounds, steps = (2, 1) if quick else (4, 3)
    top = f"workers_{worlds[-1]}"
    load_before = os.getloadavg()[0]
    layouts: dict[str, dict[str, Any]] = {layout: {} for layout in LAYOUTS}
    together = preset == SPEED_PRESET  # (the quick run) memory in the largest speed group: one group fewer
    with tempfile.TemporaryDirectory(prefix="imp-bench-scale-") as tmp, _mmap_large_allocations():
        for world in worlds:
            memory_preset = preset if together and world == worlds[-1] else None
            log.info("speed, %d worker(s): %d rounds x %d steps per layout%s", world, rounds, steps,
                     f"; memory of {preset} first" if memory_preset else "")
            args = (world, _free_port(), memory_preset, SPEED_PRESET, rounds, steps, tmp)
            mp.spawn(_worker, args=args, nprocs=world, join=True)
            for layout, got in torch.load(Path(tmp) / f"speed{world}.pt", weights_only=True).items():
                sent = got["sent"]
                layouts[layout][f"workers_{world}"] = {
                    "tokens_per_s_per_worker": round(got["tokens"] / got["seconds"], 1),
                    "collective_bytes_per_step": int(sum(handed for handed, _ in sent.values())),
                    "wire_bytes_per_step": int(sum(wire for _, wire in sent.values())),
                    "wire_bytes_by_collective": {name: int(wire) for name, (_, wire) in sorted(sent.items())},
                    "state_mb_per_worker": round(got["state_mb"], 2)}
        if not together:
            log.info("memory, %s on %d workers, each layout in turn", preset, worlds[-1])
            args = (worlds[-1], _free_port(), preset, None, rounds, steps, tmp)
            mp.spawn(_worker, args=args, nprocs=worlds[-1], join=True)
        memory = torch.load(Path(tmp) / "memory.pt", weights_only=True)
    cores = _cores(worlds)
    cores["load_avg_1min"] = {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}
    base = layouts["replicate"]["workers_1"]["tokens_per_s_per_worker"]
    weak = {layout: {world: ratio(got["tokens_per_s_per_worker"], base) for world, got in counts.items()}
            for layout, counts in layouts.items()}

    def versus_replicate(layout: str, key: str) -> float | None:
        if key in memory[layout]:
            return ratio(memory[layout][key], memory["replicate"][key])
        return ratio(layouts[layout][top][key], layouts["replicate"][top][key])

    results = {
        "config": {"preset": preset, "speed_preset": SPEED_PRESET, "moe": True, "rows_per_worker": ROWS,
                   "rounds": rounds, "steps": steps,
                   "workers": list(worlds), "expert": EXPERT,
                   "note": "gloo on CPU, one torch thread per worker; paired rounds; weak_scaling: tokens/s per "
                           "worker over replicate's on one worker"},
        "cores": cores,
        "layouts": layouts,
        "memory": {"preset": preset, "workers": worlds[-1], **memory},
        "weak_scaling": weak,
        "weak_scaling_efficiency": weak["replicate"][top],
        "weak_scaling_efficiency_fsdp": weak["fsdp"][top],
        "weak_scaling_efficiency_fsdp_ep": weak["fsdp+ep"][top],
        "weak_scaling_efficiency_vs_core_ceiling": ratio(weak["replicate"][top], cores["efficiency_ceiling"][top]),
        **{f"{key}_{what}_ratio_vs_replicate": versus_replicate(layout, metric)
           for key, layout in (("fsdp", "fsdp"), ("fsdp_ep", "fsdp+ep")) for what, metric in RATIOS.items()},
    }
    return write_results(out, "scale", results)
