"""The captioning loss against a cross-entropy written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from imp_platform.objectives import caption_loss
from imp_platform.objectives.caption import IGNORE, caption_targets, decoder_inputs

EOS, BOS, VOCAB = 7, 8, 9


def test_decoder_inputs_and_targets_are_shifted_with_eos_and_padding() -> None:
    ids = torch.tensor([[3, 4, 0], [5, 6, 2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert decoder_inputs(ids, BOS).tolist() == [[BOS, 3, 4, 0], [BOS, 5, 6, 2]]
    assert caption_targets(ids, mask, EOS).tolist() == [[3, 4, EOS, IGNORE], [5, 6, 2, EOS]]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_caption_loss_equals_hand_computed_shifted_cross_entropy(smoothing: float) -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[3, 4, 0, 0], [5, 6, 2, 1]])
    mask = ids != 0
    logits = torch.randn(2, 5, VOCAB)  # from [BOS] + ids: one more position than ids
    # Hand: position t predicts ids[t]; after the last real token comes EOS; padding is skipped.
    wanted = [(0, 0, 3), (0, 1, 4), (0, 2, EOS), (1, 0, 5), (1, 1, 6), (1, 2, 2), (1, 3, 1), (1, 4, EOS)]
    terms = []
    for b, t, y in wanted:
        logp = logits[b, t].log_softmax(-1)
        terms.append(-(1 - smoothing) * logp[y] - smoothing * logp.mean())
    expected = sum(terms) / len(terms)
    got = caption_loss(logits, ids, mask, EOS, label_smoothing=smoothing)
    assert math.isclose(float(got), float(expected), rel_tol=1e-5)
    # Junk logits under the padding change nothing.
    logits[0, 3:] = 100.0
    assert math.isclose(float(caption_loss(logits, ids, mask, EOS, label_smoothing=smoothing)),
                        float(expected), rel_tol=1e-5)


def caption_config(objectives: list[dict]):
    from imp_platform.config.train import PretrainConfig

    return PretrainConfig(tasks={"cap": {"modalities": ["video", "text"], "objectives": objectives}})


@pytest.mark.parametrize("with_nce", [True, False])
def test_caption_task_trains_decoder_and_encoder_from_one_forward(with_nce: bool) -> None:
    import numpy as np

    from imp_platform.model import build_model
    from imp_platform.train.tasks import resolve_model_config, run_task

    objectives = [{"kind": "caption", "weight": 2.0, "label_smoothing": 0.1}]
    cfg = caption_config([{"kind": "nce"}, *objectives] if with_nce else objectives)
    model_cfg = resolve_model_config(cfg)
    assert model_cfg.decoder.enabled  # a caption objective turns the decoder on
    torch.manual_seed(0)
    model = build_model(model_cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 30, (3, 6)).astype(np.int32)
    mask = np.arange(6)[None] < np.array([[4], [6], [2]])
    video = rng.integers(0, 255, (3, 4, 16, 16, 3), dtype=np.uint8)
    batch = {"video": video, "text_ids": ids * mask, "text_mask": mask}
    out = run_task(model, "cap", cfg.tasks["cap"], batch, torch.device("cpu"))
    out.loss.backward()
    assert set(out.parts) >= {"caption", *(["nce"] if with_nce else [])}
    assert model.decoder.embed.weight.grad is not None and model.embed.vision.proj.weight.grad is not None
    # With a decoder, text is embedded by its unimodal layers (CoCa), never by the encoder's text path.
    assert model.embed.text.weight.grad is None


def test_nce_text_side_is_the_decoders_unimodal_final_token() -> None:
    import numpy as np

    from imp_platform.config.model import ModelConfig
    from imp_platform.model import build_model
    from imp_platform.model.presets import preset
    from imp_platform.objectives import nce_loss
    from imp_platform.train.tasks import run_task

    data = preset("tiny").model_dump()
    data["decoder"] = {"enabled": True, "unimodal_depth": 1, "multimodal_depth": 1}
    torch.manual_seed(0)
    model = build_model(ModelConfig(**data)).eval()  # no dropout; gradients still flow
    rng = np.random.default_rng(0)
    lengths = np.array([4, 6, 2])
    mask = np.arange(6)[None] < lengths[:, None]
    batch = {"video": rng.integers(0, 255, (3, 4, 16, 16, 3), dtype=np.uint8),
             "text_ids": rng.integers(2, 30, (3, 6)).astype(np.int32) * mask, "text_mask": mask}
    out = run_task(model, "cap", caption_config([{"kind": "nce"}]).tasks["cap"], batch, torch.device("cpu"))

    dec = model.decoder  # by hand: [BOS] + caption through the unimodal layer, normed, at the last real token
    ids = torch.cat([torch.full((3, 1), dec.bos_id), torch.as_tensor(batch["text_ids"]).long()], dim=1)
    x = dec.blocks[0](dec.embed(ids) + dec.positions[:7], None, None, None, 0)
    text = dec.text_norm(x)[torch.arange(3), torch.as_tensor(lengths)]
    encoded = model.encode("text", torch.as_tensor(batch["text_ids"]).long(), mask=torch.as_tensor(mask))
    assert torch.allclose(encoded.pooled, text, atol=1e-6)
    video = model.encode("video", torch.as_tensor(batch["video"]).float() / 255).pooled
    expected = nce_loss(model.project(video, "video", "text"), model.project(text, "text", "video"),
                        model.temperature("video", "text"))
    assert float(out.parts["nce"]) == pytest.approx(float(expected), rel=1e-5)

    out.loss.backward()
    assert dec.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and dec.embed.weight.grad.abs().sum() > 0
    assert dec.blocks[1].attn.qkv.weight.grad is None  # the multimodal layers are the captioner's
    assert model.embed.text.weight.grad is None  # the encoder's text path is unused with a decoder


def test_caption_objective_config_errors_name_the_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="caption needs modalities"):
        from imp_platform.config.train import TaskConfig

        TaskConfig(modalities=["text", "video"], objectives=[{"kind": "caption"}])
    with pytest.raises(ValidationError, match="label_smoothing: only a caption objective"):
        caption_config([{"kind": "nce", "label_smoothing": 0.1}])
