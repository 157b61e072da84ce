"""Expert parallelism: each MoE layer's experts sharded over an expert-parallel (EP) group.

``shard_experts(model, mesh)`` turns every ``MoEFFN`` in place into an ``ExpertParallelMoEFFN``
that keeps ``E / ep`` experts: ``w1``/``w2`` become DTensors ``Shard(0)`` over the 1-D EP
``mesh`` (torchtitan's layout), so DCP saves them resharding-ready and ``full_state_dict``
gives back the unsharded export layout. The router stays replicated.

Semantics (torchtitan's): every rank routes *its own* tokens exactly as the single-process
layer would (Expert Choice picks per group among the rank's tokens), then sends each
assignment's token to the rank holding its expert (``all_to_all_single``), the experts there
run one grouped GEMM over what all ranks sent, and the outputs travel back and are gated and
summed locally. Hence, with the same full expert weights:

- rank r's output, stats and gradients w.r.t. its tokens and the router equal the
  single-process layer applied to rank r's batch alone;
- the gradient of a local expert is the *sum* over the EP ranks of the single-process
  gradients of each rank's own loss.

With data parallelism over the rest (``apply_expert_parallel``: a ("dp", "ep") mesh of all
workers), the experts are replicated over "dp": keep them out of FSDP (``expert_parameters``
as ``ignored_params``) and call ``reduce_expert_grads`` after the backward, which sums their
grads over "dp" and divides by the world size, i.e. the data-parallel mean every other
parameter gets. Each layer call costs one host sync (the per-expert token counts become the
all-to-all split sizes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from imp_platform.model.moe import MoEFFN, SortedExperts, _compute_dtype, _scatter


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with explicit splits; its backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # noqa: ANN001, ANN205
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _expert_major(counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Received rows are ordered (source rank, local expert); ``counts`` [P, El] rows per pair, ``total`` in all.

    Returns (dest, inverse, offs) for ``SortedExperts``: ``dest`` lists the received rows
    expert-major (then by source), ``inverse`` is its inverse permutation and ``offs`` [El] the
    int32 end offsets of each local expert's rows.
    """
    flat = counts.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view_as(counts).T.reshape(-1)  # segment starts, expert-major
    lengths = counts.T.reshape(-1)
    shift = starts - (torch.cumsum(lengths, 0) - lengths)
    dest = torch.repeat_interleave(shift, lengths, output_size=total) + torch.arange(total, device=counts.device)
    inverse = torch.empty_like(dest).scatter_(0, dest, torch.arange(total, device=counts.device))
    return dest, inverse, torch.cumsum(counts.sum(0), 0).to(torch.int32)


def expert_exchange(
    xs: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Experts of the whole group over rows ``xs`` [M, d] sorted by global expert (``counts`` [E]) -> [M, d].

    ``w1`` [El, d, h] and ``w2`` [El, h, d] are this rank's experts ``rank * El ...``. Gates are
    not applied here: the caller gates and scatters the returned rows locally.
    """
    ranks, local = dist.get_world_size(group), w1.shape[0]
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    sent_per_rank = counts.view(ranks, local).sum(1).tolist()
    got = received.view(ranks, local)
    got_per_rank = got.sum(1).tolist()
    rows = _AllToAll.apply(xs, got_per_rank, sent_per_rank, group)
    dest, inverse, offs = _expert_major(got, sum(got_per_rank))
    ones = rows.new_ones(rows.shape[0])  # no gate on this side: SortedExperts just permutes back
    out = SortedExperts.apply(rows, w1, w2, ones, dest, offs, inverse, rows.shape[0])
    return _AllToAll.apply(out, sent_per_rank, got_per_rank, group)


class ExpertParallelMoEFFN(MoEFFN):
    """``MoEFFN`` holding only its EP rank's experts (DTensor shards); routing is unchanged."""

    mesh: DeviceMesh

    def _dispatch_slots(self, x: torch.Tensor, token_idx: torch.Tensor, gates: torch.Tensor, rows: int) -> torch.Tensor:
        counts = token_idx.new_full((self.num_experts,), token_idx.numel() // self.num_experts)
        return self._dispatch_sorted(x, gates, token_idx, counts, None, rows)

    def _dispatch_sorted(
        self,
        x: torch.Tensor,
        gates: torch.Tensor,
        dest: torch.Tensor,
        counts: torch.Tensor,
        inverse: torch.Tensor | None,
        rows: int,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        w1, w2 = (w.to_local().to(dtype) for w in (self.w1, self.w2))
        out = expert_exchange(x.to(dtype).index_select(0, dest), counts, w1, w2, self.mesh.get_group())
        return _scatter(out.to(gates.dtype) * gates.unsqueeze(1), dest, inverse, rows)


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard the experts of every ``MoEFFN`` in ``model`` over the 1-D ``mesh``, in place.

    Call it on every rank of ``mesh``, before building the optimizer and before FSDP. Rank 0's
    full weights are the ones scattered, so ranks need not have initialised identically.
    """
    if mesh.ndim != 1:
        raise ValueError(f"shard_experts needs a 1-D expert-parallel mesh, got {mesh.ndim}-D {mesh}")
    for layer in [m for m in model.modules() if type(m) is MoEFFN]:
        if layer.num_experts % mesh.size():
            raise ValueError(
                f"moe.num_experts ({layer.num_experts}) must be divisible by the expert-parallel size ({mesh.size()})"
            )
        layer.__class__ = ExpertParallelMoEFFN
        layer.mesh = mesh
        for name in ("w1", "w2"):
            full = getattr(layer, name).detach()
            setattr(layer, name, nn.Parameter(distribute_tensor(full, mesh, [Shard(0)])))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every DTensor gathered whole: the unsharded (export) layout.

    A collective: every rank of every mesh involved must call it.
    """
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}


def apply_expert_parallel(model: nn.Module, expert: int) -> DeviceMesh:
    """Shard ``model``'s experts over groups of ``expert`` consecutive ranks of the default group
    (on GPU nodes: within a node, where the all-to-all is fastest).

    Returns the ("dp", "ep") mesh: "ep" holds the groups, "dp" the ranks holding the same experts.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from imp_platform.config import ConfigError

    world = dist.get_world_size()
    experts = {m.num_experts for m in model.modules() if isinstance(m, MoEFFN)}
    if not experts:
        raise ConfigError(f"parallel.expert ({expert}) needs an MoE model (model.moe); this one has no experts")
    if world % expert or any(e % expert for e in experts):
        raise ConfigError(
            f"parallel.expert ({expert}) must divide the number of workers ({world}) and moe.num_experts ({max(experts)})"
        )
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world // expert, expert), mesh_dim_names=("dp", "ep"))
    shard_experts(model, mesh["ep"])
    return mesh


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert weights, in module order: to leave out of FSDP and of the plain gradient all-reduce."""
    return [p for m in model.modules() if isinstance(m, ExpertParallelMoEFFN) for p in (m.w1, m.w2)]


def reduce_expert_grads(model: nn.Module, mesh: DeviceMesh) -> None:
    """Turn the expert grads (sums over "ep") into the data-parallel mean over all of ``mesh``'s ranks."""
    dp = mesh["dp"]
    for p in expert_parameters(model):
        if p.grad is None:
            continue
        grad = p.grad.to_local()
        if dp.size() > 1:
            dist.all_reduce(grad, group=dp.get_group())
        grad.div_(mesh.size())
