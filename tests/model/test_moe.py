"""MoE routers and dispatch against naive references that loop over experts and tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imp_platform.config.model import MoEConfig
from imp_platform.model.moe import (
    MoEFFN,
    grouped_matmul,
    grouped_weight_grad,
    limoe_global_entropy,
    limoe_local_entropy,
    load_balance_loss,
    router_probs,
    router_z_loss,
)

D, H, E = 16, 32, 4


def expert(x: torch.Tensor, layer: MoEFFN, e: int) -> torch.Tensor:
    return F.gelu(x @ layer.w1[e]) @ layer.w2[e]


def reference_expert_choice(layer: MoEFFN, x: torch.Tensor, valid: list[bool]) -> torch.Tensor:
    """Per group, per expert: rank the group's real tokens by probability, take the top C."""
    tokens = x.shape[0]
    cfg = layer.cfg
    groups = math.ceil(tokens / cfg.group_size)
    size = math.ceil(tokens / groups)
    capacity = min(size, max(1, math.ceil(size * cfg.capacity_factor / E)))
    probs = torch.softmax(x.float() @ layer.router.T, dim=-1)
    out = [torch.zeros(D) for _ in range(tokens)]
    for g in range(groups):
        members = [t for t in range(g * size, min((g + 1) * size, tokens)) if valid[t]]
        for e in range(E):
            ranked = sorted(members, key=lambda t: -probs[t, e].item())[:capacity]
            for t in ranked:
                out[t] = out[t] + probs[t, e] * expert(x[t], layer, e)
    return torch.stack(out)


def reference_top_k(layer: MoEFFN, x: torch.Tensor, valid: list[bool]) -> torch.Tensor:
    probs = torch.softmax(x.float() @ layer.router.T, dim=-1)
    out = [torch.zeros(D) for _ in range(x.shape[0])]
    for t in range(x.shape[0]):
        if not valid[t]:
            continue
        for e in sorted(range(E), key=lambda e: -probs[t, e].item())[: layer.cfg.top_k]:
            out[t] = out[t] + probs[t, e] * expert(x[t], layer, e)
    return torch.stack(out)


def make_layer(router: str, **kw) -> MoEFFN:
    torch.manual_seed(0)
    layer = MoEFFN(D, H, MoEConfig(num_experts=E, last_n=1, router=router, **kw))
    with torch.no_grad():
        layer.router.normal_(std=1.0)  # decisive routing so ties cannot flip choices
    return layer


