"""Warmup + cosine schedule, AdamW groups, gradient clipping."""

from __future__ import annotations

import pytest
import torch

from imp_platform.config.train import OptimConfig, ScheduleConfig
from imp_platform.train.optim import build_optimizer, build_scheduler, clip_gradients, lr_factor


def test_warmup_then_cosine_to_min_lr():
    peak, floor = 1e-3, 1e-5
    f = [lr_factor(s, 100, 10, peak, floor) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[55] == pytest.approx(0.5 * (1 + floor / peak), rel=1e-6)
    assert f[100] * peak == pytest.approx(floor)


def test_scheduler_drives_optimizer_lr_and_no_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert len(opt.param_groups[0]["params"]) == 1  # only the Linear weight decays
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=4, min_lr=0.0), OptimConfig(lr=1e-3), 20)
    lrs = []
    for _ in range(20):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_clip_gradients_bounds_global_norm():
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.full((10,), 3.0)
    norm = clip_gradients([p], 1.0)
    assert norm == pytest.approx(3.0 * 10**0.5)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    assert clip_gradients([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0.0
