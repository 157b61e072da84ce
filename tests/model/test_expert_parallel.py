"""Expert parallelism over 2 and 4 real processes (gloo) against the single-process MoE layer.

The equivalence checked (module docstring of imp_platform.model.expert_parallel): with the
same full weights, rank r's outputs, stats and gradients w.r.t. its tokens and the router
equal the single-process layer on rank r's batch alone; a local expert's gradient equals the
sum over ranks of the single-process expert gradients of each rank's own loss. Ranks get
different token counts and padding, so the all-to-all splits are uneven; one top-k case gives
a rank no real token at all (it must still serve the other ranks' tokens, not deadlock).
With 4 ranks, EP over pairs composes with FSDP over all four: every gradient ends up the
data-parallel mean of the ranks' losses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from imp_platform.config import ConfigError
from imp_platform.config.model import MoEConfig
from imp_platform.model import build_model, preset
from imp_platform.model.expert_parallel import (
    ExpertParallelMoEFFN,
    apply_expert_parallel,
    expert_parameters,
    full_state_dict,
    reduce_expert_grads,
    shard_experts,
)
from imp_platform.model.moe import MoEFFN, MoEStats

D, H, E = 16, 32, 4
CASES: list[tuple[str, dict]] = [
    ("expert_choice", {}),
    ("expert_choice", {"capacity_factor": 2.0, "group_size": 8}),
    ("top_k", {"top_k": 1}),
    ("top_k", {"top_k": 2}),
    ("top_k", {"top_k": 1, "empty_rank": 1}),
]
FSDP_CASE = 3  # its inputs (top-2 routing)
RESULTS = ("y", "grad_x", "grad_router", "grad_w1", "grad_w2", "load", "aux")


def make_layer(router: str, options: dict) -> MoEFFN:
    cfg = {k: v for k, v in options.items() if k != "empty_rank"}
    torch.manual_seed(0)
    layer = MoEFFN(D, H, MoEConfig(num_experts=E, last_n=1, router=router, **cfg))
    with torch.no_grad():
        layer.router.normal_(std=1.0)  # decisive routing: ties cannot flip choices between the two paths
    return layer


def rank_batch(case: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-specific tokens [2, n, D] (n differs per rank), padding mask and loss weights."""
    gen = torch.Generator().manual_seed(100 * case + rank)
    n = 5 + 3 * rank
    x, weight = torch.randn(2, n, D, generator=gen), torch.randn(2, n, D, generator=gen)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, n - 2 :] = False
    if CASES[case][1].get("empty_rank") == rank:
        mask[:] = False
    return x, mask, weight


def run_layer(layer: MoEFFN, case: int, rank: int) -> dict[str, torch.Tensor]:
    """Forward and backward of rank ``rank``'s loss; expert grads as this layer holds them."""
    x, mask, weight = rank_batch(case, rank)
    x.requires_grad_()
    y, stats = layer(x, mask)
    ((y * weight).sum() + stats.aux_loss).backward()
    local = [p.grad.to_local() if isinstance(layer, ExpertParallelMoEFFN) else p.grad for p in (layer.w1, layer.w2)]
    return dict(zip(RESULTS, (y.detach(), x.grad, layer.router.grad, *local, stats.load, stats.aux_loss.detach())))


