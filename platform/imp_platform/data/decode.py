"""Pure decode functions: tar-member bytes -> numpy arrays, and the typed errors for bad input.

Every failure is a ``DecodeError`` subclass with a stable ``kind`` so the pipeline can skip
and count a sample instead of crashing. Decoders touch only what the clip needs: headers are
checked before any frame is decoded, decord resizes at decode and reads only the sampled
frame indices, and every reader/container is closed explicitly (decord and PyAV both leak
otherwise).
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from imp_platform.config.pipeline import AudioConfig, LimitsConfig, PipelineConfig
from imp_platform.data import buckets

# ---------------------------------------------------------------- errors


class DecodeError(Exception):
    """A sample that cannot be decoded; ``kind`` is the counter name in the manifest."""

    kind: str = "decode_error"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def __reduce__(self) -> tuple:  # survives pickling across Ray workers whatever the subclass signature
        return _rebuild_error, (type(self), self.kind, self.message)


def _rebuild_error(cls: type[DecodeError], kind: str, message: str) -> DecodeError:
    error = cls.__new__(cls)
    DecodeError.__init__(error, kind, message)
    return error


class _KindError(DecodeError):
    """A DecodeError whose kind is fixed by its class: ``CorruptVideo("why")``."""

    def __init__(self, message: str) -> None:
        super().__init__(type(self).kind, message)


class CorruptVideo(_KindError):
    """Truncated or unreadable video container/stream."""

    kind = "corrupt_video"


class UnknownCodec(_KindError):
    """A stream whose codec no decoder here knows."""

    kind = "unknown_codec"


class AbsurdResolution(_KindError):
    """A header promising frames larger than ``limits.max_side``."""

    kind = "absurd_resolution"


class AbsurdDuration(_KindError):
    """A header promising media longer than ``limits.max_duration_s``."""

    kind = "absurd_duration"


class CorruptAudio(_KindError):
    """Unreadable audio file or track."""

    kind = "corrupt_audio"


class EmptyAudio(_KindError):
    """Audio with no samples (or a video with no audio track where one was needed)."""

    kind = "empty_audio"


class NanAudio(_KindError):
    """Audio samples that are NaN or infinite."""

    kind = "nan_audio"


class BadTextEncoding(_KindError):
    """Caption bytes that are not valid UTF-8."""

    kind = "bad_text_encoding"


class CorruptText(_KindError):
    """Caption json that does not parse or lacks the caption key."""

    kind = "corrupt_text"


class CorruptImage(_KindError):
    """Unreadable image."""

    kind = "corrupt_image"


class MissingModality(_KindError):
    """A required modality has no member in the sample."""

    kind = "missing_modality"


class UnsafeMemberName(_KindError):
    """A tar member name (or sample key) that is absolute or climbs out of its folder."""

    kind = "unsafe_member_name"


ERROR_KINDS: tuple[str, ...] = tuple(cls.kind for cls in _KindError.__subclasses__())


def check_member_name(name: str) -> None:
    """Reject tar member names (or sample keys) that are absolute or climb out with ``..``."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise UnsafeMemberName(f"unsafe tar member name {name!r}")
    if ".." in PurePosixPath(name).parts:
        raise UnsafeMemberName(f"tar member name {name!r} climbs out of its folder")


# ---------------------------------------------------------------- video


@dataclass(frozen=True)
class VideoInfo:
    """What a container header says, read before any frame is decoded."""

    width: int
    height: int
    fps: float
    num_frames: int
    duration_s: float
    codec: str
    has_audio: bool


def _open_container(data: bytes, error: type[DecodeError], what: str) -> Any:
    """A PyAV container over in-memory bytes; FFmpeg's refusal becomes ``error`` (a skip kind)."""
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as exc:
        raise error(f"cannot open {what} ({exc})") from None


