"""A processed copy of the session's synth shards and a tiny, fast pretraining config on it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def processed_root(synth_shards, tmp_path_factory) -> Path:
    """``ROOT/raw`` -> the synth shards, ``ROOT/processed/{train,test}`` preprocessed once per session."""
    import ray

    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train.trainer import prepare_data

    if not ray.is_initialized():  # same settings as the shared ``ray_local`` fixture
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "platform")}})
    root = tmp_path_factory.mktemp("processed")
    (root / "raw").symlink_to(synth_shards["root"], target_is_directory=True)
    prepare_data(load_pretrain_config(REPO / "jobs/configs/pretrain.yaml",
                                      [f"data.root={root}", "data.synth=null",
                                       f"data.pipeline={REPO / 'pipelines/moving_digits.yaml'}"]))
    return root


@pytest.fixture
def tiny_overrides(processed_root, tmp_path) -> list[str]:
    """--set keys that make a run tiny: few steps, small batches, a capped held-out eval."""
    return [
        f"data.root={processed_root}", "data.synth=null",
        f"data.pipeline={REPO / 'pipelines/moving_digits.yaml'}",
        f"run.storage_path={tmp_path / 'ray'}", "run.name=tiny", "run.steps=8", "run.eval_every=4",
        "run.log_every=2", "run.cpus_per_worker=0.5", "run.tensorboard=false",
        "eval.max_samples=24", "eval.batch_size=24", "optim.lr=2e-3", "schedule.warmup_steps=2",
        *[f"tasks.{t}.token_budget=768" for t in ("video_text", "video_audio", "audio_text")],
        *[f"tasks.{t}.token_budget=384" for t in ("image_cls", "video_cls", "audio_cls")],
    ]
