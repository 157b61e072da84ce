"""`python jobs/evaluate.py` and `platform eval` on a trained checkpoint; clear errors for bad input.

`jobs/pretrain.py` end to end runs in tests/infra/test_infra_submit.py, through `ray job submit`
with the RayJob manifest's own entrypoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imp_platform.cli import app
from imp_platform.train.entry import HEADLINE

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_evaluate_script_and_cli_write_metrics_and_report(trained_checkpoint, tmp_path):
    proc = _run(["jobs/evaluate.py", "--checkpoint", trained_checkpoint, "--out", str(tmp_path / "job"),
                 "--max-samples", "16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"metrics: {tmp_path / 'job' / 'metrics.json'}" in proc.stdout
    out = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert set(HEADLINE) <= set(out) and out["eval_samples"] == 16 and out["step"] == 4
    assert (tmp_path / "job" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = CliRunner().invoke(app, ["eval", "--checkpoint", trained_checkpoint, "--out", str(tmp_path / "cli"),
                                      "--max-samples", "16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text()) == out  # same checkpoint, same numbers


def test_bad_config_key_is_a_clear_error():
    proc = _run(["jobs/pretrain.py", "--set", "run.stepz=3"], timeout=120)
    assert proc.returncode == 2
    assert "run.stepz: unknown key" in proc.stderr


def test_eval_names_a_missing_checkpoint(tmp_path):
    missing = tmp_path / "no-checkpoint"
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(missing)])
    assert result.exit_code == 2
    assert f"not found: {missing}" in result.output


@pytest.mark.slow
def test_infer_script_writes_predictions_of_a_processed_split(trained_checkpoint, processed_root, tmp_path):
    out = tmp_path / "infer"
    proc = _run(["jobs/infer.py", "--checkpoint", trained_checkpoint, "--input",
                 str(processed_root / "processed" / "test"), "--out", str(out), "--what", "embed,zeroshot,classify"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows written: 40 of 40 read" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_written"] == 40 and summary["heads"] == {"video_cls": "video", "audio_cls": "audio_mel",
                                                                   "image_cls": "image"}
    assert (out / "part-00000.parquet").read_bytes()[:4] == b"PAR1"


def test_infer_script_names_a_missing_checkpoint(tmp_path):
    proc = _run(["jobs/infer.py", "--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path),
                 "--out", str(tmp_path / "out")], timeout=300)
    assert proc.returncode == 2 and f"checkpoint not found: {tmp_path / 'nope'}" in proc.stderr
