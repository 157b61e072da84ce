"""Pure decode functions: tar-member bytes -> numpy arrays, and the typed errors for bad input.

Every failure is a ``DecodeError`` subclass with a stable ``kind`` so the pipeline can skip
and count a sample instead of crashing. Decoders touch only what the clip needs: headers are
checked before any frame is decoded, decord resizes at decode and reads only the sampled
frame indices, and every reader/container is closed explicitly (decord and PyAV both leak
otherwise).

Real corpora (issue 13 §1): a sample may hold several candidates of one modality (``x.mp4``
and ``x.webm``); they are tried in the configured extension order and the sample is skipped
only when none decodes. Work is capped by the headers and by ``limits``: audio decodes only
the centred window it keeps (soundfile seeks, PyAV seeks and stops), a video whose header
gives no frame count decodes at most ``UNCOUNTED_FRAME_CAP`` frames, absurd sample rates and
channel counts are refused from the header, and ``time_limit`` bounds a whole sample.

Whole samples: each source of the modality registry (``imp_platform.data.modalities``) is decoded by
its chain of small named ops (``OPS``, added with ``@decode_op``), so a new modality adds an
entry and, when no op fits, one op, without touching ``decode_sample``.

Truncated video rule: a video cut short is kept when the frames it yields are real decoded
frames. The clip samples the frames that exist (the last decoded frame repeats where the
header promised more); a container that cannot be opened or yields no frame is
``corrupt_video``.

Label and metadata contract: a json member's ``dataset.label_key`` may be the class index or
the class name (validated against ``dataset.classes`` when declared; without classes an int
>= 0 that fits int64 is kept as is); ``caption`` may be a string or a list of strings (the
first non-empty one is tokenized, and up to ``text.max_captions`` of them as MIL-NCE
positives: ``data.captions``); every other json field passes through as the JSON string
column ``meta`` (with ``captions``: the whole list, when the caption was a list).
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from imp_platform.config.pipeline import AudioConfig, DatasetConfig, LimitsConfig, PipelineConfig
from imp_platform.data import buckets, captions, modalities

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


class AbsurdAudio(_KindError):
    """An audio header with a sample rate or channel count no real recording has."""

    kind = "absurd_audio"


class BadLabel(_KindError):
    """A label that is neither a class index nor a class name (a float, a bool, a list...)."""

    kind = "bad_label"


class LabelOutOfRange(_KindError):
    """A class index below 0, not below the number of classes, or not fitting int64."""

    kind = "label_out_of_range"


class UnknownLabel(_KindError):
    """A label name that is not among the declared classes (or no classes are declared)."""

    kind = "unknown_label"


class EmptyCaption(_KindError):
    """No non-empty caption where text is required."""

    kind = "empty_caption"


class SampleTimeout(_KindError):
    """A sample whose decode ran past ``limits.sample_timeout_s``."""

    kind = "sample_timeout"

    def __init__(self, message: str = "decoding ran past limits.sample_timeout_s") -> None:
        super().__init__(message)  # no required argument: the watchdog raises the class itself


ERROR_KINDS: tuple[str, ...] = tuple(cls.kind for cls in _KindError.__subclasses__())


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ``SampleTimeout`` in this thread if the body runs longer than ``seconds``.

    Works in any thread: Ray Data runs an actor's UDF off the main thread, where ``SIGALRM``
    cannot be used, so a watchdog timer raises the exception asynchronously in the decoding
    thread. It lands at the next Python bytecode, so it interrupts decode loops (PyAV's frame
    loop) but not one C call that never returns. The lock makes sure the exception is never
    raised once the body is over.
    """
    if not seconds:
        yield
        return
    thread, lock, running = threading.get_ident(), threading.Lock(), [True]

    def expire() -> None:
        with lock:
            if running[0]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(SampleTimeout))

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            running[0] = False
        timer.cancel()


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


# Frames a clip is sampled from at most when the header gives no frame count (a raw stream, a
# live recording without duration): the packets are counted up to this cap without decoding,
# and the clip is spread over those frames; the rest of the stream is never decoded.
UNCOUNTED_FRAME_CAP = 512


