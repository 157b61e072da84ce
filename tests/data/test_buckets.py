"""Bucket policy, names, token counting and padding waste."""

from __future__ import annotations

import pytest

from imp_platform.config.pipeline import PatchConfig, load_pipeline
from imp_platform.data import buckets
from imp_platform.data.synth import FRAME_SIZES

VIDEO = [(8, 32, 32), (8, 32, 56), (8, 56, 32), (16, 32, 32)]


@pytest.mark.parametrize(
    ("native", "expected"),
    [
        ((64, 64, 1.0), (8, 32, 32)),  # square, 1 s at 8 fps -> 8 frames
        ((64, 64, 2.2), (16, 32, 32)),  # square, longer -> the 16-frame bucket
        ((48, 80, 3.0), (8, 32, 56)),  # landscape: only one T on offer
        ((80, 48, 1.0), (8, 56, 32)),  # portrait
        ((1080, 1920, 1.0), (8, 32, 56)),  # 16:9 is nearest to 56:32
        ((100, 101, 0.1), (8, 32, 32)),  # nearly square, very short
    ],
)
def test_video_bucket_nearest_aspect_then_duration(native, expected) -> None:
    height, width, seconds = native
    assert buckets.pick_video_bucket(height, width, seconds, VIDEO, fps=8.0) == expected


MULTI = [(8, 32, 32), (8, 48, 48), (4, 32, 32), (8, 64, 64), (8, 32, 56), (8, 56, 32)]


@pytest.mark.parametrize(
    ("native", "expected"),
    [
        ((56, 56), [(8, 48, 48), (8, 32, 32), (4, 32, 32)]),  # the nearest first; 64x64 would upscale
        ((64, 64), [(8, 64, 64), (8, 32, 32), (8, 48, 48), (4, 32, 32)]),
        ((48, 80), [(8, 32, 56)]),  # the only landscape bucket
        ((16, 16), [(8, 32, 32)]),  # smaller than every bucket: still the nearest
        ((1000, 40), [(8, 56, 32)]),  # far from every aspect ratio: the nearest one's, if it fits
    ],
)
def test_all_fitting_writes_every_bucket_at_the_aspect_without_upscaling(native, expected) -> None:
    height, width = native
    nearest = buckets.pick_video_bucket(height, width, 1.0, MULTI, fps=8.0)
    assert buckets.pick_video_buckets(height, width, 1.0, MULTI, 8.0, resolutions="nearest") == [nearest]
    assert buckets.pick_video_buckets(height, width, 1.0, MULTI, 8.0, resolutions="all_fitting") == expected
    listed = [(4, 32, 32), (8, 32, 56)]  # exactly the listed buckets, whatever the native shape
    assert buckets.pick_video_buckets(height, width, 1.0, MULTI, 8.0, resolutions=listed) == listed


IMAGE_MULTI = [(32, 32), (48, 48), (64, 64), (32, 56), (56, 32)]


@pytest.mark.parametrize(
    ("native", "expected"),
    [
        ((56, 56), [(48, 48), (32, 32)]),  # the nearest first; 64x64 would upscale
        ((48, 80), [(32, 56)]),  # the only landscape bucket
        ((16, 16), [(32, 32)]),  # smaller than every bucket: still the nearest
    ],
)
def test_image_all_fitting_writes_every_bucket_at_the_aspect_without_upscaling(native, expected) -> None:
    height, width = native
    nearest = buckets.pick_image_bucket(height, width, IMAGE_MULTI)
    assert buckets.pick_image_buckets(height, width, IMAGE_MULTI, "nearest") == [nearest]
    assert buckets.pick_image_buckets(height, width, IMAGE_MULTI, "all_fitting") == expected
    assert buckets.pick_image_buckets(height, width, IMAGE_MULTI, [(32, 32), (56, 32)]) == [(32, 32), (56, 32)]


def test_resolutions_must_be_buckets() -> None:
    from imp_platform.config import ConfigError

    with pytest.raises(ConfigError, match=r"video\.resolutions\[1\]=\[8, 64, 64\] is not one of video\.buckets"):
        load_pipeline(None, ["video.resolutions=[[8,32,32],[8,64,64]]"])
    with pytest.raises(ConfigError, match=r"video\.resolutions"):
        load_pipeline(None, ["video.resolutions=every"])
    assert load_pipeline(None).video.resolutions == "nearest"
    with pytest.raises(ConfigError, match=r"image\.resolutions\[0\]=\[8, 8\] is not one of image\.buckets"):
        load_pipeline(None, ["image.buckets=[[32,32]]", "image.resolutions=[[8,8]]"])


