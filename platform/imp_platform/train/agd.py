"""Alternating Gradient Descent task sampler: which (task, bucket) each optimizer step runs.

Every rank builds the same sampler from the same config, and every choice is a pure function
of (seed, step) plus, for round-robin, a small deterministic credit vector. So all ranks pick
the same task and bucket each step without any communication, which is what lets the loop
all-reduce exactly the gradients that task produced (see ``train/dist.py``).

Modes:
- ``random``: weighted random task per step (IMP paper figure), bucket weighted by row count.
- ``round_robin``: IMP's released code: deterministic, each task runs once per ``interval``
  steps on average (smooth weighted round-robin over rates ``1/interval``, or the weights).
- ``mixed``: every task in every step, losses summed: the ablation baseline, not AGD.
A curriculum replaces the task weights by stage (UnIVAL-style: add tasks/modalities later).

Sweeps (``platform tune``) and curricula: a swept task weight scales that task by one factor
everywhere, so a sweep over mixing means the same thing with or without stages. Where the
tasks' own weights are in force the task's rate becomes the swept value; in every curriculum
stage the task's stage weight is multiplied by ``swept / base rate`` (a stage that gives the
task 0 keeps it at 0). The sweep does that rewrite (``tune/trial.py``); this sampler only ever
sees plain weights. A sweep can also set one stage's weight directly
(``agd.curriculum.<i>.weights.<task>``).

``TaskMix`` counts what the sampler really chose (steps, and samples as the loop reports them),
so a run can report the mix it trained on rather than the one it was configured with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from imp_platform.config.train import AGDConfig


@dataclass(frozen=True)
class Choice:
    task: str
    bucket: str


def weights_in_force(cfg: AGDConfig, rates: Mapping[str, float], step: int) -> dict[str, float]:
    """Task weights at ``step``: those of the last curriculum stage started, else ``rates``."""
    stage = None
    for candidate in cfg.curriculum:
        if candidate.start <= step:
            stage = candidate
    if stage is None:
        return dict(rates)
    return {t: float(stage.weights.get(t, 0.0)) for t in rates}


def step_shares(cfg: AGDConfig, weights: Mapping[str, float]) -> dict[str, float]:
    """What each task gets per step under ``weights``: its share of steps (AGD), or 1/0 (mixed runs every
    task with a nonzero weight each step, so there the weights only switch tasks on and off)."""
    if cfg.mode == "mixed":
        return {t: float(w > 0) for t, w in weights.items()}
    total = sum(weights.values())
    return {t: (w / total if total > 0 else 0.0) for t, w in weights.items()}


def mix_segments(cfg: AGDConfig, rates: Mapping[str, float], steps: int) -> list[tuple[int, int, dict[str, float]]]:
    """``(first, end, step shares)`` for each stretch of ``[0, steps)`` with constant weights.

    What a run of ``steps`` steps can be asked to train; a sweep compares these across
    values to know whether a swept value changes the run within its budget.
    """
    bounds = sorted({0, steps, *(s.start for s in cfg.curriculum if s.start < steps)})
    return [(a, b, step_shares(cfg, weights_in_force(cfg, rates, a))) for a, b in zip(bounds, bounds[1:])]


class TaskMix:
    """The realised mix since step 0: optimizer steps and samples per task (resumed with the sampler)."""

    def __init__(self, tasks: list[str]):
        self.steps = dict.fromkeys(tasks, 0)
        self.samples = dict.fromkeys(tasks, 0)
        self.total_steps = 0

    def add_step(self, tasks: list[str]) -> None:
        self.total_steps += 1
        for task in tasks:
            self.steps[task] += 1

    def add_samples(self, samples: Mapping[str, int]) -> None:
        """``task -> samples`` trained in one step (all ranks together)."""
        for task, count in samples.items():
            self.samples[task] += int(count)

    def metrics(self) -> dict[str, float]:
        """``steps_frac_<task>`` (fraction of steps that ran it) and ``samples_<task>`` for a report."""
        total = max(self.total_steps, 1)
        return {**{f"steps_frac_{t}": n / total for t, n in self.steps.items()},
                **{f"samples_{t}": float(n) for t, n in self.samples.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": dict(self.steps), "samples": dict(self.samples), "total_steps": self.total_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = {t: int(state["steps"].get(t, 0)) for t in self.steps}
        self.samples = {t: int(state["samples"].get(t, 0)) for t in self.samples}
        self.total_steps = int(state["total_steps"])


class AGDSampler:
    """Deterministic per-step (task, bucket) choice shared by all ranks; resumable."""

    def __init__(self, cfg: AGDConfig, rates: Mapping[str, float], buckets: Mapping[str, Mapping[str, int]]):
        """``rates``: task -> weight (random) or 1/interval (round-robin); ``buckets``: task -> {bucket: rows}."""
        missing = set(rates) - set(buckets)
        if missing:
            raise ValueError(f"tasks without buckets: {sorted(missing)}")
        self.cfg = cfg
        self.tasks = list(rates)
        self.rates = dict(rates)
        self.buckets = {t: dict(b) for t, b in buckets.items()}
        for task in self.tasks:
            if not self.buckets[task]:
                raise ValueError(f"task {task!r} has no buckets")
        self.step = 0
        self._credit = np.zeros(len(self.tasks))
        self.mix = TaskMix(self.tasks)

    def weights_at(self, step: int) -> dict[str, float]:
        """Task weights in force at ``step`` (the last curriculum stage started, else the tasks' own)."""
        return weights_in_force(self.cfg, self.rates, step)

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, step])

    def _bucket(self, task: str, rng: np.random.Generator) -> str:
        names = list(self.buckets[task])
        counts = np.array([self.buckets[task][n] for n in names], dtype=float)
        p = counts / counts.sum() if counts.sum() > 0 else None
        return names[int(rng.choice(len(names), p=p))]

    def _pick_task(self, step: int, rng: np.random.Generator) -> str:
        weights = self.weights_at(step)
        w = np.array([weights[t] for t in self.tasks], dtype=float)
        if w.sum() <= 0:
            raise ValueError(f"all task weights are zero at step {step}")
        if self.cfg.mode == "random":
            return self.tasks[int(rng.choice(len(self.tasks), p=w / w.sum()))]
        # Smooth weighted round-robin: deterministic, frequency exactly proportional to w.
        self._credit += w / w.sum()
        index = int(np.argmax(np.where(w > 0, self._credit, -np.inf)))
        self._credit[index] -= 1.0
        return self.tasks[index]

    def next(self) -> list[Choice]:
        """The step's work: one Choice (AGD) or one per task with nonzero weight (mixed)."""
        step, rng = self.step, self._rng(self.step)
        self.step += 1
        if self.cfg.mode == "mixed":
            weights = self.weights_at(step)
            choices = [Choice(t, self._bucket(t, rng)) for t in self.tasks if weights[t] > 0]
        else:
            task = self._pick_task(step, rng)
            choices = [Choice(task, self._bucket(task, rng))]
        self.mix.add_step([c.task for c in choices])
        return choices

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "credit": self._credit.tolist(), "tasks": self.tasks, "mix": self.mix.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["tasks"]) != self.tasks:
            raise ValueError(f"sampler state is for tasks {state['tasks']}, this run has {self.tasks}")
        self.step = int(state["step"])
        self._credit = np.array(state["credit"], dtype=float)
        if "mix" in state:  # checkpoints written before the mix was counted resume with fresh counters
            self.mix.load_state_dict(state["mix"])
