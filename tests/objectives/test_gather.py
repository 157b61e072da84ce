"""gather_with_grad across two real processes (gloo): the split loss has the full-batch gradient."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imp_platform.objectives import gather_with_grad, mil_nce_loss, nce_loss

WORLD, ROWS, DIM, T = 2, 3, 8, 0.1


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * ROWS, DIM, generator=gen), torch.randn(WORLD * ROWS, 2, DIM, generator=gen)


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        a, b = global_batch()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        a, b = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        gathered = gather_with_grad(a)
        nce = nce_loss(a, b[:, 0], T, gather=True)
        mil = mil_nce_loss(a, b, T, gather=True)
        (nce + mil).backward()
        torch.save(
            {"gathered": gathered.detach(), "nce": nce.detach(), "mil": mil.detach(), "grad_a": a.grad, "grad_b": b.grad},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gather_with_grad_two_processes(tmp_path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    a, b = (t.clone().requires_grad_() for t in global_batch())
    nce, mil = nce_loss(a, b[:, 0], T), mil_nce_loss(a, b, T)
    # Each rank's loss is the mean over its rows; the ranks together sum to WORLD x the global mean.
    (WORLD * (nce + mil)).backward()

    for rank, res in enumerate(results):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.testing.assert_close(res["gathered"], global_batch()[0])
        torch.testing.assert_close(res["grad_a"], a.grad[rows], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res["grad_b"], b.grad[rows], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close((results[0]["nce"] + results[1]["nce"]) / 2, nce.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((results[0]["mil"] + results[1]["mil"]) / 2, mil.detach(), atol=1e-5, rtol=1e-5)
