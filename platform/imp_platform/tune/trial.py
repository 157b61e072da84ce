"""One Tune trial = one Ray Train run of the pretraining loop (the Train V2 + Tune pattern).

Tune only drives: the trial function turns the sampled values into a ``PretrainConfig``,
builds the ``TorchTrainer`` with a ``TuneReportCallback`` (so every eval-interval report
reaches the scheduler) and waits for it. The Train run is named after the trial id, so a
restored trial continues its own Train run from its last checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from imp_platform.config import ConfigError
from imp_platform.config.train import PretrainConfig
from imp_platform.config.tune import SweepConfig, apply_values

log = logging.getLogger(__name__)


def weight_task(key: str) -> str | None:
    """``tasks.video_text.weight`` -> ``video_text``; None for any other key."""
    parts = key.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "tasks" and parts[2] == "weight" else None


def normalize_task_weights(cfg: PretrainConfig, swept: set[str]) -> PretrainConfig:
    """Turn the task mixture into weights that sum to 1, with no fixed intervals.

    A task's sampling rate is ``1/interval`` when it has one, else its weight; a swept weight
    must win over a base interval, so the tasks in ``swept`` use their (sampled) weight and
    the others keep the base rate. After normalizing, a weight is the fraction of steps the task
    gets, so weights compare across trials, and trials that differ only by a common factor on
    every weight become the same config.
    """
    rates = {name: task.weight if name in swept else task.rate for name, task in cfg.tasks.items()}
    total = sum(rates.values())
    if total <= 0:
        raise ConfigError(f"tasks: every mixing weight is 0 ({', '.join(cfg.tasks)}); nothing would train")
    values: dict[str, Any] = {}
    for name, rate in rates.items():
        values[f"tasks.{name}.weight"] = rate / total
        values[f"tasks.{name}.interval"] = None
    return apply_values(cfg, values)


def train_storage(sweep: SweepConfig) -> str:
    """Where the trials' Train runs keep checkpoints: beside the Tune experiment, not inside it."""
    return f"{sweep.experiment_path}-runs"


def sampled_config(base: PretrainConfig, values: dict[str, Any], **run: Any) -> PretrainConfig:
    """``base`` with the sampled values (mixing weights normalized) and ``run.*`` fields replaced."""
    cfg = apply_values(base, {**values, **{f"run.{key}": value for key, value in run.items()}})
    swept = {task for task in map(weight_task, values) if task is not None}
    return normalize_task_weights(cfg, swept) if swept else cfg


def trial_config(base: PretrainConfig, values: dict[str, Any], sweep: SweepConfig, run_name: str) -> PretrainConfig:
    """The pretraining config one trial runs: sampled values on the sweep's step budget and resources."""
    res = sweep.resources
    return sampled_config(
        base, values, steps=sweep.steps, num_workers=res.workers, cpus_per_worker=res.cpus_per_worker,
        use_gpu=res.use_gpu, name=run_name, storage_path=train_storage(sweep), storage_options=sweep.storage_options,
    )


def swept_values(config: dict[str, Any], sweep: SweepConfig) -> dict[str, Any]:
    """The trial's sampled values (Tune may add keys of its own to ``config``)."""
    return {key: config[key] for key in sweep.space if key in config}


def run_trial(config: dict[str, Any], *, base: PretrainConfig, sweep: SweepConfig) -> None:
    """The Tune function trainable: build this trial's TorchTrainer and fit it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from imp_platform.train.trainer import build_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, swept_values(config, sweep), sweep, run_name=f"trial-{trial_id}")
    log.info("trial %s: %s", trial_id, {k: config[k] for k in sweep.space if k in config})
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