def _count_frames(data: bytes, cap: int) -> int:
    """Video packets (one per frame) up to ``cap``, demuxed only: nothing is decoded."""
    container = _open_container(data, CorruptVideo, "container")
    try:
        stream = container.streams.video[0]
        count = 0
        for packet in container.demux(stream):
            count += bool(packet.size)
            if count >= cap:
                break
        return count
    finally:
        container.close()


def _decode_pyav(data: bytes, size: tuple[int, int, int], fps: float | None, info: VideoInfo,
                 max_frames: int = UNCOUNTED_FRAME_CAP) -> np.ndarray:
    """Sequential decode for what decord rejects; only the sampled frames are converted and kept."""
    t, h, w = size
    count = info.num_frames if info.num_frames > 0 else _count_frames(data, max_frames)
    indices = sample_indices(count, info.fps, t, fps).tolist()
    wanted, last = set(indices), max(indices)
    kept: dict[int, np.ndarray] = {}
    container = _open_container(data, CorruptVideo, "container")
    try:
        stream = container.streams.video[0]
        stream.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
            if i >= last:
                break
    finally:
        container.close()
    if not kept:
        raise CorruptVideo("no decodable frames")
    decoded = sorted(kept)  # the header may promise more frames than the stream holds: clamp to the last one
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
# What a real recording can have; a header beyond this is forged or broken (``absurd_audio``).
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64


@dataclass(frozen=True)
class AudioClip:
    """Mono float32 samples (the centred window asked for, or all), their rate, and the whole track's duration."""

    wave: np.ndarray
    rate: int
    duration_s: float


def _check_header(rate: int, channels: int, seconds: float | None, limits: LimitsConfig) -> None:
    """Refuse, before any sample is decoded, rates/channel counts no recording has and absurd durations."""
    if not 0 < rate <= MAX_SAMPLE_RATE:
        raise AbsurdAudio(f"sample rate {rate} Hz is outside (0, {MAX_SAMPLE_RATE}]")
    if not 0 < channels <= MAX_CHANNELS:
        raise AbsurdAudio(f"{channels} channels is outside [1, {MAX_CHANNELS}]")
    if seconds is not None and seconds > limits.max_duration_s:
        raise AbsurdDuration(f"audio of {seconds:.1f}s exceeds limits.max_duration_s={limits.max_duration_s}")


def _window(seconds: float | None, max_seconds: float | None) -> tuple[float, float | None]:
    """(start, length) in seconds of the centred window to decode; length None = to the end."""
    if max_seconds is None or seconds is None or seconds <= max_seconds:
        return 0.0, max_seconds
    return (seconds - max_seconds) / 2, max_seconds


def _soundfile_audio(data: bytes, ext: str, limits: LimitsConfig, max_seconds: float | None) -> AudioClip:
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            rate, channels = int(sound.samplerate), int(sound.channels)
            _check_header(rate, channels, sound.frames / rate if rate > 0 else None, limits)
            duration = sound.frames / rate
            start, length = _window(duration, max_seconds)
            if start:
                sound.seek(int(start * rate))
            wave = sound.read(-1 if length is None else int(np.ceil(length * rate)), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise CorruptAudio(f"cannot read {ext} ({exc})") from None
    return AudioClip(wave.mean(axis=1), rate, duration)


def _pyav_audio(data: bytes, limits: LimitsConfig, max_seconds: float | None) -> AudioClip:
    """PyAV decode of the centred window: seek to its start when the header gives a duration, stop once it is full."""
    import av

    container = _open_container(data, CorruptAudio, "audio container")
    try:
        if not container.streams.audio:
            raise EmptyAudio("no audio track")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        rate = int(stream.rate or ctx.sample_rate or 0)
        duration = container.duration / 1e6 if container.duration else None
        _check_header(rate, ctx.layout.nb_channels, duration, limits)
        start, length = _window(duration, max_seconds)
        # Without a header duration nothing past the duration limit is decoded.
        wanted = int(np.ceil((length or limits.max_duration_s) * rate))
        if start:
            container.seek(int(start / stream.time_base), stream=stream)
        resampler = av.AudioResampler(format="fltp")  # planar float, native layout and rate
        chunks, have = [], 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().mean(axis=0))
                have += chunks[-1].size
            if have >= wanted:
                break
    except av.FFmpegError as exc:
        raise CorruptAudio(f"cannot decode audio track ({exc})") from None
    finally:
        container.close()
    if not chunks:
        raise EmptyAudio("audio track has no samples")
    wave = np.concatenate(chunks)[:wanted]
    return AudioClip(wave, rate, duration if duration is not None else wave.size / rate)