def probe_video(data: bytes, limits: LimitsConfig | None = None) -> VideoInfo:
    """Read the container header with PyAV and enforce ``limits`` (resolution, duration) before decoding."""
    limits = limits or LimitsConfig()
    container = _open_container(data, CorruptVideo, "container")
    try:
        if not container.streams.video:
            raise CorruptVideo("container has no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context  # None when FFmpeg has no decoder for the stream's codec tag
        if ctx is None:
            raise UnknownCodec("the video stream's codec is not known to FFmpeg")
        codec = ctx.name
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            raise CorruptVideo(f"video header has no frame size ({width}x{height})")
        if max(width, height) > limits.max_side:
            raise AbsurdResolution(f"{width}x{height} exceeds limits.max_side={limits.max_side}")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        else:
            duration = 0.0
        if duration > limits.max_duration_s:
            raise AbsurdDuration(f"{duration:.1f}s exceeds limits.max_duration_s={limits.max_duration_s}")
        frames = int(stream.frames or round(duration * fps))
        return VideoInfo(width, height, fps, frames, duration, codec, bool(container.streams.audio))
    finally:
        container.close()


def sample_indices(num_frames: int, native_fps: float, count: int, fps: float | None) -> np.ndarray:
    """Frame indices of a centred clip of ``count`` frames at ``fps`` (clamped: short videos repeat their last frame)."""
    if num_frames <= 0:
        raise CorruptVideo("video has no frames")
    if fps is None or native_fps <= 0:
        return np.linspace(0, num_frames - 1, count).round().astype(np.int64)
    step = native_fps / fps
    start = max(0.0, (num_frames - step * count) / 2)
    return np.minimum(np.floor(start + step * np.arange(count)), num_frames - 1).astype(np.int64)


def _decode_decord(data: bytes, size: tuple[int, int, int], fps: float | None, num_threads: int) -> np.ndarray:
    import decord

    t, h, w = size
    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), width=w, height=h, num_threads=num_threads)
    try:
        idx = sample_indices(len(reader), reader.get_avg_fps(), t, fps)
        return reader.get_batch(idx.tolist()).asnumpy()
    finally:
        del reader


def _decode_pyav(data: bytes, size: tuple[int, int, int], fps: float | None, info: VideoInfo) -> np.ndarray:
    """Sequential decode for what decord rejects; only the sampled frames are converted and kept."""
    t, h, w = size
    indices = sample_indices(info.num_frames, info.fps, t, fps).tolist() if info.num_frames > 0 else None
    wanted = set(indices) if indices is not None else None
    kept: dict[int, np.ndarray] = {}
    container = _open_container(data, CorruptVideo, "container")
    try:
        stream = container.streams.video[0]
        stream.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if wanted is None or i in wanted:
                kept[i] = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
            if wanted is not None and i >= max(wanted):
                break
    finally:
        container.close()
    if not kept:
        raise CorruptVideo("no decodable frames")
    decoded = sorted(kept)  # the header may promise more frames than the stream holds: clamp to the last one
    if indices is None:
        indices = sample_indices(len(decoded), info.fps, t, fps).tolist()
    return np.stack([kept[decoded[min(int(np.searchsorted(decoded, i)), len(decoded) - 1)]] for i in indices])


def decode_video(
    data: bytes,
    size: tuple[int, int, int],
    fps: float | None,
    *,
    info: VideoInfo | None = None,
    limits: LimitsConfig | None = None,
    num_threads: int = 1,
) -> np.ndarray:
    """Video bytes -> uint8 [T, H, W, 3] resized at decode: decord first, PyAV where decord cannot read the container."""
    info = info or probe_video(data, limits)
    try:
        frames = _decode_decord(data, size, fps, num_threads)
    except Exception:  # DECORDError for containers it cannot open, and for some output widths (8, 16, 24, 48, 72 px)
        try:
            frames = _decode_pyav(data, size, fps, info)
        except DecodeError:
            raise
        except Exception as exc:
            raise CorruptVideo(f"neither decord nor PyAV can decode the {info.codec} stream ({exc})") from None
    expected = (size[0], size[1], size[2], 3)
    if frames.shape != expected:
        raise CorruptVideo(f"decoded shape {frames.shape} != {expected}")
    return np.ascontiguousarray(frames, dtype=np.uint8)


# ---------------------------------------------------------------- audio

_SOUNDFILE_EXTS = {"wav", "flac", "ogg"}


def _check_duration(seconds: float, limits: LimitsConfig) -> None:
    if seconds > limits.max_duration_s:
        raise AbsurdDuration(f"audio of {seconds:.1f}s exceeds limits.max_duration_s={limits.max_duration_s}")


def _pyav_audio(data: bytes, limits: LimitsConfig) -> tuple[np.ndarray, int]:
    import av

    container = _open_container(data, CorruptAudio, "audio container")
    try:
        if not container.streams.audio:
            raise EmptyAudio("no audio track")
        stream = container.streams.audio[0]
        rate = int(stream.rate or stream.codec_context.sample_rate or 0)
        if container.duration is not None:
            _check_duration(container.duration / 1e6, limits)
        resampler = av.AudioResampler(format="fltp")  # planar float, native layout and rate
        chunks = [
            out.to_ndarray()
            for frame in container.decode(stream)
            for out in resampler.resample(frame)
        ]
    except av.FFmpegError as exc:
        raise CorruptAudio(f"cannot decode audio track ({exc})") from None
    finally:
        container.close()
    if not chunks or rate <= 0:
        raise EmptyAudio("audio track has no samples")
    return np.concatenate(chunks, axis=1).T, rate