def test_duration_policies() -> None:
    clips = [1.0, 2.0, 4.0]
    assert [buckets.pick_duration(s, clips) for s in (0.2, 1.4, 1.6, 3.1, 9.0)] == [0, 0, 1, 2, 2]
    assert [buckets.pick_duration(s, clips, "floor") for s in (0.2, 1.9, 2.0, 3.9, 9.0)] == [0, 0, 1, 1, 2]
    assert buckets.pick_duration(1.5, clips) == 0  # a tie goes to the shorter clip


def test_image_bucket_prefers_largest_area_without_upscaling() -> None:
    sizes = [(128, 128), (256, 256), (128, 224)]
    assert buckets.pick_image_bucket(300, 300, sizes) == (256, 256)
    assert buckets.pick_image_bucket(200, 200, sizes) == (128, 128)
    assert buckets.pick_image_bucket(64, 64, sizes) == (128, 128)  # nothing fits: the smallest
    assert buckets.pick_image_bucket(720, 1280, sizes) == (128, 224)
    with pytest.raises(ValueError, match="positive"):
        buckets.pick_image_bucket(0, 10, sizes)


def test_every_synth_size_gets_the_bucket_of_its_orientation() -> None:
    cfg = load_pipeline()
    for height, width in FRAME_SIZES:
        _, bh, bw = buckets.pick_video_bucket(height, width, 2.0, cfg.video.buckets, cfg.video.fps or 8.0)
        assert (bh > bw) == (height > width) and (bh == bw) == (height == width)


def test_text_length() -> None:
    assert buckets.pick_text_length(3, [16, 32]) == 16
    assert buckets.pick_text_length(16, [32, 16]) == 16
    assert buckets.pick_text_length(17, [16, 32]) == 32
    assert buckets.pick_text_length(99, [16, 32]) == 32


def test_bucket_name_is_stable_and_ordered() -> None:
    shapes = {"text_ids": [16], "audio_mel": [128, 128], "video": [8, 32, 56, 3], "image": [32, 56, 3]}
    assert buckets.bucket_name(shapes) == "v8x32x56_i32x56_a128x128_t16"
    assert buckets.bucket_name(dict(reversed(list(shapes.items())))) == "v8x32x56_i32x56_a128x128_t16"
    assert buckets.bucket_name({"video": [8, 32, 32, 3]}) == "v8x32x32"
    with pytest.raises(ValueError, match="smell"):
        buckets.bucket_name({"smell": [1]})


def test_tokens_and_batch_size() -> None:
    patches = PatchConfig(video=(2, 8, 8), image=(8, 8), audio_mel=(16, 16), audio_wave=256)
    assert buckets.modality_tokens("video", [8, 32, 56, 3], patches) == 4 * 4 * 7
    assert buckets.modality_tokens("image", [32, 32, 3], patches) == 16
    assert buckets.modality_tokens("audio_mel", [100, 128], patches) == 7 * 8  # partial patch counts
    assert buckets.modality_tokens("audio_wave", [16000], patches) == 63
    shapes = {"video": [8, 32, 32, 3], "text_ids": [16], "text_mask": [16]}
    assert buckets.tokens_per_sample(shapes, patches) == 64 + 16
    assert buckets.batch_size_for(80, 8192) == 102
    assert buckets.batch_size_for(10_000, 8192) == 1
    with pytest.raises(ValueError):
        buckets.batch_size_for(0, 8192)


def test_padding_waste() -> None:
    assert buckets.padding_waste([[4, 4], [2]]) == 0.0
    assert buckets.padding_waste([[4, 2]]) == pytest.approx(2 / 8)
    counts = [64, 112, 64, 112]
    names = ["sq", "land", "sq", "land"]
    assert buckets.padding_waste_pad_to_max(counts, batch_size=2) == pytest.approx(96 / 448)
    assert buckets.padding_waste_bucketed(counts, names, batch_size=2) == 0.0
    assert buckets.padding_waste([]) == 0.0
