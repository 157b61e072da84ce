"""The whole model: bucket shapes, padding, determinism, safetensors round trip, configs, presets."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from imp_platform.cli import app
from imp_platform.config import ConfigError, validate
from imp_platform.config.model import ModelConfig
from imp_platform.model import build_model
from imp_platform.model.io import load_pretrained, save_pretrained
from imp_platform.model.presets import count_params, preset

BUCKETS = [("video", (2, 8, 32, 32, 3)), ("video", (2, 4, 64, 48, 3)), ("image", (3, 48, 48, 3)), ("audio_mel", (2, 96, 128))]


def tiny(router: str | None = None, **overrides) -> ModelConfig:
    cfg = preset("tiny", moe=router is not None, heads={"digits": 10}, **overrides)
    if router is not None:
        cfg.moe = cfg.moe.model_copy(update={"router": router})
    return cfg


@pytest.mark.parametrize("router", [None, "expert_choice", "top_k"])
def test_bucket_shapes_share_one_model_and_all_weights_learn(router: str | None) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(router))
    total = torch.zeros(())
    for modality, shape in BUCKETS:
        out = model.encode(modality, torch.rand(shape), drop_rate=0.5 if modality == "video" else 0.0)
        assert out.pooled.shape == (shape[0], 96)
        total = total + model.project(out.pooled, modality, "text").sum() + out.aux_loss
        if router:
            assert set(out.expert_load) == {2, 3}
            for load in out.expert_load.values():
                assert load.shape == (4,) and load.sum().item() == pytest.approx(1.0)
    text = model.encode("text", torch.randint(0, 1024, (2, 9)), mask=torch.ones(2, 9, dtype=torch.bool))
    total = total + model.project(text.pooled, "text", "video").sum() * model.temperature("video", "text")
    total = total + model.classify(text.pooled, "digits").sum()
    total.backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    # Only the paths this step did not take stay without gradient.
    untaken = ("embed.audio_wave", "heads.projections.vision_to_audio", "heads.projections.text_to_audio",
               "heads.projections.audio_to_vision", "heads.log_temperatures")
    assert all(n.startswith(untaken) for n in unused), unused
    assert "heads.log_temperatures.text-vision" not in unused


@pytest.mark.parametrize("router", [None, "top_k"])
def test_text_padding_does_not_change_real_tokens(router: str | None) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(router)).eval()
    ids = torch.randint(1, 1024, (2, 6))
    short = model.encode("text", ids, mask=torch.ones(2, 6, dtype=torch.bool))
    padded_ids = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 4)], dim=1).bool()
    padded = model.encode("text", padded_ids, mask=mask)
    torch.testing.assert_close(padded.pooled, short.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.tokens[:, :6], short.tokens, atol=1e-5, rtol=1e-5)


def test_aggregation_token_pooling() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(pooling="token"))
    out = model.encode("image", torch.rand(2, 32, 32, 3))
    assert out.tokens.shape[1] == model.num_tokens("image", (32, 32, 3)) == 17
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])


def run_once(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(tiny("expert_choice"))
    out = model.encode("video", torch.rand(2, 4, 32, 32, 3), drop_rate=0.5)
    (out.pooled.sum() + out.aux_loss).backward()
    return out.pooled.detach(), model.encoder.blocks[3].ffn.w1.grad


def test_determinism_under_seed() -> None:
    a, b, c = run_once(7), run_once(7), run_once(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("router", [None, "top_k"])
def test_safetensors_round_trip(tmp_path, router: str | None) -> None:
    torch.manual_seed(0)
    cfg = tiny(router, pair_mlp=False)
    model = build_model(cfg).eval()
    save_pretrained(model, cfg, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json"}
    loaded, loaded_cfg = load_pretrained(tmp_path)
    assert loaded_cfg == cfg
    video = torch.rand(2, 4, 32, 32, 3)
    torch.testing.assert_close(loaded.eval().encode("video", video).pooled, model.encode("video", video).pooled)
    if router:
        assert loaded.encoder.blocks[3].ffn.w1.shape == (4, 96, 384)  # stacked (E, in, out)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(
    "change,field",
    [
        ({"d_model": 100, "num_heads": 3}, "num_heads"),
        ({"mel_bins": 100}, "audio_patch"),
        ({"heads": 4}, "num_heads"),
        ({"video_patch": [0, 16, 16]}, "video_patch"),
        ({"moe": {"num_experts": 4}}, "last_n"),
        ({"moe": {"num_experts": 2, "last_n": 1, "router": "top_k", "top_k": 3}}, "top_k"),
        ({"moe": {"num_experts": 4, "last_n": 20}}, "last_n"),
        ({"moe": {"num_experts": 4, "last_n": 1}, "mlp_dim": 100}, "mlp_dim"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_errors_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        validate(ModelConfig, change, source="model.yaml")


def test_moe_placement_every_k() -> None:
    cfg = validate(ModelConfig, {"depth": 6, "moe": {"num_experts": 4, "every_k": 2}})
    assert cfg.sparse_layers() == [1, 3, 5]
    assert preset("base", moe=True).sparse_layers() == [6, 7, 8, 9, 10, 11]


def test_preset_param_counts() -> None:
    base = count_params(preset("base"))
    assert 84e6 <= base["per_token"] <= 90e6  # IMP-B: 86M per token
    base_moe = count_params(preset("base", moe=True))
    assert base_moe["per_token"] - base["per_token"] < 1e6  # same active compute, routers aside
    assert base_moe["total"] > 4 * base["total"]
    tiny_cfg = preset("tiny")
    assert count_params(tiny_cfg)["total"] == sum(p.numel() for p in build_model(tiny_cfg).parameters())
    with pytest.raises(ValueError, match="preset"):
        preset("huge")


def test_cli_model_info() -> None:
    result = CliRunner().invoke(app, ["model", "info", "--preset", "base", "--dense"])
    assert result.exit_code == 0, result.output
    assert "87.4M" in result.output and "base" in result.output


@pytest.mark.parametrize("router", ["expert_choice", "top_k"])
def test_moe_model_trains_under_bfloat16_autocast(router: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(router))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.encode("video", torch.rand(2, 4, 32, 32, 3))
        text = model.encode("text", torch.randint(0, 1024, (2, 5)), mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool())
    (out.pooled.float().sum() + text.pooled.float().sum() + out.aux_loss).backward()
    assert torch.isfinite(model.encoder.blocks[3].ffn.w1.grad).all()
