"""Where a restarted trial's Train run begins, and what an exploit keeps of the donor (no Ray needed)."""

from __future__ import annotations

import pytest
import torch


def test_a_restarted_trial_continues_its_own_run_and_an_exploit_starts_from_the_donor():
    from imp_platform.tune.lineage import TrainPointer, train_start

    assert train_start("a_1", None) == ("trial-a_1", None)
    own = TrainPointer("a_1", "trial-a_1-from-b_2-8", 12, "s3://x/trial-a_1-from-b_2-8/checkpoint_0000012")
    assert train_start("a_1", own) == ("trial-a_1-from-b_2-8", None)  # Ray Train resumes it by name
    donor = TrainPointer("b_2", "trial-b_2", 8, "s3://x/trial-b_2/checkpoint_0000008")
    assert train_start("a_1", donor) == ("trial-a_1-from-b_2-8", donor.uri)


def _optimizer(lr: float, decay: float):
    from imp_platform.config.train import OptimConfig, ScheduleConfig
    from imp_platform.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optim = OptimConfig(lr=lr, weight_decay=decay)
    optimizer = build_optimizer(model, optim)
    return model, optimizer, build_scheduler(optimizer, ScheduleConfig(warmup_steps=2, min_lr=0.0), optim, 10)


def test_an_adopted_optimizer_state_trains_on_with_this_runs_hyperparameters(one_torch_thread):
    """The donor's moments and schedule position are kept; the exploiting run's lr and decay replace the donor's."""
    from imp_platform.train.loop import _TrainState
    from imp_platform.train.optim import lr_factor

    model, donor, donor_schedule = _optimizer(1e-2, 0.1)
    for _ in range(4):
        model(torch.ones(2, 4)).sum().backward()
        donor.step()
        donor_schedule.step()
    _, optimizer, schedule = _optimizer(3e-3, 0.0)
    own = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(donor.state_dict())
    schedule.load_state_dict(donor_schedule.state_dict())
    state = _TrainState(model, None, optimizer, schedule, *[None] * 5, rank=0, world=1, sharded=False)

    state._use_hyperparameters(own)

    assert schedule.last_epoch == 4 and optimizer.state_dict()["state"][0]["step"] == 4  # the donor's position
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * lr_factor(4, 10, 2, 3e-3, 0.0))
    schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(3e-3 * lr_factor(5, 10, 2, 3e-3, 0.0))