def decode_audio(data: bytes, ext: str, limits: LimitsConfig | None = None, max_seconds: float | None = None) -> AudioClip:
    """Audio bytes (or a video with an audio track) -> mono float32 at the native rate.

    wav/flac/ogg go through soundfile, everything else (mp3, opus, m4a, a video's soundtrack)
    through PyAV. Only the centred ``max_seconds`` window is decoded (all when None); the
    header's rate, channels and duration are checked against ``limits`` first.
    """
    limits = limits or LimitsConfig()
    ext = ext.lower().lstrip(".")
    if not data:
        raise EmptyAudio("zero-length audio member")
    clip = _soundfile_audio(data, ext, limits, max_seconds) if ext in _SOUNDFILE_EXTS else _pyav_audio(data, limits, max_seconds)
    mono = np.asarray(clip.wave, dtype=np.float32)
    if mono.size == 0:
        raise EmptyAudio("audio has no samples")
    if not np.isfinite(mono).all():
        raise NanAudio(f"{int((~np.isfinite(mono)).sum())} of {mono.size} samples are NaN/inf")
    return AudioClip(mono, clip.rate, clip.duration_s)


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


INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Annotation:
    """What a caption member says: its captions (stripped, in order), whether they came as a list, and the json fields."""

    captions: list[str]
    fields: dict[str, Any]
    caption_list: bool = False

    @property
    def caption(self) -> str:
        """The first non-empty caption ('' when there is none): the one tokenized."""
        return next((c for c in self.captions if c), "")


def decode_text(data: bytes | str | Mapping[str, Any], ext: str, caption_key: str = "caption") -> Annotation:
    """Caption member -> its annotation. Strict UTF-8; json needs ``caption_key`` (a string or a list of strings); txt is the caption."""
    if isinstance(data, Mapping):
        fields = dict(data)
    else:
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadTextEncoding(f"caption is not UTF-8 ({exc})") from None
        if ext.lower().lstrip(".") != "json":
            return Annotation([data.strip()], {})
        try:
            fields = json.loads(data)
        except json.JSONDecodeError as exc:
            raise CorruptText(f"caption json does not parse ({exc})") from None
        if not isinstance(fields, dict):
            raise CorruptText(f"caption json is a {type(fields).__name__}, not an object")
    caption = fields.get(caption_key)
    if isinstance(caption, str):
        return Annotation([caption.strip()], fields)
    if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
        return Annotation([c.strip() for c in caption], fields, caption_list=True)
    raise CorruptText(f"caption json has no string (or list of strings) {caption_key!r}")


@functools.lru_cache(maxsize=8)
def _class_index(classes: tuple[str, ...] | str | None) -> dict[str, int] | None:
    names = DatasetConfig(classes=list(classes) if isinstance(classes, tuple) else classes).class_names()
    return None if names is None else {name: i for i, name in enumerate(names)}


def class_index(dataset: DatasetConfig) -> dict[str, int] | None:
    """Class name -> label id of the declared classes (None when none are), read once per process."""
    classes = dataset.classes
    return _class_index(tuple(classes) if isinstance(classes, list) else classes)


def label_id(value: Any, classes: Mapping[str, int] | None) -> int:
    """A json label (class index or class name; None = unlabelled) -> label id, -1 for none.

    With classes declared an index must be one of theirs and a name among them; without, an
    int >= 0 that fits int64 is kept as is and a name cannot be resolved.
    """
    if value is None:
        return -1
    if isinstance(value, str):
        if classes is None:
            raise UnknownLabel(f"label name {value!r} but the dataset declares no classes")
        if value not in classes:
            raise UnknownLabel(f"label {value!r} is not among the {len(classes)} classes")
        return classes[value]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadLabel(f"label {value!r} is a {type(value).__name__}, not a class index or name")
    bound = INT64_MAX if classes is None else len(classes) - 1
    if not 0 <= value <= bound:
        what = "int64" if classes is None else f"the {len(classes)} classes"
        raise LabelOutOfRange(f"label {value} does not fit {what}")
    return value