def compare(layer: MoEFFN, reference, batch: int, n: int, pad: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(batch, n, D, requires_grad=True)
    mask = torch.ones(batch, n, dtype=torch.bool)
    if pad:
        mask[:, n - pad :] = False
    weight = torch.randn(batch, n, D)

    y, stats = layer(x, mask if pad else None)
    ((y * weight).sum()).backward()
    grads = [p.grad.clone() for p in (layer.router, layer.w1, layer.w2)] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None

    ref = reference(layer, x.reshape(-1, D), mask.reshape(-1).tolist()).view(batch, n, D)
    ((ref * weight).sum()).backward()
    ref_grads = [p.grad for p in (layer.router, layer.w1, layer.w2)] + [x.grad]

    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.all(y[~mask] == 0)
    torch.testing.assert_close(stats.load.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("capacity_factor,group_size", [(1.0, 2048), (2.0, 8), (0.5, 5)])
def test_expert_choice_matches_reference(pad: int, capacity_factor: float, group_size: int) -> None:
    layer = make_layer("expert_choice", capacity_factor=capacity_factor, group_size=group_size)
    compare(layer, reference_expert_choice, batch=2, n=11, pad=pad)


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_matches_reference(pad: int, k: int) -> None:
    compare(make_layer("top_k", top_k=k), reference_top_k, batch=2, n=11, pad=pad)


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_backward_takes_an_expanded_gradient(k: int) -> None:
    layer = make_layer("top_k", top_k=k)
    x = torch.randn(2, 5, D, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()  # d(sum)/dy is an expanded (stride 0) tensor
    grads = [t.grad.clone() for t in (x, layer.router, layer.w1, layer.w2)]
    x.grad = None
    layer.zero_grad()
    ref = reference_top_k(layer, x.reshape(-1, D), [True] * 10)
    ref.sum().backward()
    torch.testing.assert_close(y.detach().reshape(-1, D), ref.detach(), atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, (x.grad, layer.router.grad, layer.w1.grad, layer.w2.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_expert_choice_load_is_the_real_tokens_router_preference() -> None:
    layer = make_layer("expert_choice")
    x, mask = torch.randn(1, 16, D), torch.arange(16).view(1, 16) < 10
    with torch.no_grad():
        layer.router[0] = x[0, :10].mean(0) * 2  # the real tokens lean to expert 0
    _, stats = layer(x, mask)
    want = torch.softmax(x[0, :10] @ layer.router.T, dim=-1).mean(0)  # padded tokens do not count
    torch.testing.assert_close(stats.load, want.detach())
    assert stats.load.argmax() == 0 and stats.load[0] > 1.5 / E
    assert 0 < stats.coverage <= 1


def test_grouped_matmul_matches_loop_with_empty_groups() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    x, w = torch.randn(10, 8), torch.randn(4, 8, 16)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    out = grouped_matmul(x, w, offs)
    starts = [0, 3, 3, 8]
    ref = torch.cat([x[s : s + c] @ w[e] for e, (s, c) in enumerate(zip(starts, counts.tolist()))])
    torch.testing.assert_close(out, ref)
    b = torch.randn(10, 16)
    grad_w = grouped_weight_grad(x, b, offs)
    torch.testing.assert_close(grad_w[2], x[3:8].T @ b[3:8])
    assert grad_w.shape == (4, 8, 16) and torch.all(grad_w[1] == 0)


def test_aux_losses_match_formulas() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, E)
    probs = torch.softmax(logits, -1)
    want_z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 12
    got_probs, lse = router_probs(logits * 30)  # large logits: lse must not lose precision
    torch.testing.assert_close(got_probs, torch.softmax(logits * 30, -1))
    torch.testing.assert_close(lse, torch.logsumexp(logits * 30, -1))
    assert router_z_loss(router_probs(logits)[1]).item() == pytest.approx(want_z, rel=1e-5)

    assignments = probs.argmax(-1)
    f = [(assignments == e).float().mean().item() for e in range(E)]
    p = probs.mean(0).tolist()
    assert load_balance_loss(probs, assignments).item() == pytest.approx(E * sum(a * b for a, b in zip(f, p)), rel=1e-5)
    uniform = torch.full((E * 3, E), 1 / E)
    assert load_balance_loss(uniform, torch.arange(E * 3) % E).item() == pytest.approx(1.0)

    entropy = lambda q: -sum(v * math.log(v) for v in q)  # noqa: E731
    assert limoe_local_entropy(probs).item() == pytest.approx(sum(entropy(r) for r in probs.tolist()) / 12, rel=1e-5)
    mean_entropy = entropy(probs.mean(0).tolist())
    assert limoe_global_entropy(probs).item() == pytest.approx(-mean_entropy, rel=1e-5)
    assert limoe_global_entropy(probs, threshold=mean_entropy + 0.5).item() == pytest.approx(0.5, rel=1e-4)
    assert limoe_global_entropy(probs, threshold=0.0).item() == 0.0


def test_aux_loss_is_weighted_sum_of_parts() -> None:
    layer = make_layer("top_k", z_loss_weight=0.1, load_balance_weight=0.5, limoe_local_weight=0.2, limoe_global_weight=0.3)
    _, stats = layer(torch.randn(2, 7, D))
    parts = stats.losses
    want = 0.1 * parts["z_loss"] + 0.5 * parts["load_balance"] + 0.2 * parts["limoe_local"] + 0.3 * parts["limoe_global"]
    torch.testing.assert_close(stats.aux_loss.detach(), want)
    stats.aux_loss.backward()
    assert layer.router.grad.abs().sum() > 0


def test_router_stays_float32_under_bfloat16_autocast() -> None:
    layer = make_layer("expert_choice")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._logits(torch.randn(4, D)).dtype == torch.float32


@pytest.mark.parametrize("router", ["expert_choice", "top_k"])
def test_bfloat16_autocast_routes_like_float32(router: str) -> None:
    layer = make_layer(router)
    x = torch.randn(2, 8, D)
    want, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, stats = layer(x)
    (got.float().sum() + stats.aux_loss).backward()
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
    assert layer.w1.grad is not None and layer.router.grad.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 grouped_mm kernels need CUDA")
@pytest.mark.parametrize("router,kw", [("top_k", dict(top_k=1)), ("top_k", dict(top_k=2)), ("expert_choice", {})])
def test_cuda_bfloat16_matches_cpu_float32(router: str, kw: dict) -> None:
    """The GPU path (bf16 experts: grouped_mm / bmm kernels, float32 router) gives the CPU path's numbers."""
    layer = make_layer(router, **kw)
    x = torch.randn(2, 24, D)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 20:] = False
    weight = torch.randn(2, 24, D)
    want, _ = layer(x, mask)
    (want * weight).sum().backward()
    want_grads = [p.grad.clone() for p in layer.parameters()]
    gpu = make_layer(router, **kw).cuda()
    gpu.load_state_dict(layer.state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, stats = gpu(x.cuda(), mask.cuda())
    (got.float() * weight.cuda()).sum().backward()
    torch.testing.assert_close(got.float().cpu(), want, atol=0.05, rtol=0.05)
    for g, w in zip((p.grad for p in gpu.parameters()), want_grads):
        torch.testing.assert_close(g.float().cpu(), w, atol=0.1, rtol=0.05)
    assert torch.all(got[1, 20:] == 0) and stats.load.device.type == "cuda"
