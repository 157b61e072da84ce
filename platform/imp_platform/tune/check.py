"""Before any trial starts: every swept key must be able to change a trial within its step budget.

A swept value that cannot act makes a sweep that measures nothing (the shipped example once
swept task weights that the demo's first curriculum stage masked for every step of every
trial). Each key is probed by building the trial config for each of its extreme values, the
other keys held at one value, and comparing:

- the configs themselves: equal means nothing reads the key (the sweep sets it itself, or
  another swept key overrides it);
- when only the task mix differs, the mix of every step of the budget (``mix_segments``):
  equal means a curriculum stage, a zero weight or ``agd.mode: mixed`` masks the key;
- a task setting (``tasks.<task>.*``) of a task that never runs within the budget.

Keys whose meaning a sweep cannot vary per trial are refused by name (the data is prepared
once from the base config; the scheduler counts reports by the base's ``run.eval_every``).
"""

from __future__ import annotations

from typing import Any

from imp_platform.config import ConfigError
from imp_platform.config.train import PretrainConfig
from imp_platform.config.tune import SweepConfig
from imp_platform.train.agd import mix_segments
from imp_platform.tune.trial import trial_config, weight_task

FIXED = {
    "data": "the data is prepared once, from the base config, before any trial starts",
    "run.eval_every": "the scheduler counts its rungs in reports of the base config's run.eval_every",
}


def check_sweep_acts(sweep: SweepConfig, base: PretrainConfig) -> None:
    """Raise a ConfigError naming every swept key that cannot change a trial, and why."""
    problems = [problem for key in sweep.space if (problem := why_inert(key, sweep, base)) is not None]
    if problems:
        raise ConfigError(f"sweep {sweep.name!r}: swept keys that cannot change any trial:\n  " + "\n  ".join(problems))


def why_inert(key: str, sweep: SweepConfig, base: PretrainConfig) -> str | None:
    """Why ``key`` cannot change a trial of ``sweep``, or None when some value of it does."""
    for prefix, reason in FIXED.items():
        if key == prefix or key.startswith(prefix + "."):
            return f"{key}: {reason}"
    configs = probe_configs(key, sweep, base)
    dumps = [_dump(cfg) for cfg in configs]
    if all(dump == dumps[0] for dump in dumps):
        return f"{key}: nothing reads it: every value gives the same trial config (the sweep sets it itself, " \
               "or another swept key overrides it)"
    task = _task_of(key)
    if all(_without_mix(dump) == _without_mix(dumps[0]) for dump in dumps):
        segments = [mix_segments(cfg.agd, _rates(cfg), sweep.steps) for cfg in configs]
        if all(seg == segments[0] for seg in segments):
            return f"{key}: masked for all {sweep.steps} steps: {_explain(configs[0], key, task, sweep.steps)}"
    elif task is not None and all(_never_runs(cfg, task, sweep.steps) for cfg in configs):
        return f"{key}: task {task} never runs within the {sweep.steps} steps: {_explain(configs[0], key, task, sweep.steps)}"
    return None


def probe_configs(key: str, sweep: SweepConfig, base: PretrainConfig) -> list[PretrainConfig]:
    """The trial configs of each extreme value of ``key``, every other swept key at its first value."""
    reference = {other: dist.probe_values()[0] for other, dist in sweep.space.items()}
    return [trial_config(base, {**reference, key: value}, sweep, run_name="check")
            for value in sweep.space[key].probe_values()]


def _dump(cfg: PretrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def _without_mix(dump: dict[str, Any]) -> dict[str, Any]:
    """A config dump without what only sets the task mix (task weights and intervals, curriculum)."""
    tasks = {name: {k: v for k, v in task.items() if k not in ("weight", "interval")} for name, task in dump["tasks"].items()}
    return {**dump, "tasks": tasks, "agd": {**dump["agd"], "curriculum": None}}


def _rates(cfg: PretrainConfig) -> dict[str, float]:
    """Task rates as the training loop hands them to the AGD sampler."""
    return {name: task.rate for name, task in cfg.tasks.items()}


def _task_of(key: str) -> str | None:
    """The task a key is about: ``tasks.<task>.*`` or ``agd.curriculum.<i>.weights.<task>``."""
    parts = key.split(".")
    if parts[0] == "tasks" and len(parts) >= 3:
        return parts[1]
    if parts[:2] == ["agd", "curriculum"] and len(parts) == 5 and parts[3] == "weights":
        return parts[4]
    return weight_task(key)


def _never_runs(cfg: PretrainConfig, task: str, steps: int) -> bool:
    return all(shares[task] == 0 for _, _, shares in mix_segments(cfg.agd, _rates(cfg), steps))


def _explain(cfg: PretrainConfig, key: str, task: str | None, steps: int) -> str:
    """What sets the mix of each stretch of the budget, in words, from ``task``'s side when there is one."""
    parts = key.split(".")
    if parts[:2] == ["agd", "curriculum"] and len(parts) > 2 and parts[2].isdigit():
        stage = cfg.agd.curriculum[int(parts[2])]
        if stage.start >= steps:
            return f"curriculum stage {parts[2]} starts at step {stage.start}, after the {steps}-step budget"
    pieces = []
    for first, end, shares in mix_segments(cfg.agd, _rates(cfg), steps):
        stage = [i for i, s in enumerate(cfg.agd.curriculum) if s.start <= first]
        source = f"curriculum stage {stage[-1]}" if stage else "the tasks' own weights"
        running = sorted(t for t, share in shares.items() if share > 0)
        if task is not None and shares.get(task, 0) == 0:
            what = f"gives {task} weight 0 (runs {', '.join(running)})"
        elif cfg.agd.mode == "mixed":
            what = "runs every task with a nonzero weight in each step (agd.mode mixed), whatever the weights"
        else:
            what = f"runs only {', '.join(running)}"
        pieces.append(f"{source} {what} at steps {first}-{end - 1}")
    return "; ".join(pieces)
