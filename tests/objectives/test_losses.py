"""Each loss against its formula written out with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from imp_platform.objectives import classification_loss, gather_with_grad, mil_nce_loss, nce_loss


def normalized(x: torch.Tensor) -> list[list[float]]:
    return (x / x.norm(dim=-1, keepdim=True)).tolist()


def dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v))


def info_nce(rows: list[list[float]], cols: list[list[float]], t: float) -> float:
    total = 0.0
    for i, r in enumerate(rows):
        logits = [dot(r, c) / t for c in cols]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
    return total / len(rows)


def test_nce_matches_formula() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(5, 8) * 3, torch.randn(5, 8)
    want = (info_nce(normalized(a), normalized(b), 0.2) + info_nce(normalized(b), normalized(a), 0.2)) / 2
    assert nce_loss(a, b, 0.2).item() == pytest.approx(want, rel=1e-5)


def test_nce_learnable_temperature_gets_gradient() -> None:
    log_t = torch.tensor(math.log(0.2), requires_grad=True)
    torch.manual_seed(0)
    nce_loss(torch.randn(4, 8), torch.randn(4, 8), log_t.exp()).backward()
    assert log_t.grad is not None and log_t.grad != 0


def test_mil_nce_matches_formula() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 3, 8)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    t = 0.1
    an = normalized(a)
    bn = [normalized(b[j]) for j in range(4)]
    s = lambda i, j, k: dot(an[i], bn[j][k]) / t  # noqa: E731
    real = lambda j: [k for k in range(3) if mask[j, k]]  # noqa: E731
    total = 0.0
    for i in range(4):
        pos = math.log(sum(math.exp(s(i, i, k)) for k in real(i)))
        den_ab = math.log(sum(math.exp(s(i, j, k)) for j in range(4) for k in real(j)))
        den_ba = math.log(sum(math.exp(s(j, i, k)) for j in range(4) for k in real(i)))
        total += (den_ab - pos) + (den_ba - pos)
    assert mil_nce_loss(a, b, t, mask=mask).item() == pytest.approx(total / 8, rel=1e-5)


def test_mil_nce_with_one_positive_is_nce() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    torch.testing.assert_close(mil_nce_loss(a, b[:, None], 0.07), nce_loss(a, b, 0.07))


def test_classification_loss_matches_formula_and_skips_unlabelled() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 3, -1, 4])
    rows = [(logits[i].tolist(), int(labels[i])) for i in range(4) if labels[i] >= 0]
    want = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in rows) / len(rows)
    assert classification_loss(logits, labels).item() == pytest.approx(want, rel=1e-5)


def test_gather_without_process_group_is_identity() -> None:
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x
