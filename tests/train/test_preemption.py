"""When checkpoints are taken without Ray: ``run.checkpoint_every`` in steps or wall-clock time, and a
real SIGTERM to this process turning into a checkpoint request while armed (Ray's handler otherwise).
The 2-worker run in test_loop.py sends SIGTERM to a real Train worker."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from imp_platform.config import ConfigError
from imp_platform.config.train import load_pretrain_config
from imp_platform.train import preemption
from imp_platform.train.checkpoint import CheckpointClock

REPO = Path(__file__).resolve().parents[2]


def _run(*overrides: str):
    return load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", ["run.steps=400", *overrides]).run


def test_checkpoint_every_takes_steps_or_a_wall_clock_time() -> None:
    assert (_run("run.checkpoint_every=200").checkpoint_steps, _run("run.checkpoint_every=200").checkpoint_seconds) \
        == (200, None)
    assert _run("run.checkpoint_every=10m").checkpoint_seconds == 600
    assert _run("run.checkpoint_every=90s").checkpoint_seconds == 90
    assert _run("run.checkpoint_every=1.5h").checkpoint_seconds == 5400
    assert _run("run.checkpoint_every=10m").checkpoint_steps is None
    assert _run("run.checkpoint_every=1000").checkpoint_every == 400  # capped at the run's steps
    for bad in ("'10'", "10 minutes", "0m", "-5s", "0", "-3"):  # a step count is a number, a time has a unit
        with pytest.raises(ConfigError, match="run.checkpoint_every"):
            _run(f"run.checkpoint_every={bad}")


def test_checkpoint_clock_counts_steps_or_time_since_the_last_checkpoint() -> None:
    now = [100.0]
    steps = CheckpointClock(steps=4, seconds=None, clock=lambda: now[0])
    assert [d for d in range(1, 13) if steps.step_due(d)] == [4, 8, 12]
    now[0] += 1e6
    assert not steps.time_up()
    timed = CheckpointClock(steps=None, seconds=600, clock=lambda: now[0])
    assert not timed.step_due(600) and not timed.time_up()
    now[0] += 599.9
    assert not timed.time_up()
    now[0] += 0.1
    assert timed.time_up()
    timed.restart()  # a checkpoint (at an eval, say) restarts the interval
    assert not timed.time_up()


def test_sigterm_asks_for_a_checkpoint_while_armed_and_gets_the_previous_handler_otherwise() -> None:
    received: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # stands for Ray's
    try:
        preemption.install()
        preemption.arm()
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread before the next bytecode
        assert preemption.requested() and received == []
        os.kill(os.getpid(), signal.SIGTERM)  # a second one: what would have happened without us
        assert received == [signal.SIGTERM]
        preemption.install()
        preemption.disarm()
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM] * 2
        preemption.arm()
        assert not preemption.requested()  # each run attempt starts without a request
    finally:
        preemption.disarm()
        signal.signal(signal.SIGTERM, original)