def decode_audio(data: bytes, ext: str, limits: LimitsConfig | None = None) -> tuple[np.ndarray, int]:
    """Audio bytes (or a video with an audio track) -> mono float32 [S] at the native rate, and that rate.

    wav/flac/ogg go through soundfile, everything else (mp3, m4a, a video's soundtrack) through PyAV;
    the header's duration is checked against ``limits`` before samples are decoded.
    """
    limits = limits or LimitsConfig()
    ext = ext.lower().lstrip(".")
    if not data:
        raise EmptyAudio("zero-length audio member")
    if ext in _SOUNDFILE_EXTS:
        import soundfile

        try:
            with soundfile.SoundFile(io.BytesIO(data)) as sound:
                rate = sound.samplerate
                _check_duration(sound.frames / max(rate, 1), limits)
                wave = sound.read(dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
            raise CorruptAudio(f"cannot read {ext} ({exc})") from None
    else:
        wave, rate = _pyav_audio(data, limits)
    mono = np.asarray(wave, dtype=np.float32).mean(axis=1)
    if mono.size == 0:
        raise EmptyAudio("audio has no samples")
    if not np.isfinite(mono).all():
        raise NanAudio(f"{int((~np.isfinite(mono)).sum())} of {mono.size} samples are NaN/inf")
    return mono, int(rate)


@functools.lru_cache(maxsize=4)
def _mel_transform(sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> Any:
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)


@functools.lru_cache(maxsize=8)
def _resampler(rate: int, target: int) -> Any:
    import torchaudio

    return torchaudio.transforms.Resample(rate, target)  # builds the sinc kernel once per rate pair


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 resampling with torchaudio's band-limited sinc interpolation."""
    if rate == target:
        return wave
    import torch

    with torch.no_grad():
        return _resampler(rate, target)(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))).numpy()


def crop_or_pad(wave: np.ndarray, length: int) -> np.ndarray:
    """Centre-crop (matching the centred video clip) or zero-pad at the end to ``length`` samples."""
    if wave.size >= length:
        start = (wave.size - length) // 2
        return wave[start : start + length]
    return np.pad(wave, (0, length - wave.size))


def audio_features(wave: np.ndarray, rate: int, cfg: AudioConfig, clip_seconds: float) -> dict[str, np.ndarray]:
    """Mono wave -> {"audio_mel": float32 [F, n_mels] log-mel, "audio_wave": float32 [S] if enabled}."""
    import torch

    if wave.size == 0:
        raise EmptyAudio("audio has no samples")
    if not np.isfinite(wave).all():
        raise NanAudio("audio samples are NaN/inf")
    clip = crop_or_pad(resample(wave, rate, cfg.sample_rate), cfg.clip_samples(clip_seconds)).astype(np.float32)
    transform = _mel_transform(cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels)
    with torch.no_grad():
        mel = transform(torch.from_numpy(clip))[:, : cfg.mel_frames(clip_seconds)]
    out = {"audio_mel": torch.log(mel + 1e-6).T.contiguous().numpy().astype(np.float32)}
    if cfg.waveform:
        out["audio_wave"] = clip
    return out


# ---------------------------------------------------------------- text


def decode_text(data: bytes | str | Mapping[str, Any], ext: str, caption_key: str = "caption") -> tuple[str, dict[str, Any]]:
    """Caption member -> (caption, metadata). Strict UTF-8; json needs ``caption_key``; txt is the caption."""
    if isinstance(data, Mapping):
        meta = dict(data)
    else:
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadTextEncoding(f"caption is not UTF-8 ({exc})") from None
        if ext.lower().lstrip(".") != "json":
            return data.strip(), {}
        try:
            meta = json.loads(data)
        except json.JSONDecodeError as exc:
            raise CorruptText(f"caption json does not parse ({exc})") from None
        if not isinstance(meta, dict):
            raise CorruptText(f"caption json is a {type(meta).__name__}, not an object")
    caption = meta.get(caption_key)
    if not isinstance(caption, str):
        raise CorruptText(f"caption json has no string {caption_key!r}")
    return caption.strip(), meta


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str) -> Any:
    """A ``tokenizers.Tokenizer`` from a tokenizer.json path or its JSON text (cached per process)."""
    from tokenizers import Tokenizer

    if source.lstrip().startswith("{"):
        return Tokenizer.from_str(source)
    return Tokenizer.from_file(source)


