"""A swept value always acts: the check before any trial, and how swept weights meet a curriculum.

The shipped ``jobs/mixing.yaml`` is loaded as a user loads it; a shorter budget than its
curriculum's first stage must be refused, naming the keys and the stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imp_platform.config import ConfigError
from imp_platform.tune.values import load_sweep
from imp_platform.tune.check import check_sweep_acts
from imp_platform.tune.trial import model_cost, trial_config

REPO = Path(__file__).resolve().parents[2]
MIXING = REPO / "jobs" / "mixing.yaml"


def refusal(path: Path, overrides: list[str] | None = None) -> str:
    sweep, base = load_sweep(path, overrides)
    with pytest.raises(ConfigError) as info:
        check_sweep_acts(sweep, base)
    return str(info.value)


def test_shipped_sweep_acts_and_a_budget_inside_the_first_stage_is_refused():
    check_sweep_acts(*load_sweep(MIXING))
    message = refusal(MIXING, ["steps=20"])
    for task in ("video_text", "audio_text"):
        assert f"tasks.{task}.weight: masked for all 20 steps: curriculum stage 0 gives {task} weight 0" in message
    assert "model.moe.num_experts" not in message  # it acts: only the masked keys are named


@pytest.mark.parametrize(("key", "spec", "expected"), [
    ("run.steps", {"choice": [10, 20]}, "run.steps: nothing reads it"),  # the sweep's budget wins
    ("data.root", {"choice": ["a", "b"]}, "data.root: the data is prepared once"),
    ("agd.curriculum.1.weights.audio_text", {"uniform": [0.1, 1.0]},
     "curriculum stage 1 starts at step 20, after the 20-step budget"),
    ("tasks.audio_text.token_budget", {"choice": [512, 1024]}, "task audio_text never runs within the 20 steps"),
])
def test_keys_that_cannot_act_are_named_with_the_reason(key, spec, expected):
    assert expected in refusal(MIXING, ["steps=20", f"space.{key}={spec}"])


def test_stage_weights_and_moe_router_keys_can_be_swept():
    sweep, base = load_sweep(MIXING, ["space.agd.curriculum.1.weights.audio_text={uniform: [0.1, 1.0]}",
                                      "space.model.moe.router={choice: [expert_choice, top_k]}",
                                      "space.model.moe.capacity_factor={uniform: [1.0, 2.0]}",
                                      "space.model.moe.last_n={choice: [1, 2]}"])
    check_sweep_acts(sweep, base)
    values = {"tasks.video_text.weight": 1.0, "tasks.audio_text.weight": 0.25, "model.moe.num_experts": 4,
              "agd.curriculum.1.weights.audio_text": 0.5, "model.moe.router": "expert_choice",
              "model.moe.capacity_factor": 1.0, "model.moe.last_n": 1}
    cfg = trial_config(base, values, sweep, "t")
    assert cfg.agd.curriculum[1].weights["audio_text"] == 0.5  # swept stage weight, factor 1 from base rate
    # Parameters per token follow the capacity factor, total parameters the sparse layers.
    cost = model_cost(cfg)
    assert model_cost(trial_config(base, {**values, "model.moe.capacity_factor": 2.0}, sweep, "t"))["params_per_token"] \
        > cost["params_per_token"]
    assert model_cost(trial_config(base, {**values, "model.moe.last_n": 2}, sweep, "t"))["params_total"] > cost["params_total"]
    with pytest.raises(ConfigError, match=r"agd.curriculum is a list of 2; index it with 0-1"):
        load_sweep(MIXING, ["space.agd.curriculum.2.weights.audio_text={uniform: [0.1, 1.0]}"])


def test_mixed_batches_ignore_weights(make_sweep):
    message = refusal(make_sweep({"tasks.video_text.weight": {"uniform": [0.5, 2.0]}},
                                 overrides=["agd.mode=mixed", "agd.curriculum=[]"]))
    assert "tasks.video_text.weight: masked for all 4 steps" in message and "agd.mode mixed" in message


def test_swept_weight_scales_its_task_in_every_stage():
    """A swept weight equal to the base rate is the base run; twice that doubles the task in each stage."""
    sweep, base = load_sweep(MIXING)
    rate = base.tasks["audio_text"].rate
    values = {"tasks.video_text.weight": base.tasks["video_text"].rate, "model.moe.num_experts": 4}
    same = trial_config(base, {**values, "tasks.audio_text.weight": rate}, sweep, "t")
    assert same.agd.curriculum == base.agd.curriculum
    doubled = trial_config(base, {**values, "tasks.audio_text.weight": 2 * rate}, sweep, "t")
    for before, after in zip(base.agd.curriculum, doubled.agd.curriculum, strict=True):
        # Stage 0 leaves audio_text out and still does: scaling never adds a task to a stage.
        assert after.weights == {t: w * (2 if t == "audio_text" else 1) for t, w in before.weights.items()}