def check_whole_model(mesh: DeviceMesh, rank: int) -> None:
    """Every sparse layer of an IMPModel is sharded; encoding is unchanged; the export layout is whole."""
    cfg = preset("tiny", moe=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    clips = torch.rand(2, 4, 16, 16, 3, generator=torch.Generator().manual_seed(rank))
    want = model.encode("video", clips).tokens
    full = {k: v.clone() for k, v in model.state_dict().items()}
    shard_experts(model, mesh)
    sharded = [m for m in model.modules() if isinstance(m, ExpertParallelMoEFFN)]
    assert len(sharded) == len(cfg.sparse_layers()) == cfg.moe.last_n
    torch.testing.assert_close(model.encode("video", clips).tokens, want, atol=1e-5, rtol=1e-4)
    gathered = full_state_dict(model)
    assert gathered.keys() == full.keys() and all(torch.equal(gathered[k], v) for k, v in full.items())


class Net(nn.Module):
    """A dense layer (FSDP-sharded over all ranks) before an MoE layer (experts sharded over "ep")."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.moe = nn.Linear(D, D), make_layer("top_k", {"top_k": 2})

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        return self.moe(self.proj(x), mask)


def net_grads(net: Net, rank: int) -> dict[str, torch.Tensor]:
    x, mask, weight = rank_batch(FSDP_CASE, rank)
    y, stats = net(x, mask)
    ((y * weight).sum() + stats.aux_loss).backward()
    return {name: p.grad for name, p in net.named_parameters()}


def check_with_fsdp(world: int) -> dict[str, torch.Tensor]:
    """EP over pairs of ranks, FSDP over all of them: after ``reduce_expert_grads`` every grad is the
    data-parallel mean (this rank's shard); the full state gathers back to the unsharded layout."""
    torch.manual_seed(0)
    net = Net()
    full = {k: v.clone() for k, v in net.state_dict().items()}
    mesh = apply_expert_parallel(net, 2)
    everyone = init_device_mesh("cpu", (world,))
    fully_shard(net.proj, mesh=everyone)
    fully_shard(net, mesh=everyone, ignored_params=set(expert_parameters(net)))
    grads = net_grads(net, dist.get_rank())
    reduce_expert_grads(net, mesh)
    gathered = full_state_dict(net)
    assert gathered.keys() == full.keys() and all(torch.equal(gathered[k], v) for k, v in full.items())
    return {k: g.full_tensor() if k.startswith("proj") or k.endswith("router") else g.to_local() for k, g in grads.items()}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = []
        for case, (router, options) in enumerate(CASES):
            layer = make_layer(router, options)
            full = {k: v.clone() for k, v in layer.state_dict().items()}
            shard_experts(layer, mesh)
            assert layer.w1.to_local().shape == (E // world, D, H)
            gathered = full_state_dict(layer)
            assert all(torch.equal(gathered[k], v) for k, v in full.items())
            if case == 0:  # a sharded DCP checkpoint, loaded unsharded by the test
                dcp.save(layer.state_dict(), checkpoint_id=os.path.join(out_dir, "dcp"))
            results.append(run_layer(layer, case, rank))
        for bad, expert in ((nn.Linear(D, D), 2), (make_layer(*CASES[0]), 3)):  # no experts; 3 divides neither
            with pytest.raises(ConfigError, match="parallel.expert"):
                apply_expert_parallel(bad, expert)
        fsdp = check_with_fsdp(world) if world == 4 else {}
        torch.save({"layer": results, "fsdp": fsdp}, os.path.join(out_dir, f"rank{rank}.pt"))
        check_whole_model(mesh, rank)
    finally:
        dist.destroy_process_group()


def check(world: int, tmp_path: Path) -> list[dict]:
    """Spawn ``world`` ranks, compare their MoE layers with the single-process one; returns what they saved."""
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    local = E // world
    for case, (router, options) in enumerate(CASES):
        layer = make_layer(router, options)
        want = []
        for rank in range(world):
            layer.zero_grad(set_to_none=True)
            want.append(run_layer(layer, case, rank))
        for rank in range(world):
            experts = slice(rank * local, (rank + 1) * local)
            for key in RESULTS:
                expected = want[rank][key]
                if key in ("grad_w1", "grad_w2"):  # summed over every rank's loss
                    expected = sum(w[key] for w in want)[experts]
                torch.testing.assert_close(
                    got[rank]["layer"][case][key], expected, atol=1e-5, rtol=1e-4,
                    msg=lambda m: f"{CASES[case]} rank {rank} {key}: {m}",  # noqa: B023 - called at once
                )
    return got


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load in this one process
def test_expert_parallel_two_ranks_matches_single_process(tmp_path: Path) -> None:
    check(2, tmp_path)
    # the DCP checkpoint of the sharded layer reshards into one process's whole layer
    layer = make_layer(*CASES[0])
    state = {k: torch.zeros_like(v) for k, v in layer.state_dict().items()}
    dcp.load(state, checkpoint_id=tmp_path / "dcp")
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


@pytest.mark.slow
def test_expert_parallel_four_ranks_matches_single_process_and_composes_with_fsdp(tmp_path: Path) -> None:
    got = check(4, tmp_path)
    torch.manual_seed(0)
    net = Net()
    per_rank = []
    for rank in range(4):
        net.zero_grad(set_to_none=True)
        per_rank.append(net_grads(net, rank))
    mean = {k: sum(g[k] for g in per_rank) / 4 for k in per_rank[0]}
    for rank in range(4):
        experts = slice(rank % 2 * E // 2, (rank % 2 + 1) * E // 2)  # mesh (dp 2, ep 2): ep rank = rank % 2
        for key, grad in got[rank]["fsdp"].items():
            want = mean[key][experts] if key.endswith(("w1", "w2")) else mean[key]
            torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"rank {rank} {key}: {m}")
