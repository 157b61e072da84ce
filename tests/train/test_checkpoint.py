"""Checkpoint format without Ray: nothing executable loads, half-written checkpoints are refused,
RNG states round-trip through JSON, credentials never reach a saved config or an error message."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from imp_platform.config import ConfigError, dump_yaml, load_config
from imp_platform.config.base import merge_secrets, split_secrets
from imp_platform.config.train import PretrainConfig, load_pretrain_config
from imp_platform.train import checkpoint as ckpt
from imp_platform.train.agd import Choice
from imp_platform.train.loop import NonFiniteError, NonFiniteGuard

REPO = Path(__file__).resolve().parents[2]
KEYS = {"key": "AKIAPLANTEDACCESSKEY", "secret": "planted/secret+value"}


class _Payload:
    """Unpickling this writes a marker file: what an attacker would plant in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _checkpoint(directory: Path, world: int = 2) -> Path:
    """A complete checkpoint of the tiny model written the way every rank of a ``world``-worker run does."""
    from imp_platform.model import build_model
    from imp_platform.train.tasks import resolve_model_config

    cfg = load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", ["model.moe=false"])
    model_cfg = resolve_model_config(cfg)
    model = build_model(model_cfg)
    state = {"step": 3, "optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "sampler": {"step": 3}}
    for rank in reversed(range(world)):  # rank 0 (the marker) last, as a slow upload of rank 1 could not be
        ckpt.save_checkpoint(directory, rank=rank, world_size=world, rank_state={"rank": rank, "cursors": {}},
                             model=model, model_cfg=model_cfg, cfg=cfg, train_state=state, history=[{"step": 2}])
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt"))


def _copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def test_a_complete_checkpoint_opens_with_every_rank_state(saved: Path) -> None:
    state, ranks = ckpt.open_for_resume(saved)
    assert state["step"] == 3 and [r["rank"] for r in ranks] == [0, 1]
    assert not any(p.suffix == ".pt" and p.name != ckpt.TRAIN_STATE for p in saved.iterdir())


def test_a_planted_pickle_is_refused_and_never_runs(saved: Path, tmp_path: Path) -> None:
    directory = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "optimizer": _Payload(marker)}, directory / ckpt.TRAIN_STATE)
    ckpt._write_marker(directory, 2)  # whoever can write the prefix can rewrite the marker too
    with pytest.raises(ckpt.CheckpointError, match=r"train_state\.pt: refusing to load"):
        ckpt.open_for_resume(directory)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["no marker", "truncated", "rank file missing"])
def test_a_half_written_checkpoint_is_refused(saved: Path, tmp_path: Path, damage: str) -> None:
    directory = _copy(saved, tmp_path)
    if damage == "no marker":
        (directory / ckpt.COMPLETE).unlink()
    elif damage == "truncated":
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (directory / ckpt.rank_file(1, 2)).unlink()
    with pytest.raises(ckpt.CheckpointError, match="refusing it"):
        ckpt.open_for_resume(directory)


# Ray Train's upload of a checkpoint (storage.persist_current_checkpoint's pyarrow copy), in a process
# whose file-size limit the kernel enforces with SIGXFSZ: it dies in the middle of the largest file.
_UPLOAD = """
import resource, signal, sys
import pyarrow.fs
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default; a real kill instead
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
pyarrow.fs.copy_files(sys.argv[1], sys.argv[2], chunk_size=64 * 1024 * 1024)
"""


def test_an_upload_killed_mid_file_is_refused_and_the_previous_checkpoint_still_opens(saved: Path,
                                                                                      tmp_path: Path) -> None:
    import shutil
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    previous = Path(shutil.copytree(saved, run / "checkpoint_0000008"))
    largest = max(saved.iterdir(), key=lambda p: p.stat().st_size)
    limit = largest.stat().st_size // 2
    assert sorted(p.stat().st_size for p in saved.iterdir())[-2] < limit, "only the largest file may hit the limit"
    killed = run / "checkpoint_0000012"
    killed.mkdir()
    proc = subprocess.run([sys.executable, "-c", _UPLOAD, str(saved), str(killed), str(limit)],
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr.decode()[-2000:]
    assert (killed / largest.name).stat().st_size <= limit  # cut short mid-file
    for load in (ckpt.open_for_resume, ckpt.load_model):  # resume; eval, inference and model.init_from
        with pytest.raises(ckpt.CheckpointError, match="refusing it"):
            load(killed)
    state, ranks = ckpt.open_for_resume(previous)
    assert state["step"] == 3 and len(ranks) == 2


def test_rng_states_round_trip_through_json() -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = json.loads(json.dumps(ckpt.rng_state()))
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    ckpt.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_nonfinite_guard_stops_after_consecutive_skips_naming_task_and_bucket() -> None:
    guard = NonFiniteGuard(limit=2)
    guard.skipped(5, [Choice("audio_cls", "a128x128")])
    guard.passed()  # a good step resets the streak, not the total
    guard.skipped(9, [Choice("audio_cls", "a128x128")])
    with pytest.raises(NonFiniteError, match=r"step 10: task video_text bucket v8x32x32_t5"):
        guard.skipped(10, [Choice("video_text", "v8x32x32_t5")])
    assert guard.total == 3


def _with_keys() -> PretrainConfig:
    return load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", [
        f"data.storage_options={json.dumps(KEYS)}", "run.worker_env={AWS_SECRET_ACCESS_KEY: planted-env-secret}"])


def test_saved_configs_redact_credentials_and_reload_without_them(tmp_path: Path) -> None:
    cfg = _with_keys()
    path = dump_yaml(cfg, tmp_path / "saved.yaml")
    text = path.read_text()
    assert not any(v in text for v in [*KEYS.values(), "planted-env-secret"]), text
    assert yaml.safe_load(text)["data"]["storage_options"]["key"] == "***"
    reloaded = load_config(PretrainConfig, path)  # *** means "from the environment"
    assert reloaded.data.storage_options == {} and reloaded.run.worker_env == {}
    public, secrets = split_secrets(cfg.model_dump(mode="json"))
    assert KEYS["secret"] not in json.dumps(public)
    assert PretrainConfig.model_validate(merge_secrets(public, secrets)) == cfg


def test_credential_names_are_told_from_model_token_settings() -> None:
    from imp_platform.config.base import is_secret

    for path in [("token",), ("run", "session_token"), ("storage_options", "token"), ("storage_options", "key"),
                 ("x", "aws_access_key_id"), ("db_password",), ("storage_options", "access_key_id")]:
        assert is_secret(path), path
    for path in [("tasks", "video_text", "drop_token"), ("tasks", "a", "token_budget"), ("dataset", "label_key"),
                 ("text", "max_tokens"), ()]:
        assert not is_secret(path), path


def test_validation_errors_do_not_echo_secrets() -> None:
    for override in ["data.storage_options.key=[not, a, string]", "run.worker_env={AWS_SECRET_ACCESS_KEY: [x1y2z3]}"]:
        with pytest.raises(ConfigError) as err:
            load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", [override, "run.steps=-1",
                                                                       "run.storage_options=[AKIAINLIST]"])
        assert "x1y2z3" not in str(err.value) and "AKIAINLIST" not in str(err.value)
        assert "run.steps" in str(err.value)
