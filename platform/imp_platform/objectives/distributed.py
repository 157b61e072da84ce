"""Cross-worker negatives: all_gather that keeps gradients flowing back to every worker's inputs."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: sum the gradient over ranks, keep own rows.

    Summing is right because every rank's loss depends on every rank's rows; it also avoids
    reduce_scatter, which gloo (CPU) lacks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` per rank -> ``[world * B, ...]`` in rank order (same B on every rank).

    A no-op without an initialized process group (or with one worker).
    """
    return _GatherWithGrad.apply(x) if _active() else x


def rank_offset(rows: int) -> int:
    """Index of this rank's first row inside a gathered batch."""
    return dist.get_rank() * rows if _active() else 0
