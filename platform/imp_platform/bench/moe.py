"""``platform bench moe``: forward+backward time and activation memory of one MoE FFN layer.

Each router (Expert Choice, token-choice top-1) is compared, in the same run, against
- a dense FFN with the same *active* FLOPs (hidden = capacity_factor * h, or k * h), the
  ideal the MoE layer should match (``ratio_vs_dense``, target <= 1.3 on CPU), and
- a naive per-expert Python loop over the same router decisions (``speedup_vs_naive``).
Variants are timed in interleaved rounds (moe, dense, naive, moe, ...). ``ratio_vs_dense``
is the median over rounds of moe/dense within each round: the two run back to back, so a
slow spell of the (shared, virtual) machine hits both and cancels out, and the median
ignores the rounds it does not. The ratio of each one's fastest round
(``ratio_vs_dense_best``) and of process CPU time (``ratio_vs_dense_cpu``, insensitive to
waiting for a core) are kept beside it.
CPU runs first call ``reuse_large_allocations`` as CPU training does (glibc would otherwise
page-fault the E-times-larger expert weight gradients afresh every step).
Memory: ``peak_mem_ratio_vs_dense`` compares the activations kept for backward (bytes of
unique storages saved by autograd, parameters and the input excluded), which is what
sets the forward+backward peak; on CUDA the allocator's true peak is reported too.
fp32 on CPU, bf16 on CUDA.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imp_platform.bench.common import write_results
from imp_platform.config.model import MoEConfig
from imp_platform.model.encoder import DenseFFN
from imp_platform.memory import reuse_large_allocations
from imp_platform.model.moe import MoEFFN

log = logging.getLogger(__name__)

# (tokens, d_model, expert hidden, experts)
QUICK_SIZES = [(1024, 128, 512, 8)]
FULL_SIZES = [(2048, 128, 512, 8), (4096, 256, 1024, 8), (4096, 384, 1536, 16)]
ROUTERS = {"expert_choice": dict(router="expert_choice", capacity_factor=1.0), "top_k": dict(router="top_k", top_k=1)}


def naive_forward(layer: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """The same routing as ``layer`` computed expert by expert (and group by group) in Python."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat.float() @ layer.router.T
    probs = torch.softmax(logits, dim=-1)
    y = torch.zeros_like(flat, dtype=torch.float32)
    cfg = layer.cfg
    for e in range(layer.num_experts):
        if cfg.router == "expert_choice":
            groups = max(1, math.ceil(flat.shape[0] / cfg.group_size))
            size = math.ceil(flat.shape[0] / groups)
            capacity = min(size, max(1, math.ceil(size * cfg.capacity_factor / layer.num_experts)))
            chosen = []
            for g in range(groups):
                p = probs[g * size : (g + 1) * size, e]
                chosen.append(torch.topk(p, min(capacity, p.shape[0])).indices + g * size)
            rows = torch.cat(chosen)
            gate = probs[rows, e]
        else:
            gates, ids = torch.topk(probs, cfg.top_k, dim=-1)
            hit = ids == e
            rows = hit.any(dim=-1).nonzero().squeeze(1)
            gate = (gates * hit).sum(dim=-1)[rows]
        out = F.gelu(flat[rows] @ layer.w1[e]) @ layer.w2[e]
        y = y.index_add(0, rows, out.float() * gate[:, None])
    return y.to(x.dtype).view_as(x)


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of distinct storages autograd keeps for backward while ``fn`` runs forward."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
             grad: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], None]:
    """One training-like step: grads set to None first (``zero_grad(set_to_none=True)``), so no
    variant pays for accumulating into last step's (E times larger, for MoE) weight grads.

    ``forward`` returns the output, or (output, aux loss): the aux loss is back-propagated
    with weight 1, as training adds it to the scalar loss.
    """
    def step() -> None:
        for t in (x, *params):
            t.grad = None
        out = forward(x)
        if isinstance(out, tuple):
            torch.autograd.backward(out, (grad, torch.ones_like(out[1])))
        else:
            torch.autograd.backward(out, grad)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    return step


