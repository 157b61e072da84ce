"""The embedded moving-digits AV dataset: real handwritten digits, DTMF audio, captions, stills.

Each sample is a webdataset group ``<split>-<index>.{mp4,wav|flac,json,png|jpg}``: an H.264
clip of a scikit-learn digit sliding in one of four directions over a noisy background, the
digit's telephone (DTMF) dual tone, a caption naming digit and direction, and one still.
Sizes, frame rates, durations, sample rates and channel counts vary so bucketing has real
work. Everything is a pure function of (seed, split, index), so shards are byte-identical
across runs and pool sizes; splits draw their digit images from disjoint subsets of the
scikit-learn set (train/val/test = index mod 10 in 0-7 / 8 / 9).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import logging
import multiprocessing as mp
import os
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

log = logging.getLogger(__name__)

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
CAPTION_TEMPLATES: tuple[str, ...] = (
    "the digit {digit} moves {direction}",
    "a handwritten {digit} moving {direction}",
    "the number {digit} slides {direction}",
    "a video of a {digit} going {direction}",
    "a {digit} drifting {direction} over noise",
)
# DTMF (ITU-T Q.23): each key is the sum of one low "row" and one high "column" tone.
DTMF_HZ: dict[int, tuple[float, float]] = {
    1: (697, 1209), 2: (697, 1336), 3: (697, 1477),
    4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
    7: (852, 1209), 8: (852, 1336), 9: (852, 1477),
    0: (941, 1336),
}
SPLITS: dict[str, tuple[int, ...]] = {"train": tuple(range(8)), "val": (8,), "test": (9,)}
# (H, W). No frame is 48 px wide: decord 0.6 fails on widths 8, 16, 24, 48 and 72 (row-alignment bug).
FRAME_SIZES: tuple[tuple[int, int], ...] = ((56, 56), (64, 64), (48, 80), (80, 56))
FPS_CHOICES: tuple[int, ...] = (8, 10, 12, 15, 24, 30)
DURATIONS_S: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
SAMPLE_RATES: tuple[int, ...] = (8000, 16000, 22050, 44100)
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]")


def class_prompts(label: int) -> list[str]:
    """Zero-shot prompts for digit ``label``: every caption template with every direction."""
    return [t.format(digit=DIGIT_WORDS[label], direction=d) for t in CAPTION_TEMPLATES for d in DIRECTIONS]


@dataclass(frozen=True)
class SynthSummary:
    """What ``write_dataset`` wrote."""

    out_dir: Path
    split: str
    samples: int
    shards: list[Path]
    tokenizer: Path
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("inf")


# ---------------------------------------------------------------- tokenizer


def label_word_groups() -> dict[str, tuple[str, ...]]:
    """The words each caption must get right, by kind: one digit and one direction per clip."""
    return {"digit": DIGIT_WORDS, "direction": DIRECTIONS}


def caption_vocabulary() -> list[str]:
    """Every word any caption can contain, sorted (so the tokenizer is a pure function of the templates)."""
    words = {w for t in CAPTION_TEMPLATES for w in t.replace("{digit}", "").replace("{direction}", "").split()}
    return sorted(words | set(DIGIT_WORDS) | set(DIRECTIONS))


def build_tokenizer():  # -> tokenizers.Tokenizer
    """Lower-cased whitespace WordLevel tokenizer over the caption vocabulary; ``[PAD]`` = 0, ``[UNK]`` = 1."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *caption_vocabulary()])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


# ---------------------------------------------------------------- one sample


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits (values 0..1) and labels.

    Read from the CSV that ``load_digits`` itself parses, located without importing sklearn:
    importing it costs ~3 CPU-seconds (scipy) in every encoder process.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.exists():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        images, targets = table[:, :64].reshape(-1, 8, 8), table[:, 64]
    else:  # a scikit-learn that moved its data file
        from sklearn.datasets import load_digits

        data = load_digits()
        images, targets = data.images, data.target
    return (images / 16.0).astype(np.float32), targets.astype(np.int64)


