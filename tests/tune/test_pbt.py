"""PBT that exploits: a real 2-trial PBT sweep on local Ray, where the weaker trial restarts from
the stronger one's Train checkpoint (its step and weights) with its own perturbed lr.

The ranking is made certain, not left to a few noisy steps: the metric is the reported lr, so
the trial that sampled the larger lr is on top; synchronous PBT exploits at the first
perturbation step (report 2 of 3) whatever the order in which the two trials get there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

EVERY, REPORTS = 2, 3


def _restores(debug: Path) -> dict[str, tuple[int, str, float]]:
    """Train run -> (step, checkpoint path, weight digest) of each restore (rank 0's debug lines)."""
    lines = (debug / "rank0-restores").read_text().split("\n") if (debug / "rank0-restores").exists() else []
    return {run: (int(step), path, float(digest)) for run, step, path, digest in (ln.split() for ln in lines if ln)}


@pytest.mark.slow
def test_pbt_exploit_restarts_from_the_donors_checkpoint(fresh_ray, tiny_overrides, make_sweep, tmp_path):
    from imp_platform.train.checkpoint import load_model
    from imp_platform.train.loop import _digest
    from imp_platform.tune.runner import run_sweep
    from imp_platform.tune.trial import train_storage
    from imp_platform.tune.values import load_sweep

    debug = tmp_path / "debug"
    path = make_sweep(
        {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, steps=EVERY * REPORTS, num_samples=2, metric="lr", mode="max",
        scheduler={"name": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5, "resample_probability": 0.0,
                   "synch": True},
        resources={"workers": 1, "cpus_per_worker": 0.5},
        overrides=[*tiny_overrides, f"run.eval_every={EVERY}", "eval.enabled=false",
                   "schedule.warmup_steps=100",  # all 6 steps in warmup: lr = peak lr * (step+1)/100
                   f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {debug}}}"])
    sweep, base = load_sweep(path)

    result = run_sweep(sweep, base=base)

    rows = {row.trial_id: row for row in result.rows}
    assert len(rows) == 2 and all(row.error is None and row.steps == EVERY * REPORTS for row in rows.values()), \
        [(row.trial_id, row.error, row.steps) for row in rows.values()]
    restores = _restores(debug)
    exploits = {run: r for run, r in restores.items() if "-from-" in run}
    assert exploits, f"no exploit: restores {restores}"
    for run, (step, donor_path, digest) in exploits.items():
        trial, donor = run.removeprefix("trial-").split("-from-")[0], run.split("-from-")[1].rsplit("-", 1)[0]
        # The exploiting trial's new Train run started at the donor's step, from the donor's checkpoint ...
        assert run.endswith(f"-{step}") and step == 2 * EVERY
        assert donor_path == f"{train_storage(sweep)}/trial-{donor}/checkpoint_{step:07d}"
        # ... with the donor's weights (the digest of the weights it loaded, against the donor's file) ...
        # equal weights; the float64 sums may round differently with another thread count (1 ulp)
        assert digest == pytest.approx(_digest(load_model(donor_path)[0].parameters()), rel=1e-12)
        # ... and trained on with its own perturbed lr: at the last step both report, the lrs are in
        # the ratio of the two trials' final values, which differ by PBT's factor (x0.8 or x1.2).
        ratio = rows[trial].values["optim.lr"] / rows[donor].values["optim.lr"]
        assert ratio == pytest.approx(0.8) or ratio == pytest.approx(1.2)
        last = {tid: [p["lr"] for p in row.curve if p["step"] == EVERY * REPORTS] for tid, row in rows.items()}
        assert last[trial][0] / last[donor][0] == pytest.approx(ratio, rel=1e-6)
