"""DropToken per modality: the token budget counts exactly the tokens the encoder keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imp_platform.config import ConfigError, validate
from imp_platform.config.train import TaskConfig
from imp_platform.data.modalities import modality
from imp_platform.model import build_model
from imp_platform.model.presets import preset
from imp_platform.train.tasks import run_task, task_columns, tokens_per_sample

SHAPES = {"video": [4, 32, 48, 3], "audio_mel": [50, 128], "text_ids": [7]}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(preset("tiny"))


def _task(modalities: list[str], drop_token) -> TaskConfig:
    return validate(TaskConfig, {"modalities": modalities, "objectives": [{"kind": "nce"}], "drop_token": drop_token})


def _batch(task: TaskConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    batch = {"video": rng.integers(0, 255, (2, *SHAPES["video"]), dtype=np.uint8),
             "audio_mel": rng.standard_normal((2, *SHAPES["audio_mel"])).astype(np.float32),
             "text_ids": rng.integers(1, 100, (2, *SHAPES["text_ids"])), "text_mask": np.ones((2, 7), dtype=bool)}
    return {c: batch[c] for c in task_columns(task)}


def _kept_by_encoder(model, task: TaskConfig) -> dict[str, int]:
    """Tokens per sample each modality's encoder pass returns inside ``run_task`` (training mode)."""
    kept: dict[str, int] = {}
    encode = model.encode

    def recording(modality, inputs, **kwargs):
        out = encode(modality, inputs, **kwargs)
        kept[modality] = out.tokens.shape[1]
        return out

    model.encode = recording
    try:
        run_task(model, "t", task, _batch(task), torch.device("cpu"))
    finally:
        del model.encode
    return kept


@pytest.mark.parametrize(("modalities", "drop_token", "rates"), [
    (["video", "audio_mel"], {"video": 0.75, "audio_mel": 0.5}, {"video": 0.75, "audio_mel": 0.5}),
    (["video", "audio_mel"], {"video": 0.75}, {"video": 0.75, "audio_mel": 0.0}),  # unnamed: keep all
    (["video", "text"], 0.5, {"video": 0.5, "text": 0.0}),  # one rate for every non-text modality
    (["audio_mel", "text"], {"audio_mel": 0.5}, {"audio_mel": 0.5, "text": 0.0}),
])
def test_budget_and_encoder_follow_per_modality_rates(model, modalities, drop_token, rates) -> None:
    task = _task(modalities, drop_token)
    assert {m: task.drop_rate(m) for m in modalities} == rates
    expected = {m: model.num_tokens(m, SHAPES[modality(m).column], rates[m]) for m in modalities}
    full = {m: model.num_tokens(m, SHAPES[modality(m).column]) for m in modalities}
    for m in modalities:  # a rate of r keeps about (1 - r) of the patches (plus the aggregation token)
        assert expected[m] < full[m] if rates[m] else expected[m] == full[m]
    model.train()
    assert _kept_by_encoder(model, task) == expected
    assert tokens_per_sample(model, task, SHAPES) == sum(expected.values())
    model.eval()  # eval keeps every token
    assert _kept_by_encoder(model, task) == full


@pytest.mark.parametrize(("drop_token", "pattern"), [
    ({"image": 0.5}, r"drop_token\.image: not one of the task's modalities"),
    ({"text": 0.5}, r"drop_token\.text: text tokens are never dropped"),
    ({"video": 1.0}, r"drop_token: .*must be in \[0, 1\), got \{'video': 1\.0\}"),
    (1.5, r"drop_token: .*must be in \[0, 1\), got 1\.5"),
    ("lots", r"drop_token"),
])
def test_bad_drop_rates_name_the_key(drop_token, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        _task(["video", "text"], drop_token)