def _split_pool(split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    images, _ = _digits()
    return np.flatnonzero(np.isin(np.arange(len(images)) % 10, SPLITS[split]))


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _upscale(image: np.ndarray, side: int) -> np.ndarray:
    pil = Image.fromarray((image * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.float32) / 255.0


def _frames(rng: np.random.Generator, digit: np.ndarray, height: int, width: int, count: int, direction: str) -> np.ndarray:
    """uint8 [count, H, W, 3]: a tinted digit sliding across a noisy background that flickers between a few noise fields."""
    side = int(min(height, width) * rng.uniform(0.45, 0.6))
    sprite = (_upscale(digit, side)[..., None] * rng.uniform(0.6, 1.0, size=3) * 255).astype(np.uint8)
    base = rng.uniform(0.0, 0.35, size=(height, width, 1)) * rng.uniform(0.5, 1.0, size=3)
    flicker = rng.normal(0.0, 0.02, size=(3, height, width, 1))
    backgrounds = (np.clip(base + flicker, 0.0, 1.0) * 255).astype(np.uint8)
    travel_x, travel_y = width - side, height - side
    fixed_x, fixed_y = int(rng.integers(0, travel_x + 1)), int(rng.integers(0, travel_y + 1))
    out = backgrounds[np.arange(count) % len(backgrounds)]
    for i, p in enumerate(np.linspace(0.0, 1.0, count)):
        if direction in ("left", "right"):
            x, y = round((1 - p if direction == "left" else p) * travel_x), fixed_y
        else:
            x, y = fixed_x, round((1 - p if direction == "up" else p) * travel_y)
        region = out[i, y : y + side, x : x + side]
        np.maximum(region, sprite, out=region)
    return out


def _encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "18", "threads": "1"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def dtmf(label: int, seconds: float, rate: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [S, channels]: the digit's DTMF pair with +-1% frequency jitter, random phase and noise."""
    low, high = (f * rng.uniform(0.99, 1.01) for f in DTMF_HZ[label])
    t = np.arange(int(round(seconds * rate)), dtype=np.float32) / np.float32(rate)
    phase_low, phase_high = rng.uniform(0, 2 * np.pi, size=2).astype(np.float32)
    tone = 0.35 * np.sin(np.float32(2 * np.pi * low) * t + phase_low) + 0.3 * np.sin(np.float32(2 * np.pi * high) * t + phase_high)
    wave = tone[:, None] + rng.standard_normal(size=(t.size, channels), dtype=np.float32) * np.float32(0.05)
    return np.clip(wave, -1.0, 1.0)


def _encode_audio(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def _encode_image(frame: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": 92} if fmt == "jpg" else {}))
    return buf.getvalue()


def make_sample(seed: int, split: str, index: int) -> dict[str, bytes]:
    """One sample as tar members ``{"<key>.<ext>": bytes}``; a pure function of its arguments."""
    rng = _rng(seed, split, index)
    images, targets = _digits()
    image_index = int(rng.choice(_split_pool(split)))
    label = int(targets[image_index])
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    height, width = FRAME_SIZES[rng.integers(len(FRAME_SIZES))]
    fps = int(rng.choice(FPS_CHOICES))
    seconds = float(rng.choice(DURATIONS_S))
    rate = int(rng.choice(SAMPLE_RATES))
    channels = int(rng.integers(1, 3))
    audio_ext = "wav" if rng.random() < 0.5 else "flac"
    image_ext = "png" if rng.random() < 0.5 else "jpg"
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]

    frames = _frames(rng, images[image_index], height, width, max(2, int(round(seconds * fps))), direction)
    meta = {"caption": template.format(digit=DIGIT_WORDS[label], direction=direction), "label": label, "direction": direction}
    key = f"{split}-{index:06d}"
    return {
        f"{key}.mp4": _encode_mp4(frames, fps),
        f"{key}.{audio_ext}": _encode_audio(dtmf(label, seconds, rate, channels, rng), rate, audio_ext),
        f"{key}.json": json.dumps(meta, sort_keys=True).encode(),
        f"{key}.{image_ext}": _encode_image(frames[len(frames) // 2], image_ext),
    }


# ---------------------------------------------------------------- shards


def _make_sample_args(args: tuple[int, str, int]) -> dict[str, bytes]:
    return make_sample(*args)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular member with fixed mtime and mode, so equal samples give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_dataset(
    out_dir: str | Path,
    samples: int,
    shards: int,
    seed: int,
    split: str = "train",
    workers: int | None = None,
) -> SynthSummary:
    """Write ``out_dir/<split>/<split>-%05d.tar`` (samples spread evenly over shards) and ``out_dir/tokenizer.json``."""
    if samples <= 0 or shards <= 0:
        raise ValueError(f"samples and shards must be positive, got samples={samples}, shards={shards}")
    _split_pool(split)  # validates the split name
    start = time.perf_counter()
    out_dir = Path(out_dir)
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.json"
    build_tokenizer().save(str(tokenizer_path))

    shards = min(shards, samples)
    bounds = np.linspace(0, samples, shards + 1).round().astype(int)
    workers = workers or min(os.cpu_count() or 1, max(1, samples // 32))
    args = [(seed, split, i) for i in range(samples)]
    paths: list[Path] = []
    with contextlib.ExitStack() as stack:
        results = map(_make_sample_args, args)
        if workers > 1:
            # forkserver: safe beside Ray's and torch's threads; preloading this module imports av/PIL/soundfile once.
            context = mp.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            results = stack.enter_context(context.Pool(workers)).imap(_make_sample_args, args, chunksize=8)
        for shard in range(shards):
            path = split_dir / f"{split}-{shard:05d}.tar"
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for _ in range(bounds[shard], bounds[shard + 1]):
                    for name, data in next(results).items():
                        add_member(tar, name, data)
            paths.append(path)
            log.info("wrote %s (%d samples)", path, bounds[shard + 1] - bounds[shard])
    seconds = time.perf_counter() - start
    log.info("synth %s: %d samples in %d shards, %.1f samples/s", split, samples, shards, samples / seconds)
    return SynthSummary(out_dir, split, samples, paths, tokenizer_path, seconds)
