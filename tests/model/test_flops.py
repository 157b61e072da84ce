"""The FLOP count behind ``cpu_mfu``: against a hand computation, and against torch's own
FLOP counter on the real model's forward (so a change to the blocks that the count misses fails)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from imp_platform.model import build_model
from imp_platform.model.embed import grid_shape
from imp_platform.model.flops import attention_forward, block_forward, embed_forward, sample_forward, sample_train
from imp_platform.model.presets import preset


def _tiny(moe: bool, **overrides):
    return preset("tiny", moe=moe, **{"d_model": 8, "num_heads": 2, "mlp_dim": 16, "depth": 2, **overrides})


def test_block_by_hand():
    # 3 tokens, d 8, h 16: qkv 2*3*8*24 = 1152, out 2*3*8*8 = 384, QK^T + AV 2 * 2*3*3*8 = 288, FFN 2 * 2*3*8*16 = 1536
    assert block_forward(_tiny(False), 3, sparse=False) == 1152 + 384 + 288 + 1536
    # MoE, 4 experts, capacity factor 1: router 2*3*8*4 = 192, 3 routed slots through the same FFN sizes
    assert block_forward(_tiny(True), 3, sparse=True) == 1152 + 384 + 288 + 192 + 1536


def test_conv_stem_by_hand():
    # d 16, 8x8 patch: 3 stride-2 convs 3 -> 8 -> 8 -> 16 channels (widths max(8, d >> k));
    # one 16x16 frame pair (pt = 2) -> 2x2 tubelets. Per frame: 8x8 out 2*64*27*8, 4x4 2*16*72*8, 2x2 2*4*72*16.
    cfg = preset("tiny", d_model=16, num_heads=2)
    per_frame = 2 * 64 * 27 * 8 + 2 * 16 * 72 * 8 + 2 * 4 * 72 * 16
    proj = 2 * 4 * (2 * 16) * 16  # 4 tubelets, 2 frames x 16 channels -> d
    assert embed_forward(cfg, "video", (2, 16, 16)) == 2 * per_frame + proj


@pytest.mark.parametrize(("moe", "stem", "modality", "shape"), [
    (False, "conv", "video", (8, 32, 56)),
    (True, "linear", "video", (4, 32, 32)),
    (True, "conv", "image", (32, 32)),
    (False, "linear", "audio_mel", (64, 128)),
])
def test_matches_torch_flop_counter(moe, stem, modality, shape):
    """torch counts every mm/bmm/conv the forward runs (not CPU SDPA's kernel, whose count is checked by hand
    above); ours must agree to the uncounted heads."""
    cfg = preset("tiny", moe=moe, vision_stem=stem)
    model = build_model(cfg).eval()
    x = torch.rand(2, *shape, 3) if modality in ("video", "image") else torch.randn(2, *shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode(modality, x)
    t, h, w = grid_shape(cfg, modality, shape)
    attention = cfg.depth * attention_forward(cfg, t * h * w)
    assert counter.get_total_flops() == pytest.approx(2 * (sample_forward(cfg, modality, shape) - attention), rel=0.02)


def test_drop_token_and_training_factor():
    cfg = preset("tiny")
    full, kept = sample_forward(cfg, "video", (8, 32, 32)), sample_forward(cfg, "video", (8, 32, 32), 0.5)
    # DropToken after the stem: the stem's cost stays, the encoder's more than halves (attention is quadratic)
    stem = embed_forward(cfg, "video", (8, 32, 32))
    assert stem < kept < full and (kept - stem) < 0.5 * (full - stem)
    assert sample_train(cfg, "video", (8, 32, 32), 0.5) == 3 * kept


def test_bench_step_count_and_task_choice_on_the_demo_recipe():
    """``platform bench train``'s cpu_mfu times the demo's two main tasks and counts their batches' FLOPs."""
    from imp_platform.bench.mfu import _task_weights, task_step_flops
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train.tasks import resolve_model_config

    cfg = load_pretrain_config(None, [])
    assert _task_weights(cfg, 0.75) == {"video_cls": 0.5, "video_text": 0.25}  # 3/4 of the last stage's steps
    model_cfg = resolve_model_config(cfg)
    shapes = {"video": [8, 32, 32, 3], "text_ids": [6], "text_mask": [6]}
    per_sample = sample_train(model_cfg, "video", (8, 32, 32), 0.25) + sample_train(model_cfg, "text", (6,))
    assert task_step_flops(model_cfg, cfg.tasks["video_text"], shapes, 32) == 32 * per_sample
