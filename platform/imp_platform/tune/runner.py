"""``run_sweep``: the Tuner over pretraining trials, resumable, with its report written at the end.

Scheduler time is counted in reports (``training_iteration``): the training loop reports once
per eval interval, so ASHA's grace period and rungs are in eval intervals. Concurrency is
capped by ``max_concurrent_trials`` because each trial's Train run must get all its workers at
once and Ray Data inside them competes for the same CPUs (REFERENCE.md, "Tune + Train").
The experiment state reaches the storage every ``STATE_SYNC_S`` (Ray's default is 5 minutes):
that state is what ``--resume`` after a killed driver starts from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from imp_platform.config import ConfigError
from imp_platform.config.train import PretrainConfig
from imp_platform.config.tune import AshaScheduler, PbtScheduler, SweepConfig, load_base
from imp_platform.tune.check import check_sweep_acts
from imp_platform.tune.results import SweepResult, collect_rows, write_report
from imp_platform.tune.space import param_space
from imp_platform.tune.trial import num_reports, run_trial

log = logging.getLogger(__name__)

STATE_SYNC_S = 10  # seconds between uploads of the experiment state (Tune snapshots it every >= 10 s)


def build_scheduler(sweep: SweepConfig, base: PretrainConfig) -> Any:
    from ray import tune

    spec = sweep.scheduler
    reports = num_reports(sweep, base)
    if isinstance(spec, AshaScheduler):
        if spec.grace_period > reports:
            raise ConfigError(f"scheduler.grace_period ({spec.grace_period}) exceeds the {reports} reports a trial "
                              f"makes ({sweep.steps} steps, run.eval_every {base.run.eval_every})")
        # stop_last_trials=False: a trial that reaches the last rung finishes its Train run itself.
        return tune.create_scheduler("async_hyperband", time_attr="training_iteration", max_t=reports,
                                     grace_period=spec.grace_period, reduction_factor=spec.reduction_factor,
                                     brackets=spec.brackets, stop_last_trials=False)
    if isinstance(spec, PbtScheduler):
        # Exploits start from the donor's checkpoint, whose shapes model.* keys fix: those are
        # sampled once and inherited from the donor; the rest (mixing weights, lr, ...) are perturbed.
        mutations = {key: value for key, value in param_space(sweep).items() if not key.startswith("model.")}
        if not mutations:
            raise ConfigError(f"scheduler pbt: every swept key ({', '.join(sweep.space)}) is a model.* key, which "
                              "an exploit inherits from its donor; sweep something PBT can perturb (optim.lr, tasks...)")
        return tune.create_scheduler("pbt", time_attr="training_iteration",
                                     perturbation_interval=spec.perturbation_interval,
                                     hyperparam_mutations=mutations,
                                     quantile_fraction=spec.quantile_fraction,
                                     resample_probability=spec.resample_probability, synch=spec.synch)
    return tune.create_scheduler("fifo")


def build_searcher(sweep: SweepConfig) -> Any:
    """Random search carries the concurrency cap itself (Tune ignores max_concurrent_trials for it)."""
    from ray import tune

    if sweep.search.name == "random":
        return tune.create_searcher("random", max_concurrent=sweep.max_concurrent_trials,
                                    random_state=sweep.search.seed)
    return tune.create_searcher(sweep.search.name, seed=sweep.search.seed)


def storage_filesystem(sweep: SweepConfig) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path inside it) for the sweep's storage (s3 with custom options)."""
    from imp_platform.train.trainer import arrow_storage

    inner, fs = arrow_storage(sweep.storage_path, sweep.storage_options)
    return fs, inner


def report_dir(sweep: SweepConfig) -> Path:
    if sweep.report_dir:
        return Path(sweep.report_dir)
    if "://" in sweep.storage_path:
        return Path("runs") / "tune-reports" / sweep.name
    return Path(sweep.experiment_path) / "report"


def run_sweep(sweep: SweepConfig, *, resume: bool = False, base: PretrainConfig | None = None) -> SweepResult:
    """Run (or with ``resume``, continue) the sweep; returns the table, best trial and written files."""
    from ray import tune

    from imp_platform.train.trainer import ensure_ray, prepare_data

    base = base.with_absolute_paths() if base is not None else load_base(sweep)
    check_sweep_acts(sweep, base)  # before Ray starts: a sweep whose values cannot act measures nothing
    fs, inner = storage_filesystem(sweep)
    experiment = f"{inner.rstrip('/')}/{sweep.name}"
    scheduler = build_scheduler(sweep, base)
    ensure_ray(base)
    prepare_data(base)  # once, before trials: concurrent trials must not race to write it
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, sweep=sweep),
                                    {"cpu": sweep.resources.driver_cpus})
    exists = tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    if exists and not resume:
        raise ConfigError(f"sweep {sweep.name!r} already exists at {sweep.experiment_path}; "
                          "pass --resume to continue it or choose another name")
    if exists:
        log.info("resuming sweep %s from %s", sweep.name, sweep.experiment_path)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(sweep), storage_filesystem=fs)
    else:
        if resume:
            log.warning("nothing to resume at %s; starting the sweep", sweep.experiment_path)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples, scheduler=scheduler,
                search_alg=build_searcher(sweep),
                max_concurrent_trials=None if sweep.search.name == "random" else sweep.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=inner, storage_filesystem=fs,
                                      sync_config=tune.SyncConfig(sync_period=STATE_SYNC_S)),
        )
    grid = tuner.fit()
    rows = collect_rows(grid, sweep)
    return write_report(rows, sweep, base, report_dir(sweep), sweep.experiment_path, restored=exists)


def run_sweep_file(path: str | Path, overrides: list[str] | None = None, *, resume: bool = False) -> SweepResult:
    """What ``platform tune`` and ``jobs/tune.py`` do: load and check the sweep YAML, then run it."""
    from imp_platform.tune.values import load_sweep

    sweep, base = load_sweep(path, overrides)
    return run_sweep(sweep, resume=resume, base=base)
