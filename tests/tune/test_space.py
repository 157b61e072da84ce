"""Sweep YAML validation against the real PretrainConfig, Tune space conversion, weight normalization."""

from __future__ import annotations

from pathlib import Path

import pytest

from imp_platform.config import ConfigError
from imp_platform.tune.values import load_sweep

REPO = Path(__file__).resolve().parents[2]


def load_error(make_sweep, space: dict, **fields) -> str:
    with pytest.raises(ConfigError) as info:
        load_sweep(make_sweep(space, **fields))
    return str(info.value)


def test_example_sweep_loads_and_paths_are_absolute():
    sweep, base = load_sweep(REPO / "jobs" / "mixing.yaml")
    assert set(sweep.space) == {"tasks.video_text.weight", "tasks.audio_text.weight", "model.moe.num_experts"}
    assert sweep.scheduler.name == "asha" and sweep.search.name == "random"
    assert (sweep.metric, sweep.mode) == ("heldout_score", "max")
    assert Path(sweep.storage_path).is_absolute() and Path(base.data.root).is_absolute()
    assert base.run.eval_every == 20  # the sweep's overrides reach the base config


@pytest.mark.parametrize(("space", "expected"), [
    ({"optim.lrr": {"uniform": [0.1, 1]}}, ["space.optim.lrr", "optim has no key 'lrr'"]),
    ({"tasks.nope.weight": {"uniform": [0.1, 1]}}, ["space.tasks.nope.weight", "tasks has no entry 'nope'"]),
    ({"model.moe.num_expertz": {"choice": [2, 4]}}, ["space.model.moe.num_expertz", "no key 'num_expertz'"]),
    ({"optim.lr.x": {"uniform": [0.1, 1]}}, ["space.optim.lr.x", "is a value"]),
    ({"optim": {"choice": [1]}}, ["space.optim", "whole section"]),
])
def test_unknown_paths_name_the_key(make_sweep, space, expected):
    message = load_error(make_sweep, space)
    for part in expected:
        assert part in message


@pytest.mark.parametrize(("spec", "expected"), [
    ({"normal": [0, 1]}, "unknown distribution 'normal'"),
    ([0.1, 1.0], "one-key mapping"),
    ({"uniform": [0.1]}, "takes [low, high]"),
    ({"choice": 3}, "takes a list"),
    ({"choice": []}, "at least 1 item"),
    ({"uniform": [1.0, 0.1]}, "low (1.0) must be below high (0.1)"),
    ({"loguniform": [0.0, 0.1]}, "loguniform needs low > 0"),
    ({"uniform": [-1.0, 1.0]}, "value -1.0 is not valid here"),  # lr must be > 0
])
def test_bad_distributions_name_the_key(make_sweep, spec, expected):
    message = load_error(make_sweep, {"optim.lr": spec})
    assert "optim.lr" in message and expected in message


def test_values_are_checked_against_the_model_config(make_sweep):
    message = load_error(make_sweep, {"model.moe.num_experts": {"uniform": [2, 8]}})
    assert "space.model.moe.num_experts" in message and "integer" in message
    message = load_error(make_sweep, {"model.moe.num_experts": {"choice": [4, -1]}})
    assert "space.model.moe.num_experts: value -1" in message
    message = load_error(make_sweep, {"model.moe.num_experts": {"randint": [2, 2]}})
    assert "space.model.moe.num_experts" in message and "exclusive" in message


def test_search_and_scheduler_must_fit_the_space(make_sweep):
    message = load_error(make_sweep, {"optim.lr": {"grid": [1e-3, 1e-2]}}, search={"name": "optuna"})
    assert "space.optim.lr" in message and "grid" in message
    message = load_error(make_sweep, {"optim.lr": {"uniform": [1e-3, 1e-2]}}, scheduler={"name": "asha", "decay": 2})
    assert "scheduler.asha.decay" in message and "unknown key" in message


def test_space_converts_to_tune_domains(make_sweep):
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    from imp_platform.tune.space import param_space

    sweep, _ = load_sweep(make_sweep({
        "optim.lr": {"loguniform": [1e-4, 1e-2]},
        "tasks.video_text.weight": {"uniform": [0.5, 2.0]},
        "model.moe.num_experts": {"randint": [2, 9]},
        "agd.mode": {"choice": ["random", "round_robin"]},
        "optim.weight_decay": {"grid": [0.0, 1e-4]},
    }))
    space = param_space(sweep)
    assert isinstance(space["optim.lr"], Float) and isinstance(space["optim.lr"].sampler, Float._LogUniform)
    assert isinstance(space["tasks.video_text.weight"], Float)
    assert isinstance(space["model.moe.num_experts"], Integer)
    assert isinstance(space["agd.mode"], Categorical)
    assert space["optim.weight_decay"] == tune.grid_search([0.0, 1e-4])
    for _ in range(50):
        assert 1e-4 <= space["optim.lr"].sample() <= 1e-2
        assert 2 <= space["model.moe.num_experts"].sample() <= 8


def test_trial_config_normalizes_weights_and_applies_budget(make_sweep):
    from imp_platform.train.tasks import resolve_model_config
    from imp_platform.tune.trial import trial_config

    sweep, base = load_sweep(make_sweep({"tasks.video_text.weight": {"uniform": [0.5, 4.0]},
                                         "model.moe.num_experts": {"choice": [2, 8]}}))
    # Unswept tasks keep their base rate (1/interval when set, else weight); the swept one uses 2.5.
    assert base.tasks["video_text"].interval is not None
    rates = {name: 2.5 if name == "video_text" else task.rate for name, task in base.tasks.items()}
    cfg = trial_config(base, {"tasks.video_text.weight": 2.5, "model.moe.num_experts": 8}, sweep, "trial-x")
    weights = {name: task.weight for name, task in cfg.tasks.items()}
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights == pytest.approx({name: rate / sum(rates.values()) for name, rate in rates.items()})
    assert all(task.interval is None for task in cfg.tasks.values())  # the weights now define the mixture
    # Scaling every task's weight by a common factor gives the same mixture.
    every = {f"tasks.{name}.weight": float(i + 1) for i, name in enumerate(base.tasks)}
    doubled = {key: 2 * value for key, value in every.items()}
    a, b = (trial_config(base, v, sweep, "t").tasks for v in (every, doubled))
    assert {n: t.weight for n, t in a.items()} == pytest.approx({n: t.weight for n, t in b.items()})
    assert resolve_model_config(cfg).moe.num_experts == 8
    assert (cfg.run.steps, cfg.run.num_workers, cfg.run.name) == (4, 1, "trial-x")
    assert cfg.run.storage_path == f"{sweep.experiment_path}-runs"


def test_all_zero_weights_fail(make_sweep):
    from imp_platform.tune.trial import normalize_task_weights

    sweep, base = load_sweep(make_sweep({"tasks.video_text.weight": {"uniform": [0.0, 1.0]}}))
    zero = base.model_copy(update={"tasks": {n: t.model_copy(update={"weight": 0.0}) for n, t in base.tasks.items()}})
    with pytest.raises(ConfigError, match="every mixing weight is 0"):
        normalize_task_weights(zero, set(zero.tasks))
