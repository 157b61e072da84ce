"""AdamW with decoupled weight decay on matrices only, linear warmup + cosine decay, grad clipping."""

from __future__ import annotations

import math
from typing import Any

import torch

from imp_platform.config.train import OptimConfig, ScheduleConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """One shared AdamW state for all tasks (as IMP); norms, biases and scalars get no decay."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """Multiplier on the peak lr at ``step``: linear warmup from ~0, then cosine to ``min_lr``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = min_lr / peak_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, sched: ScheduleConfig, optim: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, sched.warmup_steps, optim.lr, sched.min_lr))


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip the global grad norm (after the all-reduce, so every rank clips identically); returns the norm.

    The norm stays a tensor (no host sync in the step). Sharded (DTensor) grads count every
    rank's shards of their mesh; plain grads beside them (replicated parameters) count once.
    """
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[torch.nn.Parameter]] = {}  # by device mesh (None: plain tensors)
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    if not groups:
        return torch.zeros(())
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
    if max_norm is not None:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
