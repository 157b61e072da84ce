"""One Tune trial = one Ray Train run of the pretraining loop (the Train V2 + Tune pattern).

Tune only drives: the trial function turns the sampled values into a ``PretrainConfig``,
builds the ``TorchTrainer`` with a ``SweepReportCallback`` and hands every eval-interval
report, with a pointer to its Train checkpoint, to the scheduler (``tune/report.py``). The
Train run is named after the trial id, so a restored trial continues its own Train run from its
last checkpoint; a PBT exploit starts a new one from the donor's (``tune/lineage.py``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from imp_platform.config import ConfigError
from imp_platform.config.train import PretrainConfig
from imp_platform.config.tune import PbtScheduler, SweepConfig
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


def num_reports(sweep: SweepConfig, base: PretrainConfig) -> int:
    """How many times one trial reports: every ``run.eval_every`` steps and at the last step."""
    return math.ceil(sweep.steps / min(base.run.eval_every, sweep.steps))


def trial_config(base: PretrainConfig, values: dict[str, Any], sweep: SweepConfig, run_name: str) -> PretrainConfig:
    """The pretraining config one trial runs: sampled values on the sweep's step budget and resources.

    Checkpoints come with the evals only, so every report Tune sees carries the held-out metric
    and the scheduler's time (reports) is counted in eval intervals. Under PBT a trial keeps all
    its checkpoints: an exploiting trial may start from any report's checkpoint of its donor
    while the donor trains on.
    """
    res = sweep.resources
    keep = num_reports(sweep, base) if isinstance(sweep.scheduler, PbtScheduler) else base.run.keep_checkpoints
    return sampled_config(
        base, values, steps=sweep.steps, checkpoint_every=base.run.eval_every, keep_checkpoints=keep,
        num_workers=res.workers, cpus_per_worker=res.cpus_per_worker,
        use_gpu=res.use_gpu, name=run_name, storage_path=train_storage(sweep), storage_options=sweep.storage_options,
    )


def swept_values(config: dict[str, Any], sweep: SweepConfig) -> dict[str, Any]:
    """The trial's sampled values (Tune may add keys of its own to ``config``)."""
    return {key: config[key] for key in sweep.space if key in config}


def run_trial(config: dict[str, Any], *, base: PretrainConfig, sweep: SweepConfig) -> None:
    """The Tune function trainable: build this trial's TorchTrainer, fit it and report to Tune.

    With a Tune checkpoint (a resumed trial, or a PBT exploit) the Train run starts where its
    pointer says (``lineage.train_start``).
    """
    from ray import tune

    from imp_platform.train.trainer import build_trainer, checkpoint_uri
    from imp_platform.tune.lineage import TrainPointer, read_pointer, train_start
    from imp_platform.tune.report import SweepReportCallback, fit_and_report

    trial_id = tune.get_context().get_trial_id()
    run_name, resume_from = train_start(trial_id, read_pointer(tune.get_checkpoint()))
    cfg = trial_config(base, swept_values(config, sweep), sweep, run_name=run_name)
    log.info("trial %s (Train run %s%s): %s", trial_id, run_name, f" from {resume_from}" if resume_from else "",
             {k: config[k] for k in sweep.space if k in config})
    callback = SweepReportCallback(model_cost(cfg))

    def pointer(metrics: dict[str, Any], path: str) -> TrainPointer:
        return TrainPointer(trial_id, run_name, int(metrics["step"]), checkpoint_uri(cfg, path))

    fit_and_report(build_trainer(cfg, callbacks=[callback], resume_from=resume_from), callback, pointer)


def model_cost(cfg: PretrainConfig) -> dict[str, float]:
    """``params_total`` and ``params_per_token`` of the model a trial trains (read against its score)."""
    from imp_platform.model.presets import count_params
    from imp_platform.train.tasks import resolve_model_config

    counts = count_params(resolve_model_config(cfg))
    return {"params_total": float(counts["total"]), "params_per_token": float(counts["per_token"])}