@dataclass
class RoundTimes:
    """Wall and process-CPU seconds of each round, per variant, from ``interleaved_times``."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def best(self, name: str) -> float:
        return min(self.wall[name])

    def paired_ratio(self, a: str, b: str) -> float:
        """Median over rounds of a/b, each round's two runs taken back to back."""
        return statistics.median(x / y for x, y in zip(self.wall[a], self.wall[b], strict=True))

    def cpu_ratio(self, a: str, b: str) -> float:
        return min(self.cpu[a]) / min(self.cpu[b])


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> RoundTimes:
    """Run the steps round-robin ``rounds`` times after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = RoundTimes({k: [] for k in steps}, {k: [] for k in steps})
    for _ in range(rounds):
        for name, step in steps.items():
            w, c = time.perf_counter(), time.process_time()
            step()
            times.cpu[name].append(time.process_time() - c)
            times.wall[name].append(time.perf_counter() - w)
    return times


def _cuda_peak(step: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - base


def bench_size(tokens: int, d: int, hidden: int, experts: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d, device=device, dtype=dtype)
    result: dict[str, Any] = {"tokens": tokens, "d_model": d, "hidden": hidden, "experts": experts}
    for name, router_cfg in ROUTERS.items():
        cfg = MoEConfig(num_experts=experts, last_n=1, **router_cfg)
        layer = MoEFFN(d, hidden, cfg).to(device)
        for p in (layer.w1, layer.w2):
            p.data = p.data.to(dtype)
        dense = DenseFFN(d, round(hidden * cfg.active_experts_per_token()), bias=False).to(device, dtype)

        def moe_fwd(inp: torch.Tensor, layer: MoEFFN = layer) -> tuple[torch.Tensor, torch.Tensor]:
            y, stats = layer(inp[None])
            return y.view_as(inp), stats.aux_loss  # a view: y[0]'s backward would copy into a new zero tensor

        def naive_fwd(inp: torch.Tensor, layer: MoEFFN = layer) -> torch.Tensor:
            return naive_forward(layer, inp)

        weights = {"moe": list(layer.parameters()), "dense": list(dense.parameters()), "naive": list(layer.parameters())}
        steps = {k: _fwd_bwd(f, x, grad, weights[k]) for k, f in (("moe", moe_fwd), ("dense", dense), ("naive", naive_fwd))}
        measured = interleaved_times(steps, rounds=repeats)
        params = [*layer.parameters(), *dense.parameters(), x]
        mem = {k: saved_activation_bytes(lambda f=f: f(x), params) for k, f in (("moe", moe_fwd), ("dense", dense))}
        entry = {
            "moe_s": measured.best("moe"),
            "dense_s": measured.best("dense"),
            "naive_s": measured.best("naive"),
            "ratio_vs_dense": measured.paired_ratio("moe", "dense"),
            "speedup_vs_naive": measured.paired_ratio("naive", "moe"),
            "ratio_vs_dense_best": measured.best("moe") / measured.best("dense"),
            "ratio_vs_dense_cpu": measured.cpu_ratio("moe", "dense"),
            "saved_bytes_moe": mem["moe"],
            "saved_bytes_dense": mem["dense"],
            "peak_mem_ratio_vs_dense": mem["moe"] / mem["dense"],
        }
        if device.type == "cuda":
            peaks = {k: _cuda_peak(steps[k]) for k in ("moe", "dense")}
            entry["cuda_peak_mem_ratio_vs_dense"] = peaks["moe"] / peaks["dense"]
        log.info("moe bench %s T=%d d=%d h=%d E=%d: %s", name, tokens, d, hidden, experts, entry)
        result[name] = entry
    return result


def run(quick: bool, out: Path) -> dict[str, Any]:
    """Benchmark both routers at a few sizes and write the JSON to ``out``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    allocator_tuned = device.type == "cpu" and reuse_large_allocations()
    sizes = QUICK_SIZES if quick else FULL_SIZES
    if device.type == "cuda":  # GPU sizes large enough to keep the device busy
        sizes = [(t * 8, d * 2, h * 2, e) for t, d, h, e in sizes]
    results = [bench_size(*size, device=device, dtype=dtype, repeats=7 if quick else 15) for size in sizes]
    summary = {
        router: {
            "max_ratio_vs_dense": max(r[router]["ratio_vs_dense"] for r in results),
            "max_ratio_vs_dense_cpu": max(r[router]["ratio_vs_dense_cpu"] for r in results),
            "min_speedup_vs_naive": min(r[router]["speedup_vs_naive"] for r in results),
            "max_peak_mem_ratio_vs_dense": max(r[router]["peak_mem_ratio_vs_dense"] for r in results),
        }
        for router in ROUTERS
    }
    payload = {
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "reuse_large_allocations": allocator_tuned,
        "load_average_1m": os.getloadavg()[0],
        "quick": quick,
        "targets": {"ratio_vs_dense": 1.3, "peak_mem_ratio_vs_dense": 1.5},
        "summary": summary,
        "sizes": results,
    }
    return write_results(out, "moe", payload)
