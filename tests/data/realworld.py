"""A second corpus that is not moving digits, written another way than the synth writer (issue 13 §5).

*Coloured shapes*: each clip shows a disc, square or bar of one of four colours gliding over a
grey, noisy background, with a tone whose pitch is the colour's, and a still image of the same
shape. The class is the colour, given in the json by *name* (``"label": "blue"``); captions are a
list of two longer sentences; other json fields (``shape``, ``direction``, ``source``) are
metadata. Containers and codecs rotate per sample as a crawled corpus mixes them: video in webm
(VP9), mkv (VP8), avi (MPEG-4 part 2), mov (MJPEG) and mp4 (H.264), frame sizes odd or not, 8-15
fps; audio in ogg (Vorbis), opus, mp3, m4a (AAC) and flac at 16-48 kHz, or only as the AAC
soundtrack of the mp4; images in webp, png and jpg. Colour and pitch are what a tiny model can
learn to tell apart, so zero-shot accuracy above chance (0.25) is a fair test of the whole path.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from media import encode_audio, encode_video, image_bytes
from PIL import Image, ImageDraw

CLASSES = ("red", "green", "blue", "yellow")
COLOURS = {"red": (225, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 235), "yellow": (235, 215, 40)}
PITCH = {"red": (262.0, "low"), "green": (523.0, "middle"), "blue": (1047.0, "high"), "yellow": (2093.0, "very high")}
SHAPES = ("disc", "square", "bar")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_EXTS = ("webm", "mkv", "avi", "mov", "mp4")
AUDIO_EXTS = ("ogg", "opus", "mp3", "m4a", "flac")
IMAGE_EXTS = {"webp": "WEBP", "png": "PNG", "jpg": "JPEG"}
SIZES = ((48, 48), (66, 38), (38, 66), (64, 48))  # (width, height): square, landscape, portrait, odd
SAMPLES_PER_SHARD = 8
PIPELINE_YAML = Path(__file__).with_name("shapes.yaml")


def draw(colour: str, shape: str, size: tuple[int, int], centre: tuple[float, float], background: np.ndarray) -> np.ndarray:
    """One RGB frame: the shape, a quarter of the short side across, over the background."""
    image = Image.fromarray(background)
    r = min(size) / 4
    x, y = centre
    box = {"disc": (x - r, y - r, x + r, y + r), "square": (x - r, y - r, x + r, y + r),
           "bar": (x - 1.6 * r, y - r / 2, x + 1.6 * r, y + r / 2)}[shape]
    pen = ImageDraw.Draw(image)
    (pen.ellipse if shape == "disc" else pen.rectangle)(box, fill=COLOURS[colour])
    return np.asarray(image)


def captions(colour: str, shape: str, direction: str, index: int) -> list[str]:
    """Two captions, three for every other sample (several captions per sample: MIL-NCE positives)."""
    pitch = PITCH[colour][1]
    third = [f"a {pitch} tone while the {colour} {shape} moves {direction}"] if index % 2 == 0 else []
    return [f"a {colour} {shape} glides {direction} across a grey background while a {pitch} tone hums",
            f"footage of a {shape} painted {colour} with a steady {pitch} note playing", *third]


def make_sample(index: int, rng: np.random.Generator) -> dict[str, bytes]:
    """One sample's members (extension -> bytes); its class cycles so every split is balanced."""
    colour, shape = CLASSES[index % len(CLASSES)], SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    width, height = SIZES[rng.integers(len(SIZES))]
    fps, seconds = int(rng.choice([8, 10, 12, 15])), float(rng.uniform(1.0, 2.0))
    frames = max(2, int(fps * seconds))
    background = rng.integers(100, 150, (height, width, 3), dtype=np.uint8)
    dx, dy = DIRECTIONS[direction]
    start = np.array([width / 2 - dx * width / 4, height / 2 - dy * height / 4])
    step = np.array([dx * width / 2, dy * height / 2]) / frames

    def frame(i: int) -> np.ndarray:
        return draw(colour, shape, (width, height), tuple(start + step * i), background)

    video_ext, audio_ext = VIDEO_EXTS[index % len(VIDEO_EXTS)], AUDIO_EXTS[rng.integers(len(AUDIO_EXTS))]
    rate = 48000 if audio_ext == "opus" else int(rng.choice([16000, 22050, 44100]))
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.4 * np.sin(2 * np.pi * PITCH[colour][0] * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    soundtrack = video_ext == "mp4"  # the mp4 carries its tone as an AAC track and has no audio member
    members = {video_ext: encode_video(width, height, frames, fps, video_ext, audio_rate=rate if soundtrack else None,
                                       frame=frame, wave=wave if soundtrack else None)}
    if not soundtrack:
        members[audio_ext] = encode_audio(wave, rate, audio_ext)
    image_ext = list(IMAGE_EXTS)[index % len(IMAGE_EXTS)]
    members[image_ext] = image_bytes(Image.fromarray(frame(frames // 2)), IMAGE_EXTS[image_ext])
    members["json"] = json.dumps({"caption": captions(colour, shape, direction, index), "label": colour, "shape": shape,
                                  "direction": direction, "source": "shapes-test"}).encode()
    return members


def write_shapes_corpus(root: Path, split: str, samples: int, seed: int) -> Path:
    """Write ``samples`` samples as webdataset shards under ``root/split`` (8 per shard); returns that folder."""
    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, len(split)])
    for shard in range(0, samples, SAMPLES_PER_SHARD):
        with tarfile.open(folder / f"shapes-{split}-{shard // SAMPLES_PER_SHARD:05d}.tar", "w") as tar:
            for index in range(shard, min(samples, shard + SAMPLES_PER_SHARD)):
                for ext, data in make_sample(index, rng).items():
                    info = tarfile.TarInfo(f"{split}-{index:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder
