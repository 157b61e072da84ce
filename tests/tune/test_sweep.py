"""A real sweep on local Ray: 4 Train-run trials, ASHA stops the bad ones, report + best config, resume.

The lr grid puts two workable rates first and two that barely move the weights last. With
``max_concurrent_trials: 2`` the last two start only after a first trial has finished, so at
ASHA's first rung they meet recorded results of workable trials and are cut after one report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imp_platform.config import ConfigError, load_config
from imp_platform.config.train import PretrainConfig
from imp_platform.config.tune import load_sweep

REPO = Path(__file__).resolve().parents[2]
GOOD_LR, BAD_LR = [3e-3, 2e-3], [1e-7, 1e-8]
STEPS = 4


def sweep_yaml(tmp_path: Path, data_root: Path) -> Path:
    doc = {
        "name": "mini",
        "base": str(REPO / "jobs" / "configs" / "pretrain.yaml"),
        "overrides": [
            f"data.root={data_root}", "data.synth=null",
            "run.eval_every=2", "run.tensorboard=false", "run.keep_checkpoints=1", "run.max_failures=0",
            "schedule.warmup_steps=0", "schedule.min_lr=0",
            "eval.max_samples=16", "eval.batch_size=16",
        ],
        "space": {
            "optim.lr": {"grid": GOOD_LR + BAD_LR},
            "tasks.video_text.weight": {"uniform": [1.0, 4.0]},
            "model.moe.num_experts": {"choice": [2, 4]},
        },
        "metric": "val_loss", "mode": "min", "num_samples": 1, "steps": STEPS,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": 2,
        "resources": {"workers": 1, "cpus_per_worker": 1.0},
        "storage_path": str(tmp_path / "tune"),
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_real_sweep_stops_trials_writes_report_and_resumes(ray_local, synth_shards, tmp_path):
    from imp_platform.train.trainer import build_trainer
    from imp_platform.tune.runner import run_sweep

    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "raw").symlink_to(synth_shards["root"])  # prepare_data preprocesses ROOT/raw/<split>
    sweep, base = load_sweep(sweep_yaml(tmp_path, data_root))

    result = run_sweep(sweep, base=base)

    # Four real trials, none failed; ASHA cut at least one after its first report.
    assert len(result.rows) == 4 and not result.restored
    assert [row.error for row in result.rows] == [None] * 4
    stopped = [row for row in result.rows if row.stopped_early]
    assert stopped, f"ASHA stopped no trial: {result.rows}"
    assert all(row.steps < STEPS for row in stopped)
    assert all(row.steps == STEPS for row in result.rows if not row.stopped_early)
    assert {row.values["optim.lr"] for row in result.rows} == set(GOOD_LR + BAD_LR)
    assert result.best is not None and not result.best.stopped_early

    # Table, plot and best config are written; the table marks the stopped trials.
    table = result.table_path.read_text()
    assert table.count("| yes |") == len(stopped) and "val_loss" in table
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(PretrainConfig, result.best_config_path)
    assert best.optim.lr == pytest.approx(result.best.values["optim.lr"])
    assert best.model.overrides["moe.num_experts"] == result.best.values["model.moe.num_experts"]
    assert sum(task.weight for task in best.tasks.values()) == pytest.approx(1.0)

    # The best config is a ready-to-run pretrain config: train it for two steps.
    run = load_config(PretrainConfig, result.best_config_path, [
        "run.steps=2", "run.eval_every=2", "run.num_workers=1", f"run.storage_path={tmp_path / 'best'}"])
    fitted = build_trainer(run).fit()
    assert fitted.error is None and fitted.metrics["step"] == 2 and "val_loss" in fitted.metrics

    # The experiment exists now: a plain rerun refuses, --resume restores it with Tuner.restore.
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(sweep, base=base)
    resumed = run_sweep(sweep, resume=True, base=base)
    assert resumed.restored
    assert [(r.trial_id, r.steps, r.metric) for r in resumed.rows] == [(r.trial_id, r.steps, r.metric) for r in result.rows]