def tokenize(text: str, tokenizer: Any, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Text -> (int32 ids [length] padded with 0, bool mask [length]); longer texts are truncated."""
    ids = tokenizer.encode(text).ids[:length]
    out = np.zeros(length, dtype=np.int32)
    out[: len(ids)] = ids
    mask = np.zeros(length, dtype=bool)
    mask[: len(ids)] = True
    return out, mask


# ---------------------------------------------------------------- image


def probe_image(data: bytes, limits: LimitsConfig | None = None) -> tuple[int, int]:
    """(height, width) from the image header, refusing sizes above ``limits.max_side`` before decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    limits = limits or LimitsConfig()
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise AbsurdResolution(f"image header: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CorruptImage(f"cannot read image header ({exc})") from None
    if max(width, height) > limits.max_side:
        raise AbsurdResolution(f"image {width}x{height} exceeds limits.max_side={limits.max_side}")
    return height, width


def decode_image(data: bytes, size: tuple[int, int], limits: LimitsConfig | None = None) -> np.ndarray:
    """Image bytes -> uint8 [H, W, 3] RGB resized (bilinear) to ``size`` = (H, W)."""
    from PIL import Image, UnidentifiedImageError

    probe_image(data, limits)
    height, width = size
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImage(f"cannot decode image ({exc})") from None


# ---------------------------------------------------------------- whole sample


@dataclass
class DecodedSample:
    """One sample ready to write: its bucket name, per-column shapes and the row (columns of the data contract)."""

    key: str
    bucket: str
    shapes: dict[str, list[int]]
    row: dict[str, Any] = field(repr=False)


def split_members(sample: Mapping[str, Any], cfg: PipelineConfig) -> dict[str, tuple[str, Any]]:
    """Webdataset row (``__key__`` + extension -> value) -> modality -> (extension, value), first listed extension wins."""
    found: dict[str, tuple[str, Any]] = {}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        check_member_name(name)
        modality = cfg.modalities.modality_of(name.rsplit(".", 1)[-1])
        wanted = modality in cfg.modalities.enabled or (modality == "video" and cfg.modalities.audio_from_video)
        if modality is None or not wanted:
            continue
        ext = name.rsplit(".", 1)[-1].lower()
        order = cfg.modalities.extensions[modality]
        if modality not in found or order.index(ext) < order.index(found[modality][0]):
            found[modality] = (ext, value)
    return found


def decode_sample(sample: Mapping[str, Any], cfg: PipelineConfig, tokenizer: Any = None) -> DecodedSample:
    """Decode every enabled modality of one webdataset sample and pick its bucket; raises ``DecodeError``."""
    from imp_platform.data.synth import DIRECTIONS

    key = str(sample.get("__key__", ""))
    check_member_name(key)
    members = split_members(sample, cfg)
    info = probe_video(members["video"][1], cfg.limits) if "video" in members else None
    audio_from_video = "audio" not in members and info is not None and info.has_audio and cfg.modalities.audio_from_video
    missing = [m for m in cfg.modalities.required if m not in members and not (m == "audio" and audio_from_video)]
    if missing:
        raise MissingModality(f"sample {key!r} has no {', '.join(missing)} member (has {sorted(members)})")

    row: dict[str, Any] = {"key": key, "label": -1, "direction": -1, "caption": ""}
    shapes: dict[str, list[int]] = {}
    policy = cfg.bucket_policy.duration
    if info is not None and "video" in cfg.modalities.enabled:
        data = members["video"][1]
        size = buckets.pick_video_bucket(info.height, info.width, info.duration_s, cfg.video.buckets,
                                         cfg.video.fps or info.fps or 1.0, policy)
        row["video"] = decode_video(data, size, cfg.video.fps, info=info, num_threads=cfg.decode.num_threads)
    if "audio" in cfg.modalities.enabled and ("audio" in members or audio_from_video):
        ext, data = members.get("audio") or members["video"]
        wave, rate = decode_audio(data, ext, cfg.limits)
        duration = wave.size / rate
        clip = cfg.audio.clip_seconds[buckets.pick_duration(duration, cfg.audio.clip_seconds, policy)]
        row.update(audio_features(wave, rate, cfg.audio, clip))
    if "text" in members:
        if tokenizer is None:
            raise ValueError("decode_sample needs a tokenizer when the text modality is enabled")
        caption, meta = decode_text(members["text"][1], members["text"][0], cfg.text.caption_key)
        ids, mask = tokenize(caption, tokenizer, cfg.text.max_tokens)
        length = buckets.pick_text_length(int(mask.sum()), cfg.text.length_buckets)
        row.update(caption=caption, text_ids=ids[:length], text_mask=mask[:length])
        if isinstance(meta.get("label"), int):
            row["label"] = meta["label"]
        if meta.get("direction") in DIRECTIONS:
            row["direction"] = DIRECTIONS.index(meta["direction"])
    if "image" in members:
        data = members["image"][1]
        height, width = probe_image(data, cfg.limits)
        row["image"] = decode_image(data, buckets.pick_image_bucket(height, width, cfg.image.buckets), cfg.limits)
    for column in ("video", "image", "audio_mel", "audio_wave", "text_ids"):
        if column in row:
            shapes[column] = list(row[column].shape)
    if not shapes:
        raise MissingModality(f"sample {key!r} has no member of an enabled modality")
    return DecodedSample(key=key, bucket=buckets.bucket_name(shapes), shapes=shapes, row=row)
