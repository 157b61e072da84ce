"""The moving-digits shards: deterministic, disjoint, real H.264, varied, and labelled correctly."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import soundfile
from PIL import Image
from typer.testing import CliRunner

from imp_platform.cli import app
from imp_platform.data import synth
from imp_platform.data.decode import load_tokenizer


def read_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over every shard of a split."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def detect_dtmf(wave: np.ndarray, rate: int) -> int:
    """The digit whose DTMF pair is nearest the strongest low-band and high-band FFT peaks."""
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    freqs = np.fft.rfftfreq(wave.size, 1 / rate)
    low_band, high_band = (freqs > 600) & (freqs < 1000), (freqs > 1150) & (freqs < 1550)
    low = freqs[low_band][spectrum[low_band].argmax()]
    high = freqs[high_band][spectrum[high_band].argmax()]
    return min(synth.DTMF_HZ, key=lambda d: abs(synth.DTMF_HZ[d][0] - low) + abs(synth.DTMF_HZ[d][1] - high))


def motion(frames: np.ndarray) -> str:
    """Direction from the bright-pixel centroid of the first vs last frame."""
    def centroid(frame: np.ndarray) -> np.ndarray:
        gray = frame.mean(axis=-1)
        ys, xs = np.nonzero(gray > np.percentile(gray, 90))
        return np.array([xs.mean(), ys.mean()])

    dx, dy = centroid(frames[-1]) - centroid(frames[0])
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


@pytest.fixture(scope="module")
def train(synth_shards) -> dict[str, dict[str, bytes]]:
    return read_samples(synth_shards["train"])


def test_layout_and_keys(synth_shards, train) -> None:
    assert sorted(p.name for p in synth_shards["train"].glob("*.tar")) == [f"train-{i:05d}.tar" for i in range(3)]
    assert (synth_shards["root"] / "tokenizer.json").exists()
    assert len(train) == 96 and sorted(train) == [f"train-{i:06d}" for i in range(96)]
    for members in train.values():
        exts = set(members)
        assert "mp4" in exts and "json" in exts
        assert len(exts & {"wav", "flac"}) == 1 and len(exts & {"png", "jpg"}) == 1 and len(exts) == 4


def test_deterministic_across_runs_and_pool_sizes(tmp_path) -> None:
    one = synth.write_dataset(tmp_path / "a", samples=6, shards=2, seed=7, split="val", workers=1)
    two = synth.write_dataset(tmp_path / "b", samples=6, shards=2, seed=7, split="val", workers=2)
    for a, b in zip(one.shards, two.shards, strict=True):
        assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    other_seed = synth.make_sample(8, "val", 0)
    assert other_seed != synth.make_sample(7, "val", 0)


def test_splits_are_disjoint(synth_shards, train) -> None:
    test = read_samples(synth_shards["test"])
    assert len(test) == 40 and not set(train) & set(test)
    pools = {split: set(synth._split_pool(split).tolist()) for split in synth.SPLITS}
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"] and not pools["val"] & pools["test"]
    train_videos = {m["mp4"] for m in train.values()}
    assert not train_videos & {m["mp4"] for m in test.values()}
    with pytest.raises(ValueError, match="split"):
        synth.write_dataset(synth_shards["root"], samples=1, shards=1, seed=0, split="holdout")


def test_real_h264_decodable_and_varied(train) -> None:
    sizes, rates, channels, fpss, durations = set(), set(), set(), set(), set()
    audio_exts, image_exts = set(), set()
    for key, members in train.items():
        with av.open(io.BytesIO(members["mp4"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
            fps = float(stream.average_rate)
        reader = decord.VideoReader(io.BytesIO(members["mp4"]), num_threads=1)
        frame = reader[0].asnumpy()
        sizes.add(frame.shape[:2])
        fpss.add(fps)
        durations.add(round(len(reader) / fps, 1))
        del reader
        audio_ext = "wav" if "wav" in members else "flac"
        info = soundfile.info(io.BytesIO(members[audio_ext]))
        rates.add(info.samplerate)
        channels.add(info.channels)
        audio_exts.add(audio_ext)
        image_ext = "png" if "png" in members else "jpg"
        with Image.open(io.BytesIO(members[image_ext])) as still:
            assert still.size == (frame.shape[1], frame.shape[0])
        image_exts.add(image_ext)
    assert len(sizes) >= 3 and any(h != w for h, w in sizes)
    assert len(fpss) >= 3 and min(fpss) >= 8 and max(fpss) <= 30
    assert min(durations) >= 1.0 and max(durations) <= 4.0 and len(durations) >= 3
    assert rates == {8000, 16000, 22050, 44100}
    assert channels == {1, 2} and audio_exts == {"wav", "flac"} and image_exts == {"png", "jpg"}


def test_labels_match_audio_video_and_caption(train) -> None:
    labels = set()
    for key, members in train.items():
        meta = json.loads(members["json"])
        assert set(meta) == {"caption", "label", "direction"}
        label, direction = meta["label"], meta["direction"]
        labels.add(label)
        assert synth.DIGIT_WORDS[label] in meta["caption"].split() and direction in meta["caption"].split()
        wave, rate = soundfile.read(io.BytesIO(members.get("wav") or members["flac"]), always_2d=True)
        assert detect_dtmf(wave.mean(axis=1), rate) == label, key
        reader = decord.VideoReader(io.BytesIO(members["mp4"]), num_threads=1)
        frames = reader.get_batch([0, len(reader) - 1]).asnumpy()
        del reader
        assert motion(frames) == direction, key
    assert labels == set(range(10))


def test_tokenizer_and_prompts(synth_shards, train) -> None:
    tokenizer = load_tokenizer(str(synth_shards["root"] / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    assert vocab["[PAD]"] == 0 and vocab["[UNK]"] == 1
    for members in train.values():
        assert vocab["[UNK]"] not in tokenizer.encode(json.loads(members["json"])["caption"]).ids
    all_prompts = set()
    for label, word in enumerate(synth.DIGIT_WORDS):
        prompts = synth.class_prompts(label)
        assert len(prompts) == len(synth.CAPTION_TEMPLATES) * len(synth.DIRECTIONS)
        assert all(word in p.split() and vocab["[UNK]"] not in tokenizer.encode(p).ids for p in prompts)
        all_prompts |= set(prompts)
    assert len(all_prompts) == 10 * len(synth.CAPTION_TEMPLATES) * len(synth.DIRECTIONS)


def test_cli_synth(tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path), "--samples", "4", "--shards", "2",
                                 "--seed", "1", "--split", "test"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "test").glob("*.tar")) == ["test-00000.tar", "test-00001.tar"]
    assert len(read_samples(tmp_path / "test")) == 4
    bad = runner.invoke(app, ["data", "synth", "--out", str(tmp_path), "--samples", "4", "--split", "holdout"])
    assert bad.exit_code != 0 and "holdout" in bad.output