def metadata(annotation: Annotation, caption_key: str, label_key: str) -> str:
    """The ``meta`` column: every json field but the caption and the label, as JSON (``captions`` = the list, when it was one)."""
    meta = {k: v for k, v in annotation.fields.items() if k not in (caption_key, label_key)}
    if annotation.caption_list:
        meta["captions"] = [c for c in annotation.captions if c]
    return json.dumps(meta, ensure_ascii=False, sort_keys=True)


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
    return decode_images(data, [size], limits)[0]


def decode_images(data: bytes, sizes: list[tuple[int, int]], limits: LimitsConfig | None = None) -> list[np.ndarray]:
    """Image bytes decoded once -> uint8 [H, W, 3] RGB at each (H, W) of ``sizes`` (bilinear)."""
    from PIL import Image, UnidentifiedImageError

    probe_image(data, limits)
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
            return [np.asarray(rgb.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
                    for height, width in sizes]
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


Candidates = list[tuple[str, Any]]  # (extension, member value) in the configured preference order


def split_members(sample: Mapping[str, Any], cfg: PipelineConfig) -> dict[str, Candidates]:
    """Webdataset row (``__key__`` + extension -> value) -> source (``modalities.SOURCES``) -> its
    members, first listed extension first.

    A source's members are read when it is enabled, when it is always read (text: its json carries
    the label and metadata even when captions are not tokenized), or when they may carry the
    soundtrack that ``modalities.audio_from_video`` asks for.
    """
    found: dict[str, Candidates] = {}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        check_member_name(name)
        ext = name.rsplit(".", 1)[-1].lower()
        source = cfg.modalities.modality_of(ext)
        if source is not None and _wanted(modalities.SOURCES[source], cfg):
            found.setdefault(source, []).append((ext, value))
    for source, candidates in found.items():
        order = cfg.modalities.extensions[source]
        candidates.sort(key=lambda c: order.index(c[0]))
    return found


def _wanted(source: modalities.Source, cfg: PipelineConfig) -> bool:
    return (source.name in cfg.modalities.enabled or source.always_read
            or (source.feeds is not None and cfg.modalities.audio_from_video))


def first_decodable(candidates: Candidates, decode_one: Callable[[str, Any], Any]) -> Any:
    """``decode_one`` of the first candidate that decodes; the first candidate's error when none does."""
    errors: list[DecodeError] = []
    for ext, value in candidates:
        try:
            return decode_one(ext, value)
        except DecodeError as exc:
            errors.append(exc)
    raise errors[0]


def resize_clip(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, height, width, 3], antialiased: a smaller bucket from a clip decoded once."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def decode_clips(data: bytes, sizes: list[tuple[int, int, int]], cfg: PipelineConfig, info: VideoInfo) -> list[np.ndarray]:
    """The clip at each (T, H, W) of ``sizes``, decoding the video once per distinct T.

    A T decoded for one size only is resized at decode (as a single bucket always was); for
    several, it is decoded at the largest H and W among them and resized down, never up.
    """
    by_frames: dict[int, np.ndarray] = {}
    for t in dict.fromkeys(s[0] for s in sizes):
        same_t = [s for s in sizes if s[0] == t]
        size = (t, max(s[1] for s in same_t), max(s[2] for s in same_t))
        by_frames[t] = decode_video(data, size, cfg.video.fps, info=info, num_threads=cfg.decode.num_threads)
    return [by_frames[t] if by_frames[t].shape[1:3] == (h, w) else resize_clip(by_frames[t], h, w) for t, h, w in sizes]


def _text(annotation: Annotation, cfg: PipelineConfig, tokenizer: Any) -> dict[str, np.ndarray]:
    """Tokenize the first non-empty caption into its length bucket; none where text is required is ``empty_caption``.

    With ``text.max_captions`` K > 1, the first K non-empty captions also become ``captions_ids`` /
    ``captions_mask`` [K, L], L the length bucket that holds the longest of them (``data.captions``).
    """
    kept = [c for c in annotation.captions if c][: cfg.text.max_captions]
    if not kept:
        if "text" in cfg.modalities.required:
            raise EmptyCaption("every caption is empty")
        return {}
    if tokenizer is None:
        raise ValueError("decode_sample needs a tokenizer when the text modality is enabled")
    tokens = [tokenize(c, tokenizer, cfg.text.max_tokens) for c in kept]
    length = buckets.pick_text_length(max(int(mask.sum()) for _, mask in tokens), cfg.text.length_buckets)
    tokens = [(ids[:length], mask[:length]) for ids, mask in tokens]
    row = {"text_ids": tokens[0][0], "text_mask": tokens[0][1]}
    if cfg.text.max_captions > 1:
        row[captions.IDS], row[captions.MASK] = captions.pack_captions(tokens, cfg.text.max_captions)
    return row


# ---------------------------------------------------------------- decode ops (composed per source)


@dataclass
class SampleState:
    """What one sample's decode ops share: its config and tokenizer, the members still to decode
    (an op may add candidates for a later source), and what was decoded so far."""

    key: str
    cfg: PipelineConfig
    tokenizer: Any
    members: dict[str, Candidates]
    row: dict[str, Any]  # columns every row of the sample shares
    views: dict[str, list[np.ndarray]] = field(default_factory=dict)  # column -> one array per resolution
    decoded: set[str] = field(default_factory=set)  # sources that gave a member


# What an op sees and returns: "source", "ext", "data" of one member, plus what earlier ops of the
# chain added. A finished chain commits "row" (shared columns), "views" (column -> arrays, one row
# each) and "members" (source -> candidates for a later source).
Member = dict[str, Any]
DecodeOp = Callable[[Member, SampleState], Member]
OPS: dict[str, DecodeOp] = {}


def decode_op(name: str) -> Callable[[DecodeOp], DecodeOp]:
    """Register a decode op under ``name`` for ``Source.decode`` chains (big_vision's ``pp`` registry)."""

    def register(op: DecodeOp) -> DecodeOp:
        if name in OPS:
            raise ValueError(f"decode op {name!r} is already registered")
        OPS[name] = op
        return op

    return register


def _enabled(member: Member, state: SampleState) -> bool:
    return member["source"] in state.cfg.modalities.enabled


@decode_op("annotation")
def _annotation(member: Member, state: SampleState) -> Member:
    """Caption member -> label (checked against the classes), caption and metadata."""
    cfg = state.cfg
    annotation = decode_text(member["data"], member["ext"], cfg.text.caption_key)
    row = {"label": label_id(annotation.fields.get(cfg.dataset.label_key), class_index(cfg.dataset)),
           "caption": annotation.caption, "meta": metadata(annotation, cfg.text.caption_key, cfg.dataset.label_key)}
    return {**member, "annotation": annotation, "row": row}


@decode_op("tokenize")
def _tokenize(member: Member, state: SampleState) -> Member:
    """The annotation's captions -> token columns, when text is enabled."""
    if not _enabled(member, state):
        return member
    return {**member, "row": {**member["row"], **_text(member["annotation"], state.cfg, state.tokenizer)}}


@decode_op("probe_video")
def _probe_video(member: Member, state: SampleState) -> Member:
    """Header checks; a soundtrack becomes the fed source's candidate (``modalities.audio_from_video``)."""
    cfg = state.cfg
    info = probe_video(member["data"], cfg.limits)
    feeds = modalities.SOURCES[member["source"]].feeds
    out = {**member, "info": info}
    if feeds is not None and info.has_audio and cfg.modalities.audio_from_video and feeds in cfg.modalities.enabled:
        out["members"] = {feeds: [(member["ext"], member["data"])]}
    return out


@decode_op("video_clips")
def _video_clips(member: Member, state: SampleState) -> Member:
    """The clip at every bucket ``video.resolutions`` picks, when video is enabled."""
    if not _enabled(member, state):
        return member
    cfg, info = state.cfg, member["info"]
    sizes = buckets.pick_video_buckets(info.height, info.width, info.duration_s, cfg.video.buckets,
                                       cfg.video.fps or info.fps or 1.0, cfg.bucket_policy.duration, cfg.video.resolutions)
    return {**member, "views": {member["source"]: decode_clips(member["data"], sizes, cfg, info)}}


@decode_op("audio_features")
def _audio_features(member: Member, state: SampleState) -> Member:
    """Decode the centred window of the longest clip bucket, then crop it to the bucket its duration picks."""
    audio, policy = state.cfg.audio, state.cfg.bucket_policy.duration
    clip = decode_audio(member["data"], member["ext"], state.cfg.limits, max_seconds=max(audio.clip_seconds))
    seconds = audio.clip_seconds[buckets.pick_duration(clip.duration_s, audio.clip_seconds, policy)]
    return {**member, "row": audio_features(clip.wave, clip.rate, audio, seconds)}


@decode_op("image_views")
def _image_views(member: Member, state: SampleState) -> Member:
    """One image at every bucket ``image.resolutions`` picks for its native size, in the source's column."""
    cfg = state.cfg
    sizes = buckets.pick_image_buckets(*probe_image(member["data"], cfg.limits), cfg.image.buckets, cfg.image.resolutions)
    return {**member, "views": {member["source"]: decode_images(member["data"], sizes, cfg.limits)}}


def _compose(source: modalities.Source, ext: str, data: Any, state: SampleState) -> Member:
    """Run a source's ops in order on one member; nothing is committed unless all of them succeed."""
    member: Member = {"source": source.name, "ext": ext, "data": data}
    for name in source.decode:
        if name not in OPS:
            raise ValueError(f"source {source.name!r}: no decode op {name!r} (registered: {sorted(OPS)})")
        member = OPS[name](member, state)
    return member


def _commit(member: Member, state: SampleState) -> None:
    state.row.update(member.get("row", {}))
    state.views.update(member.get("views", {}))
    for source, candidates in member.get("members", {}).items():
        state.members.setdefault(source, candidates)
    state.decoded.add(member["source"])


# ---------------------------------------------------------------- whole sample


def _check_required(state: SampleState, present: set[str], members: list[str]) -> None:
    missing = [m for m in state.cfg.modalities.required if m not in present]
    if missing:
        raise MissingModality(f"sample {state.key!r} has no {', '.join(missing)} member (has {members})")


def decode_sample(sample: Mapping[str, Any], cfg: PipelineConfig, tokenizer: Any = None) -> list[DecodedSample]:
    """Decode every enabled source of one webdataset sample into one row per bucket it goes to; raises ``DecodeError``.

    Sources are decoded in registry order (text first: the label is checked before any media),
    each by its composed ops on the first member that decodes. A sample lacking a required
    member is skipped before anything is decoded (one that may come from a video's soundtrack
    is checked once the video is probed). One row, unless ``video.resolutions`` /
    ``image.resolutions`` write the clip or image at several resolutions: then one row per
    resolution (``_views``), the other columns the same in each. A row: key, label (int64,
    -1 = none), caption (the tokenized one, '' = none), meta (JSON string of the other json
    fields), and one array per decoded tensor column.
    """
    key = str(sample.get("__key__", ""))
    check_member_name(key)
    members = split_members(sample, cfg)
    names = sorted(members)
    state = SampleState(key, cfg, tokenizer, members, {"key": key, "label": -1, "caption": "", "meta": "{}"})
    fed = {s.feeds for s in modalities.SOURCES.values() if s.name in members and s.feeds and cfg.modalities.audio_from_video}
    _check_required(state, {*members, *fed}, names)
    for source in modalities.SOURCES.values():
        if source.name in state.members:
            _commit(first_decodable(state.members[source.name], functools.partial(_compose, source, state=state)), state)
    _check_required(state, state.decoded, names)
    return [_bucketed(key, r) for r in _views(state.row, state.views)]


def _views(row: dict[str, Any], views: Mapping[str, list[np.ndarray]]) -> list[dict[str, Any]]:
    """A sample's rows: row i holds the i-th resolution of every viewed column (the nearest, first,
    where one has fewer), so each resolution is written once without a cross product."""
    rows = [dict(row) for _ in range(max([1, *(len(a) for a in views.values())]))]
    for column, arrays in views.items():
        for i, view in enumerate(rows):
            if arrays:
                view[column] = arrays[i] if i < len(arrays) else arrays[0]
    return rows


def _bucketed(key: str, row: dict[str, Any]) -> DecodedSample:
    """A decoded row with its bucket, named by the shapes of its tensor columns."""
    shapes = {c: list(row[c].shape) for c in modalities.token_columns() if c in row}
    if not shapes:
        raise MissingModality(f"sample {key!r} has no member of an enabled modality")
    return DecodedSample(key=key, bucket=buckets.bucket_name(shapes), shapes=shapes, row=row)
