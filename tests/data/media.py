"""Real encoded media for tests, written with PyAV / soundfile / PIL directly (not the synth writer).

Video frames encode their index in their brightness (``5 + 10 * i``, see ``frame_indices``),
so a test can check which frames a decoder sampled, whatever the codec.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import av
import numpy as np
import soundfile
from PIL import Image

# (container format, codec, pixel format) per tar member extension: one codec family each.
VIDEO_FORMATS: dict[str, tuple[str, str, str]] = {
    "mp4": ("mp4", "libx264", "yuv420p"),
    "webm": ("webm", "libvpx-vp9", "yuv420p"),
    "mkv": ("matroska", "libvpx", "yuv420p"),  # VP8
    "avi": ("avi", "mpeg4", "yuv420p"),  # MPEG-4 part 2
    "mov": ("mov", "mjpeg", "yuvj420p"),
}
# (container format, codec) per audio extension encoded through PyAV.
AUDIO_FORMATS: dict[str, tuple[str, str]] = {
    "mp3": ("mp3", "libmp3lame"),
    "m4a": ("ipod", "aac"),
    "opus": ("ogg", "libopus"),
}
Frame = Callable[[int], np.ndarray]


def level_frame(width: int, height: int) -> Frame:
    """Frame ``i`` is flat grey at ``5 + 10 * i``."""
    return lambda i: np.full((height, width, 3), 5 + 10 * i, dtype=np.uint8)


def frame_indices(clip: np.ndarray) -> list[int]:
    """The frame index each frame of a decoded ``level_frame`` clip shows."""
    return np.round((clip.reshape(len(clip), -1).mean(axis=1) - 5) / 10).astype(int).tolist()


def encode_video(width: int, height: int, frames: int = 12, fps: int = 12, ext: str = "mp4",
                 audio_rate: int | None = None, frame: Frame | None = None, fmt: str | None = None,
                 wave: np.ndarray | None = None) -> bytes:
    """``frames`` frames (``frame(i)``, default ``level_frame``) in the container/codec of ``ext``
    (``fmt`` overrides the container, e.g. ``"h264"`` for a raw stream), with an AAC/Opus
    soundtrack of ``wave`` (default: a 440 Hz tone) at ``audio_rate`` when given."""
    container_fmt, codec, pix_fmt = VIDEO_FORMATS[ext]
    frame = frame or level_frame(width, height)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt or container_fmt) as container:
        options = {"preset": "ultrafast", "crf": "10"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "mpeg4":
            stream.codec_context.qscale = 2  # near-lossless, so brightness levels survive
        astream = None
        if audio_rate:
            astream = container.add_stream("libopus" if ext in ("webm", "mkv") else "aac", rate=audio_rate)
            astream.layout = "mono"
        for i in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame(i), format="rgb24")))
        container.mux(stream.encode())
        if astream is not None:
            if wave is None:
                wave = tone(440.0, frames / fps, audio_rate)
            mux_audio(container, astream, wave, audio_rate)
    return buf.getvalue()


def tone(hz: float, seconds: float, rate: int) -> np.ndarray:
    """A float32 sine at ``hz``."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def mux_audio(container: av.container.OutputContainer, stream: av.audio.stream.AudioStream, wave: np.ndarray, rate: int) -> None:
    """Encode a mono float wave into ``stream`` in the codec's own frame size and sample format."""
    frame_size = stream.codec_context.frame_size or 1024
    sample_fmt = stream.codec_context.format.name
    integer = {"s16": np.int16, "s32": np.int32}.get(sample_fmt[:3])
    for start in range(0, wave.size, frame_size):
        chunk = np.pad(wave[start : start + frame_size], (0, max(0, start + frame_size - wave.size)))
        data = chunk[None, :].astype(np.float32)
        if integer is not None:
            data = (data * np.iinfo(integer).max).astype(integer)
        out = av.AudioFrame.from_ndarray(data, format=sample_fmt, layout="mono")
        out.sample_rate, out.pts = rate, start
        container.mux(stream.encode(out))
    container.mux(stream.encode())


def encode_audio(wave: np.ndarray, rate: int, ext: str) -> bytes:
    """A mono float wave as an ``ext`` member: wav/flac/ogg through soundfile, mp3/m4a/opus through PyAV."""
    if ext in ("wav", "flac", "ogg"):
        return wav_bytes(wave, rate, ext.upper(), {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS"}[ext])
    fmt, codec = AUDIO_FORMATS[ext]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        mux_audio(container, stream, wave, rate)
    return buf.getvalue()


def wav_bytes(wave: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def wav_header(rate: int, channels: int, frames: int = 16) -> bytes:
    """A PCM-16 WAV whose header states any rate and channel count (soundfile refuses to write absurd ones)."""
    data = bytes(2 * channels * frames)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
