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
from imp_platform.config.tune import SweepConfig
from imp_platform.tune.values import apply_values

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


def scale_stages(cfg: PretrainConfig, factors: dict[str, float]) -> PretrainConfig:
    """``cfg`` with each task's weight in every curriculum stage multiplied by its factor (default 1)."""
    stages = [stage.model_copy(update={"weights": {t: w * factors.get(t, 1.0) for t, w in stage.weights.items()}})
              for stage in cfg.agd.curriculum]
    return cfg.model_copy(update={"agd": cfg.agd.model_copy(update={"curriculum": stages})})


def stage_factors(base: PretrainConfig, values: dict[str, Any], swept: set[str]) -> dict[str, float]:
    """``swept / base rate`` per swept task: the one factor that scales the task in every stage.

    With it a swept weight equal to the base rate reproduces the base run, stages included.
    """
    zero = sorted(task for task in swept if base.tasks[task].rate <= 0)
    if zero:
        raise ConfigError(f"space.tasks.{zero[0]}.weight: the base config gives {zero[0]} rate 0, so there is "
                          "nothing to scale its curriculum stage weights by; give it a nonzero weight in the base")
    return {task: values[f"tasks.{task}.weight"] / base.tasks[task].rate for task in swept}


def train_storage(sweep: SweepConfig) -> str:
    """Where the trials' Train runs keep checkpoints: beside the Tune experiment, not inside it."""
    return f"{sweep.experiment_path}-runs"


def sampled_config(base: PretrainConfig, values: dict[str, Any], **run: Any) -> PretrainConfig:
    """``base`` with the sampled values and ``run.*`` fields replaced.

    A swept task weight scales its task by one factor everywhere (see ``train/agd.py``): the
    tasks' own weights are normalized with it, and its curriculum stage weights are scaled.
    """
    cfg = apply_values(base, {**values, **{f"run.{key}": value for key, value in run.items()}})
    swept = {task for task in map(weight_task, values) if task is not None}
    if not swept:
        return cfg
    cfg = normalize_task_weights(cfg, swept)
    return scale_stages(cfg, stage_factors(base, values, swept)) if cfg.agd.curriculum else cfg


def trial_config(base: PretrainConfig, values: dict[str, Any], sweep: SweepConfig, run_name: str) -> PretrainConfig:
    """The pretraining config one trial runs: sampled values on the sweep's step budget and resources.

    Checkpoints come with the evals only, so every report Tune sees carries the held-out metric
    and the scheduler's time (reports) is counted in eval intervals.
    """
    res = sweep.resources
    return sampled_config(
        base, values, steps=sweep.steps, checkpoint_every=base.run.eval_every,
        num_workers=res.workers, cpus_per_worker=res.cpus_per_worker,
        use_gpu=res.use_gpu, name=run_name, storage_path=train_storage(sweep), storage_options=sweep.storage_options,
    )


def swept_values(config: dict[str, Any], sweep: SweepConfig) -> dict[str, Any]:
    """The trial's sampled values (Tune may add keys of its own to ``config``)."""
    return {key: config[key] for key in sweep.space if key in config}


def run_trial(config: dict[str, Any], *, base: PretrainConfig, sweep: SweepConfig) -> None:
    """The Tune function trainable: build this trial's TorchTrainer and fit it."""
    from ray import tune

    from imp_platform.train.trainer import build_trainer
    from imp_platform.tune.report import SweepReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, swept_values(config, sweep), sweep, run_name=f"trial-{trial_id}")
    log.info("trial %s: %s", trial_id, {k: config[k] for k in sweep.space if k in config})
    build_trainer(cfg, callbacks=[SweepReportCallback(model_cost(cfg))]).fit()


def model_cost(cfg: PretrainConfig) -> dict[str, float]:
    """``params_total`` and ``params_per_token`` of the model a trial trains (read against its score)."""
    from imp_platform.model.presets import count_params
    from imp_platform.train.tasks import resolve_model_config

    counts = count_params(resolve_model_config(cfg))
    return {"params_total": float(counts["total"]), "params_per_token": float(counts["per_token"])}
