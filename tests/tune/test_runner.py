"""Scheduler/searcher wiring: ASHA counts eval-interval reports, random search carries the concurrency cap."""

from __future__ import annotations

import pytest

from imp_platform.config import ConfigError
from imp_platform.tune.values import load_sweep


def sweep_with(make_sweep, **fields):
    return load_sweep(make_sweep({"optim.lr": {"loguniform": [1e-4, 1e-2]}}, overrides=["run.eval_every=5"], **fields))


def test_asha_rungs_are_counted_in_reports(make_sweep):
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from imp_platform.tune.runner import build_scheduler
    from imp_platform.tune.trial import num_reports

    sweep, base = sweep_with(make_sweep, steps=12, scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 3})
    assert num_reports(sweep, base) == 3  # steps 5, 10 and the last step 12
    scheduler = build_scheduler(sweep, base)
    assert isinstance(scheduler, AsyncHyperBandScheduler)
    assert scheduler._time_attr == "training_iteration" and scheduler._max_t == 3
    assert [milestone for milestone, _ in scheduler._brackets[0]._rungs] == [2]


def test_grace_period_beyond_the_reports_is_an_error(make_sweep):
    from imp_platform.tune.runner import build_scheduler

    sweep, base = sweep_with(make_sweep, steps=10, scheduler={"name": "asha", "grace_period": 3})
    with pytest.raises(ConfigError, match=r"scheduler.grace_period \(3\) exceeds the 2 reports"):
        build_scheduler(sweep, base)


def test_pbt_mutates_the_swept_keys_and_fifo_is_plain(make_sweep):
    from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining

    from imp_platform.tune.runner import build_scheduler

    sweep, base = sweep_with(make_sweep, steps=10, scheduler={"name": "pbt", "perturbation_interval": 1})
    pbt = build_scheduler(sweep, base)
    assert isinstance(pbt, PopulationBasedTraining) and set(pbt._hyperparam_mutations) == {"optim.lr"}
    sweep, base = sweep_with(make_sweep, steps=10, scheduler={"name": "fifo"})
    assert isinstance(build_scheduler(sweep, base), FIFOScheduler)


def test_pbt_perturbs_all_but_the_model_shape_and_takes_no_searcher(make_sweep):
    from imp_platform.tune.runner import build_scheduler

    space = {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "model.moe.num_experts": {"choice": [2, 4]}}
    sweep, base = load_sweep(make_sweep(space, steps=10, scheduler={"name": "pbt"}))
    assert set(build_scheduler(sweep, base)._hyperparam_mutations) == {"optim.lr"}  # experts: from the donor
    sweep, base = load_sweep(make_sweep({"model.moe.num_experts": {"choice": [2, 4]}}, steps=10,
                                        scheduler={"name": "pbt"}))
    with pytest.raises(ConfigError, match=r"every swept key \(model.moe.num_experts\) is a model.\* key"):
        build_scheduler(sweep, base)
    with pytest.raises(ConfigError, match="pbt samples its population itself"):
        load_sweep(make_sweep(space, steps=10, scheduler={"name": "pbt"}, search={"name": "optuna"}))


def test_searchers(make_sweep):
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from imp_platform.tune.runner import build_searcher

    sweep, _ = sweep_with(make_sweep, steps=10, max_concurrent_trials=3)
    random = build_searcher(sweep)
    assert isinstance(random, BasicVariantGenerator) and random.max_concurrent == 3
    sweep, _ = sweep_with(make_sweep, steps=10, search={"name": "optuna", "seed": 1})
    assert isinstance(build_searcher(sweep), OptunaSearch)


def test_s3_storage_goes_through_storage_options(make_sweep, s3_server):
    """An s3:// sweep resolves to a pyarrow filesystem over s3fs (moto here) that Tune can probe."""
    import s3fs
    from ray import tune

    from imp_platform.tune.runner import storage_filesystem
    from imp_platform.tune.trial import train_storage

    sweep, _ = sweep_with(make_sweep, steps=10, storage_path="s3://imp-test/sweeps",
                          storage_options=s3_server["storage_options"])
    fs, inner = storage_filesystem(sweep)
    assert inner == "imp-test/sweeps" and train_storage(sweep) == "s3://imp-test/sweeps/t-runs"
    assert not tune.Tuner.can_restore(f"{inner}/{sweep.name}", storage_filesystem=fs)
    s3fs.S3FileSystem(**s3_server["storage_options"]).pipe(f"{inner}/{sweep.name}/tuner.pkl", b"x")
    assert tune.Tuner.can_restore(f"{inner}/{sweep.name}", storage_filesystem=fs)


def test_heldout_score_is_the_mean_of_top1_and_r1_only():
    from imp_platform.tune.report import heldout_score

    metrics = {"zeroshot_video_top1": 0.5, "zeroshot_image_top1": 0.7, "retrieval_video_text_r1": 0.3,
               "zeroshot_video_top5": 0.9, "retrieval_video_text_r5": 0.8, "retrieval_video_text_r1_semantic": 1.0,
               "val_loss": 2.0, "loss": 1.0}
    assert heldout_score(metrics) == pytest.approx(0.5)
    assert heldout_score({"val_loss": 2.0}) is None
