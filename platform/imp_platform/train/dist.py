"""Data-parallel gradient averaging without DDP.

Why not DistributedDataParallel: each AGD step runs one task, which touches only some
parameters (its modalities' embedders, its pair projections, its head). DDP would need
``find_unused_parameters=True``, which walks the autograd graph every step and still
all-reduces every bucket. Because all ranks run the *same* task each step (the sampler is
seeded identically), the set of parameters with gradients is the same on every rank, so we
average exactly those, flattened into a few large buffers (few collective calls).

One cheap safety net: a tiny all-reduce (MAX) of the "has grad" mask, so that a parameter
that got no gradient on one rank but did on another (e.g. a top-k expert no token picked)
is averaged as zero there instead of deadlocking on mismatched buffer sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 32 * 1024 * 1024


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def allreduce_gradients(params: list[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> int:
    """Average grads across ranks for the params that have one on any rank; returns the count reduced."""
    if not is_distributed() or not params:
        return sum(p.grad is not None for p in params)
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(params, has.tolist(), strict=True) if flag]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()
    for bucket in _buckets([p.grad for p in used], bucket_bytes):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat /= world
        for grad, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            grad.copy_(synced)
    return len(used)


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Group same-dtype tensors into buffers of about ``bucket_bytes``."""
    out: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if current and (size + t.numel() * t.element_size() > bucket_bytes or t.dtype != current[0].dtype):
            out.append(current)
            current, size = [], 0
        current.append(t)
        size += t.numel() * t.element_size()
    if current:
        out.append(current)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s object on every rank (eval metrics computed on rank 0 only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_parameters(model: torch.nn.Module, src: int = 0) -> None:
    """Start all ranks from rank ``src``'s weights (init is seeded, but make it a fact)."""
    if not is_distributed():
        return
    tensors = [t for t in list(model.parameters()) + list(model.buffers())]
    for bucket in _buckets(tensors, BUCKET_BYTES):
        flat = _flatten_dense_tensors([t.data for t in bucket])
        dist.broadcast(flat, src=src)
        for t, synced in zip(bucket, _unflatten_dense_tensors(flat, [t.data for t in bucket]), strict=True):
            t.data.copy_(synced)
