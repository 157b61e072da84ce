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

    def weights_at(self, step: int) -> dict[str, float]:
        """Task weights in force at ``step`` (the last curriculum stage started, else the tasks' own)."""
        stage = None
        for candidate in self.cfg.curriculum:
            if candidate.start <= step:
                stage = candidate
        if stage is None:
            return dict(self.rates)
        return {t: float(stage.weights.get(t, 0.0)) for t in self.tasks}

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
            return [Choice(t, self._bucket(t, rng)) for t in self.tasks if weights[t] > 0]
        task = self._pick_task(step, rng)
        return [Choice(task, self._bucket(task, rng))]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "credit": self._credit.tolist(), "tasks": self.tasks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["tasks"]) != self.tasks:
            raise ValueError(f"sampler state is for tasks {state['tasks']}, this run has {self.tasks}")
        self.step = int(state["step"])
        self._credit = np.array(state["credit"], dtype=float)
