"""A real sweep on local Ray: 4 Train-run trials, ASHA stops the bad ones, report + best config, resume.

A couple of steps barely move the held-out loss, so the lr alone would leave ASHA deciding on
noise. The grid over the initial NCE temperature makes the outcome certain instead: at 0.02 or
0.01 random embeddings give sharp wrong similarities (val_loss ~5.4 against ~2.8 at 1.0). The
grid lists the sane values first and ``max_concurrent_trials: 2`` starts the last two only after
a first trial has finished, so they meet recorded sane results at ASHA's first rung and are cut.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imp_platform.config import ConfigError, load_config
from imp_platform.config.train import PretrainConfig
from imp_platform.config.tune import load_sweep

SANE, SHARP = [1.0, 0.5], [0.02, 0.01]  # model.temperature_init
STEPS = 4


def mini_sweep(make_sweep, tiny_overrides: list[str]) -> Path:
    return make_sweep(
        {
            "model.temperature_init": {"grid": SANE + SHARP},
            "optim.lr": {"loguniform": [1e-3, 3e-3]},
            "tasks.video_text.weight": {"uniform": [1.0, 4.0]},
            "model.moe.num_experts": {"choice": [2, 4]},
        },
        name="mini", steps=STEPS, num_samples=1, metric="val_loss", mode="min",
        overrides=[*tiny_overrides, "run.eval_every=2", "run.keep_checkpoints=1", "run.max_failures=0",
                   "schedule.warmup_steps=0", "eval.max_samples=16", "eval.batch_size=16"],
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        max_concurrent_trials=2, resources={"workers": 1, "cpus_per_worker": 1.0},
    )


@pytest.mark.slow
def test_real_sweep_stops_trials_writes_report_and_resumes(ray_local, tiny_overrides, make_sweep, tmp_path):
    from imp_platform.train.trainer import build_trainer
    from imp_platform.tune.runner import run_sweep

    sweep, base = load_sweep(mini_sweep(make_sweep, tiny_overrides))

    result = run_sweep(sweep, base=base)

    # Four real trials, none failed; ASHA cut at least one after its first report.
    assert len(result.rows) == 4 and not result.restored
    assert [row.error for row in result.rows] == [None] * 4
    stopped = [row for row in result.rows if row.stopped_early]
    assert stopped, f"ASHA stopped no trial: {result.rows}"
    assert all(row.steps < STEPS for row in stopped)
    assert all(row.steps == STEPS for row in result.rows if not row.stopped_early)
    assert {row.values["model.temperature_init"] for row in stopped} >= set(SHARP)
    assert result.best is not None and not result.best.stopped_early
    assert result.best.values["model.temperature_init"] in SANE

    # Table, plot and best config are written; the table marks the stopped trials.
    table = result.table_path.read_text()
    assert table.count("| yes |") == len(stopped) and "val_loss" in table
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(PretrainConfig, result.best_config_path)
    assert best.optim.lr == pytest.approx(result.best.values["optim.lr"])
    assert best.model.overrides["moe.num_experts"] == result.best.values["model.moe.num_experts"]
    assert best.run.steps == base.run.steps  # the full-run budget of the base, not the sweep's
    assert sum(task.weight for task in best.tasks.values()) == pytest.approx(1.0)

    # The best config is a ready-to-run pretrain config: train it for two steps (Ray Train local mode).
    run = load_config(PretrainConfig, result.best_config_path, [
        "run.steps=2", "run.eval_every=2", "run.num_workers=0", f"run.storage_path={tmp_path / 'best'}"])
    fitted = build_trainer(run).fit()
    assert fitted.error is None and fitted.metrics["step"] == 2 and "val_loss" in fitted.metrics

    # The experiment exists now: a plain rerun refuses, --resume restores it with Tuner.restore.
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(sweep, base=base)
    resumed = run_sweep(sweep, resume=True, base=base)
    assert resumed.restored
    assert [(r.trial_id, r.steps, r.metric) for r in resumed.rows] == [(r.trial_id, r.steps, r.metric) for r in result.rows]
