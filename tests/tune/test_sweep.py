"""The shipped ``jobs/mixing.yaml`` run as a user runs it, on real local Ray and real Tune.

Only the step and trial counts are reduced (and the data is the session's small synth set, as
in every training test); the base config's curriculum stays on, so the test sees what a user's
sweep sees. One sweep covers: every swept weight acts (the realised task fractions of the
trials follow the sampled weights), the loop's counters are the mix the trial's own sampler
chose, the held-out score and its components, the cost columns, the report files, the best
config trains as is, and ``--resume`` of a finished sweep reruns nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scipy.stats import spearmanr

from imp_platform.config import ConfigError, load_config
from imp_platform.config.train import PretrainConfig
from imp_platform.config.tune import SweepConfig, load_base
from imp_platform.train.agd import AGDSampler, mix_segments
from imp_platform.tune.results import TrialRow
from imp_platform.tune.trial import trial_config, weight_task
from imp_platform.tune.values import load_sweep

REPO = Path(__file__).resolve().parents[2]
STEPS, TRIALS = 60, 6  # shipped: 80 steps, 8 trials; ASHA's rung (2 reports = step 40) still cuts
RUNG = 40  # every trial reports at this step, stopped or not: fractions compare at equal steps
DATA_KEYS = ("data.", "eval.", "tasks.", "run.tensorboard", "run.log_every")  # data sizes only


def shipped_sweep(tiny_overrides: list[str], tmp_path: Path) -> tuple[SweepConfig, PretrainConfig]:
    """jobs/mixing.yaml with fewer steps and trials, on the session's small processed data."""
    sweep, _ = load_sweep(REPO / "jobs" / "mixing.yaml", [
        f"steps={STEPS}", f"num_samples={TRIALS}", f"storage_path={tmp_path / 'tune'}"])
    data = [o for o in tiny_overrides if o.split("=", 1)[0].startswith(DATA_KEYS)]
    assert not any(o.startswith("agd.") for o in data)  # the shipped curriculum stays
    sweep = sweep.model_copy(update={"overrides": [*sweep.overrides, *data]})
    return sweep, load_base(sweep)


def replayed_steps(cfg: PretrainConfig, steps: int) -> dict[str, int]:
    """Steps per task that the trial's AGD sampler chooses in ``steps`` steps (task choice ignores buckets)."""
    sampler = AGDSampler(cfg.agd, {n: t.rate for n, t in cfg.tasks.items()}, {n: {"b": 1} for n in cfg.tasks})
    for _ in range(steps):
        sampler.next()
    return sampler.mix.steps


def asked_share(cfg: PretrainConfig, task: str, steps: int) -> float:
    """The fraction of the first ``steps`` steps that the trial's config gives ``task``."""
    segments = mix_segments(cfg.agd, {n: t.rate for n, t in cfg.tasks.items()}, steps)
    return sum((end - first) * shares[task] for first, end, shares in segments) / steps


def at_step(row: TrialRow, step: int) -> dict[str, float]:
    (report,) = [point for point in row.curve if point["step"] == step]
    return report


@pytest.mark.slow
def test_shipped_mixing_sweep_realises_the_sampled_mix(fresh_ray, tiny_overrides, tmp_path):
    from imp_platform.train.trainer import build_trainer
    from imp_platform.tune.runner import run_sweep

    sweep, base = shipped_sweep(tiny_overrides, tmp_path)
    assert base.agd.curriculum and base.agd.curriculum[0].start == 0

    result = run_sweep(sweep, base=base)

    rows = result.rows
    assert len(rows) == TRIALS and [row.error for row in rows] == [None] * TRIALS
    assert all(row.steps in (RUNG, STEPS) for row in rows) and all(row.steps == STEPS for row in rows if not row.stopped_early)
    configs = {row.trial_id: trial_config(base, row.values, sweep, "replay") for row in rows}

    # The loop's counters are exactly what each trial's sampler chose, at every report.
    for row in rows:
        for point in row.curve:
            step = int(point["step"])
            realised = {t: round(point[f"steps_frac_{t}"] * step) for t in base.tasks}
            assert realised == replayed_steps(configs[row.trial_id], step), (row.trial_id, step)
        assert row.columns["samples_video_text"] > 0 and sum(
            row.columns[f"steps_frac_{t}"] for t in base.tasks) == pytest.approx(1.0)

    # Each swept weight acts: across trials, its task's realised fraction follows it.
    swept = [task for task in map(weight_task, sweep.space) if task is not None]
    assert swept == ["video_text", "audio_text"]
    for task in swept:
        realised = [at_step(row, RUNG)[f"steps_frac_{task}"] for row in rows]
        asked = [asked_share(configs[row.trial_id], task, RUNG) for row in rows]
        assert min(realised) > 0, f"{task} never ran: {realised}"
        rho = spearmanr(realised, asked).statistic
        assert rho > 0.8, f"{task}: realised {realised} vs the share its sampled weight asks {asked}: rho {rho}"

    # The metric is the held-out multi-task score; its components and the cost are columns.
    for row in rows:
        parts = [v for k, v in row.columns.items() if k.startswith("zeroshot_") or k.startswith("retrieval_")]
        assert len(parts) >= 3 and row.metric == pytest.approx(sum(parts) / len(parts))
    cost = {row.values["model.moe.num_experts"]: row.columns["params_total"] for row in rows}
    assert len(set(cost.values())) == len(cost) > 1  # more experts, more parameters
    assert sorted(cost.values()) == [cost[e] for e in sorted(cost)]

    # Report: tables sorted by the metric with the mix and cost columns, the PNG, the best config.
    header, *lines = [[cell.strip() for cell in line.strip("|").split("|")]
                      for line in result.table_path.read_text().splitlines() if line.startswith("| ")]
    assert {"steps_frac_video_text", "steps_frac_audio_text", "params_per_token", "val_loss"} <= set(header)
    scores = [float(line[header.index("heldout_score")]) for line in lines]
    assert scores == sorted(scores, reverse=True) and lines[0][0].endswith("*")
    assert "samples_audio_text" in (result.report_dir / "trials.csv").read_text().splitlines()[0]
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(PretrainConfig, result.best_config_path)
    factor = result.best.values["tasks.audio_text.weight"] / base.tasks["audio_text"].rate
    assert best.agd.curriculum[1].weights["audio_text"] == pytest.approx(0.25 * factor)  # scaled, not replaced
    assert best.model.overrides["moe.num_experts"] == result.best.values["model.moe.num_experts"]

    # The best config is a ready-to-run pretrain config: train it for two steps (Ray Train local mode).
    run = load_config(PretrainConfig, result.best_config_path, [
        "run.steps=2", "run.eval_every=2", "run.num_workers=0", f"run.storage_path={tmp_path / 'best'}"])
    fitted = build_trainer(run).fit()
    assert fitted.error is None and fitted.metrics["step"] == 2 and "steps_frac_video_cls" in fitted.metrics

    # The experiment exists now: a plain rerun refuses, --resume restores it and reruns nothing.
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(sweep, base=base)
    resumed = run_sweep(sweep, resume=True, base=base)
    assert resumed.restored
    assert [(r.trial_id, r.steps, r.metric) for r in resumed.rows] == [(r.trial_id, r.steps, r.metric) for r in rows]
