"""Embedders: normalized factorized positions, DropToken keeping coordinates, token counts."""

from __future__ import annotations

import pytest
import torch

from imp_platform.model import build_model
from imp_platform.model.embed import FactorizedPositions, drop_tokens, normalized_coords
from imp_platform.config.model import ModelConfig
from imp_platform.model.presets import preset


@pytest.fixture(scope="module", params=["conv", "linear"])
def model(request):
    """The tiny preset with each vision stem (conv is its default)."""
    torch.manual_seed(0)
    return build_model(preset("tiny", vision_stem=request.param))


def test_coords_are_cell_centres() -> None:
    coords = normalized_coords((1, 2, 4), torch.device("cpu"))
    assert coords.shape == (8, 3)
    assert coords[:, 0].unique().tolist() == [0.5]
    assert coords[:, 1].unique().tolist() == [0.25, 0.75]
    assert coords[:4, 2].tolist() == [0.125, 0.375, 0.625, 0.875]


def test_positions_interpolate_one_table_for_every_resolution() -> None:
    pos = FactorizedPositions((3, 5, 5), dim=4)
    t, h, w = (table.detach() for table in pos.tables)
    ends = pos(torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(ends[0], t[0] + h[0] + w[-1])
    middle = pos(torch.tensor([[0.25, 0.5, 0.5]]))  # t: halfway between rows 0 and 1
    torch.testing.assert_close(middle[0], (t[0] + t[1]) / 2 + h[2] + w[2])


def test_drop_tokens_keeps_rows_with_their_coordinates() -> None:
    torch.manual_seed(0)
    tokens = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1)
    coords = tokens.expand(-1, -1, 3) * 10
    kept, kept_coords, _ = drop_tokens(tokens, coords, None, rate=0.7)
    assert kept.shape == (2, 3, 1)
    torch.testing.assert_close(kept_coords, kept.expand(-1, -1, 3) * 10)
    assert torch.all(kept[:, 1:] > kept[:, :-1])  # order preserved
    with pytest.raises(ValueError, match="drop_rate"):
        drop_tokens(tokens, coords, None, rate=1.0)


def test_dropped_embedding_equals_full_embedding_at_kept_tokens(model) -> None:
    video = torch.rand(2, 4, 32, 32, 3)
    full = model.embed("video", video).tokens
    torch.manual_seed(3)
    dropped = model.embed("video", video, drop_rate=0.5).tokens
    assert dropped.shape[1] == full.shape[1] // 2
    for b in range(2):  # every kept token matches exactly one position of the full grid
        diff = (dropped[b][:, None] - full[b][None]).abs().amax(dim=-1)
        assert torch.all(diff.min(dim=1).values < 1e-6)


@pytest.mark.parametrize(
    "modality,shape",
    [("video", (4, 32, 48, 3)), ("video", (5, 17, 16, 3)), ("image", (40, 24, 3)), ("audio_mel", (50, 128)), ("audio_wave", (1000,)), ("text", (7,))],
)
def test_num_tokens_matches_encoder(model, modality: str, shape: tuple[int, ...]) -> None:
    inputs = torch.randint(0, 100, (2, *shape)) if modality == "text" else torch.rand(2, *shape)
    assert model.encode(modality, inputs).tokens.shape[1] == model.num_tokens(modality, shape)


def test_bad_inputs_name_the_problem(model) -> None:
    with pytest.raises(ValueError, match="smaller than one patch"):
        model.encode("video", torch.rand(1, 1, 32, 32, 3))
    with pytest.raises(ValueError, match="audio_mel"):
        model.encode("audio_mel", torch.rand(1, 32, 64))
    with pytest.raises(ValueError, match="unknown modality"):
        model.encode("smell", torch.rand(1, 4))
    with pytest.raises(ValueError, match="max_text_len"):
        model.encode("text", torch.zeros(1, 65, dtype=torch.long))


def test_image_is_a_still_clip_for_either_stem(model) -> None:
    """IMP feeds an image as a clip of ``video_patch[0]`` identical frames."""
    image = torch.rand(2, 32, 48, 3)
    clip = image[:, None].expand(-1, model.cfg.video_patch[0], -1, -1, -1)
    torch.testing.assert_close(model.embed("image", image).tokens, model.embed("video", clip).tokens)


def test_conv_stem_needs_square_power_of_two_patches() -> None:
    with pytest.raises(ValueError, match="vision_stem 'conv'"):
        ModelConfig(vision_stem="conv", video_patch=(2, 12, 12))
    with pytest.raises(ValueError, match="vision_stem 'conv'"):
        ModelConfig(vision_stem="conv", video_patch=(2, 8, 16))
    assert ModelConfig(vision_stem="conv", video_patch=(2, 16, 16)).vision_stem == "conv"
