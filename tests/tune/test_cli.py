"""``platform tune`` and ``jobs/tune.py``: a bad sweep YAML is one clear line and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from imp_platform.cli import app

REPO = Path(__file__).resolve().parents[2]


def test_cli_rejects_an_unknown_path_naming_the_key(make_sweep, tmp_path):
    bad = make_sweep({"tasks.video_text.wieght": {"uniform": [0.1, 1.0]}})
    result = CliRunner().invoke(app, ["tune", "--space", str(bad)])
    assert result.exit_code == 2
    assert "space.tasks.video_text.wieght" in result.output and "no key 'wieght'" in result.output
    assert not (tmp_path / "tune").exists()  # nothing started


def test_job_script_rejects_a_bad_override(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "tune.py"), "--space", str(REPO / "jobs" / "mixing.yaml"),
                           "--set", "space.optim.lr={loguniform: [0.01, 0.001]}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "space.optim.lr" in proc.stderr and "must be below high" in proc.stderr


def test_cli_refuses_a_sweep_whose_weights_cannot_act_before_any_trial(tmp_path):
    """The shipped sweep on a budget inside its curriculum's first stage: refused, Ray never started."""
    result = CliRunner().invoke(app, ["tune", "--space", str(REPO / "jobs" / "mixing.yaml"), "--set", "steps=20",
                                      "--set", f"storage_path={tmp_path / 'tune'}"])
    assert result.exit_code == 2
    assert "tasks.audio_text.weight: masked for all 20 steps: curriculum stage 0" in result.output
    assert not (tmp_path / "tune").exists()
