"""The AGD sampler: shared sequence across ranks, weights, round-robin, curriculum, mixed, resume, realised mix."""

from __future__ import annotations

from collections import Counter

import pytest

from imp_platform.config.train import AGDConfig, CurriculumStage
from imp_platform.train.agd import AGDSampler, mix_segments

BUCKETS = {"a": {"b0": 30, "b1": 10}, "b": {"b0": 5}, "c": {"b0": 1, "b2": 1}}


def make(mode: str = "random", rates=None, **kw) -> AGDSampler:
    return AGDSampler(AGDConfig(mode=mode, **kw), rates or {"a": 6.0, "b": 3.0, "c": 1.0}, BUCKETS)


def draw(sampler: AGDSampler, n: int):
    return [sampler.next() for _ in range(n)]


def test_every_rank_draws_the_same_sequence_and_seeds_differ():
    assert draw(make(seed=3), 200) == draw(make(seed=3), 200)
    assert draw(make(seed=3), 200) != draw(make(seed=4), 200)


def test_random_mode_respects_task_and_bucket_weights():
    choices = [c[0] for c in draw(make(seed=1), 6000)]
    tasks = Counter(c.task for c in choices)
    assert all(len(c) == 1 for c in draw(make(), 10))
    assert tasks["a"] / 6000 == pytest.approx(0.6, abs=0.03)
    assert tasks["b"] / 6000 == pytest.approx(0.3, abs=0.03)
    buckets = Counter(c.bucket for c in choices if c.task == "a")
    assert buckets["b0"] / tasks["a"] == pytest.approx(0.75, abs=0.04)


def test_round_robin_is_deterministic_with_exact_interval_rates():
    # IMP-style intervals 1, 2, 4 -> rates 1, 1/2, 1/4: over 70 steps exactly 40/20/10.
    sampler = make("round_robin", rates={"a": 1.0, "b": 0.5, "c": 0.25})
    tasks = [c[0].task for c in draw(sampler, 70)]
    assert Counter(tasks) == {"a": 40, "b": 20, "c": 10}
    # Spread out: "c" never runs twice within 5 steps.
    positions = [i for i, t in enumerate(tasks) if t == "c"]
    assert min(b - a for a, b in zip(positions, positions[1:])) >= 5


def test_curriculum_stages_switch_weights_by_step():
    sampler = make(seed=0, curriculum=[CurriculumStage(start=0, weights={"a": 1.0}),
                                       CurriculumStage(start=50, weights={"b": 1.0, "c": 1.0})])
    steps = draw(sampler, 150)
    assert {c[0].task for c in steps[:50]} == {"a"}
    assert {c[0].task for c in steps[50:]} == {"b", "c"}
    assert sampler.weights_at(49) == {"a": 1.0, "b": 0.0, "c": 0.0}


def test_mixed_mode_runs_every_task_each_step():
    step = make("mixed").next()
    assert [c.task for c in step] == ["a", "b", "c"]


@pytest.mark.parametrize("mode", ["random", "round_robin"])
def test_state_dict_resumes_the_same_sequence(mode):
    full = draw(make(mode), 60)
    first = make(mode)
    draw(first, 25)
    resumed = make(mode)
    resumed.load_state_dict(first.state_dict())
    assert draw(resumed, 35) == full[25:]


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="no buckets"):
        AGDSampler(AGDConfig(), {"a": 1.0}, {"a": {}})
    with pytest.raises(ValueError, match="all task weights are zero"):
        AGDSampler(AGDConfig(), {"a": 0.0}, {"a": {"b": 1}}).next()
    with pytest.raises(ValueError, match="strictly increasing"):
        AGDConfig(curriculum=[CurriculumStage(start=5, weights={}), CurriculumStage(start=5, weights={})])


def test_task_mix_counts_what_was_chosen_and_resumes():
    rates = {"a": 1.0, "b": 0.5, "c": 0.25}
    sampler = make("round_robin", rates=rates)
    chosen = Counter(c[0].task for c in draw(sampler, 40))
    sampler.mix.add_samples({"a": 8, "b": 4})
    assert sampler.mix.steps == dict(chosen)
    metrics = sampler.mix.metrics()
    assert metrics["steps_frac_a"] == pytest.approx(chosen["a"] / 40) and metrics["samples_b"] == 4.0
    resumed = make("round_robin", rates=rates)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.mix.state_dict() == sampler.mix.state_dict()
    draw(resumed, 30)
    assert resumed.mix.total_steps == 70 and sum(resumed.mix.steps.values()) == 70


def test_mixed_mode_counts_every_task_in_each_step():
    sampler = make("mixed")
    draw(sampler, 5)
    assert sampler.mix.metrics()["steps_frac_c"] == 1.0


def test_mix_segments_cover_the_budget_with_the_weights_in_force():
    cfg = AGDConfig(curriculum=[CurriculumStage(start=0, weights={"a": 1.0}),
                                CurriculumStage(start=50, weights={"b": 1.0, "c": 3.0})])
    rates = {"a": 6.0, "b": 3.0, "c": 1.0}
    assert mix_segments(cfg, rates, 60) == [(0, 50, {"a": 1.0, "b": 0.0, "c": 0.0}),
                                            (50, 60, {"a": 0.0, "b": 0.25, "c": 0.75})]
    assert mix_segments(cfg, rates, 50) == [(0, 50, {"a": 1.0, "b": 0.0, "c": 0.0})]  # stage 1 is past the budget
    assert mix_segments(AGDConfig(), rates, 10) == [(0, 10, {"a": 0.6, "b": 0.3, "c": 0.1})]
    assert mix_segments(AGDConfig(mode="mixed"), {**rates, "c": 0.0}, 10) == [(0, 10, {"a": 1.0, "b": 1.0, "c": 0.0})]
