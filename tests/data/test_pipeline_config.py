"""PipelineConfig: the embedded default and templates load, and bad specs fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from imp_platform.config import ConfigError, validate
from imp_platform.config.pipeline import EMBEDDED_PIPELINE, PipelineConfig, load_pipeline
from imp_platform.data import modalities

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"source": {"paths": "data/x"}, "output": {"path": "out"}, "video": {"buckets": [[8, 32, 32]]},
           "image": {"buckets": [[32, 32]]}}


def _cfg(**changes) -> PipelineConfig:
    data = {**MINIMAL, **changes}
    return validate(PipelineConfig, data, source="test.yaml")


def test_embedded_default_loads_with_contract_settings() -> None:
    cfg = load_pipeline()
    assert EMBEDDED_PIPELINE == REPO / "pipelines" / "moving_digits.yaml"
    assert cfg.audio.sample_rate == 16000 and cfg.audio.n_mels == 128
    assert set(cfg.modalities.enabled) == {"video", "audio", "text", "image"}
    assert cfg.video.buckets and all(len(b) == 3 for b in cfg.video.buckets)
    assert cfg.modalities.extensions == modalities.default_extensions()


@pytest.mark.parametrize("name", ["video_text", "audio", "image_text"])
def test_templates_load(name: str) -> None:
    cfg = load_pipeline(REPO / "pipelines" / "templates" / f"{name}.yaml")
    assert cfg.source.paths[0].startswith("s3://")


def test_defaults_and_extension_lookup() -> None:
    cfg = _cfg()
    assert cfg.source.paths == ["data/x"]  # a single path becomes a list
    assert cfg.modalities.modality_of(".MP4") == "video"
    assert cfg.modalities.modality_of("flac") == "audio"
    assert cfg.modalities.modality_of("webp") == "image"
    assert cfg.modalities.modality_of("txt") == "text"
    assert cfg.modalities.modality_of("cls") is None
    assert cfg.audio.mel_frames(1.0) == 100  # hop 160 at 16 kHz


def test_overrides_apply() -> None:
    cfg = load_pipeline(None, ["source.paths=[s3://b/p]", "output.storage_options.endpoint_url=http://127.0.0.1:9"])
    assert cfg.source.paths == ["s3://b/p"]
    assert cfg.output.storage_options == {"endpoint_url": "http://127.0.0.1:9"}


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"video\.bukets: unknown key"):
        load_pipeline(None, ["video.bukets=[[8,32,32]]"])
    with pytest.raises(ConfigError, match=r"test\.yaml[\s\S]*token_budjet: unknown key"):
        _cfg(token_budjet=3)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"video": {"buckets": [[8, 30, 32]]}}, r"video\.buckets\[0\].*not divisible by patches\.video"),
        ({"video": {"buckets": [[8, 0, 32]]}}, r"video\.buckets\[0\] must be positive"),
        ({"video": {"buckets": [[8, 32]]}}, r"video\.buckets\.0"),
        ({"modalities": {"extensions": {"smell": ["x"]}}}, r"modalities\.extensions\.smell"),
        ({"modalities": {"extensions": {"audio": ["mp4"]}}}, r"'mp4' is listed under both"),
        ({"modalities": {"required": ["image"], "enabled": ["video"]}}, r"required modalities \['image'\]"),
        ({"modalities": {"enabled": ["video", "smell"]}}, r"modalities\.enabled\.1"),
        ({"audio": {"clip_seconds": [-1.0]}}, r"audio\.clip_seconds must be positive"),
        ({"audio": {"sample_rate": 0}}, r"audio\.sample_rate"),
        ({"token_budget": 8192}, r"token_budget: unknown key"),  # budgets are per training task
        ({"image": None}, r"'image' is enabled but the image: section"),
        ({"source": {"paths": []}}, r"source\.paths"),
        ({"decode": {"compute": "threads"}}, r"decode\.compute"),
    ],
)
def test_bad_values_name_the_key(changes: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        _cfg(**changes)
