"""Typed pipeline spec: where raw shards live, how each modality is decoded, and the shape buckets.

One YAML (``pipelines/*.yaml``) drives both the offline preprocess and the streaming path, so
decode settings and bucket shapes can never drift between the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from imp_platform.config.base import StrictModel, load_config
from imp_platform.data import modalities as registry


def _known_source(name: str) -> str:
    if name not in registry.SOURCES:
        raise ValueError(f"unknown modality {name!r}; expected one of {tuple(registry.SOURCES)}")
    return name


# A raw-member modality (``modalities.SOURCES``: video, audio, text, image, or a registered one).
Modality = Annotated[str, AfterValidator(_known_source)]

EMBEDDED_PIPELINE = Path(__file__).resolve().parents[3] / "pipelines" / "moving_digits.yaml"


def _positive(values: list[int] | tuple[int, ...], what: str) -> None:
    if any(v <= 0 for v in values):
        raise ValueError(f"{what} must be positive, got {list(values)}")


class SourceConfig(StrictModel):
    """Raw webdataset shards: local paths, folders or globs, or ``s3://bucket/prefix`` URLs."""

    paths: list[str] = Field(min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class OutputConfig(StrictModel):
    """Where the bucketed dataset and ``manifest.json`` go (local path or ``s3://``)."""

    path: str
    storage_options: dict[str, Any] = Field(default_factory=dict)


class ModalitiesConfig(StrictModel):
    """Which modalities to decode, which a sample must have, and which tar extensions mean what."""

    enabled: list[Modality] = Field(default_factory=lambda: list(registry.SOURCES), min_length=1)
    required: list[Modality] = Field(default_factory=list)
    extensions: dict[Modality, list[str]] = Field(default_factory=registry.default_extensions)
    audio_from_video: bool = False  # use the video's own audio track when no audio member exists

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        merged = registry.default_extensions()
        owner: dict[str, str] = {}
        for modality, exts in value.items():
            merged[modality] = [e.lower().lstrip(".") for e in exts]
        for modality, exts in merged.items():
            for ext in exts:
                if not ext or "/" in ext:
                    raise ValueError(f"extensions.{modality}: bad extension {ext!r}")
                if ext in owner and owner[ext] != modality:
                    raise ValueError(f"extension {ext!r} is listed under both {owner[ext]} and {modality}")
                owner[ext] = modality
        return merged

    @model_validator(mode="after")
    def _required_are_enabled(self) -> ModalitiesConfig:
        missing = [m for m in self.required if m not in self.enabled]
        if missing:
            raise ValueError(f"required modalities {missing} are not in enabled {self.enabled}")
        return self

    def modality_of(self, extension: str) -> str | None:
        """Map a tar member extension (``mp4``, ``JSON``) to its modality, or None if not ours."""
        ext = extension.lower().lstrip(".")
        return next((m for m, exts in self.extensions.items() if ext in exts), None)


class VideoConfig(StrictModel):
    """Clip sampling and the (T, H, W) buckets: T frames are sampled at ``fps`` and resized to H x W at decode.

    ``resolutions`` says which buckets one clip is written into, so training sees the same clip
    at several spatial and temporal resolutions (IMP's multi-resolution): ``nearest`` one bucket
    by native shape; ``all_fitting`` every bucket at the nearest aspect ratio whose area is not
    above the native one (no upscaling), and at least the nearest; or a list of buckets, all of them.
    """

    fps: float | None = Field(8.0, gt=0)  # sampling rate; None spreads the T frames over the whole clip
    buckets: list[tuple[int, int, int]] = Field(min_length=1)
    resolutions: Literal["nearest", "all_fitting"] | list[tuple[int, int, int]] = "nearest"

    @field_validator("buckets")
    @classmethod
    def _check_buckets(cls, value: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        for i, bucket in enumerate(value):
            _positive(bucket, f"video.buckets[{i}]")
        if len(set(value)) != len(value):
            raise ValueError(f"video.buckets has duplicates: {value}")
        return value

    @model_validator(mode="after")
    def _resolutions_are_buckets(self) -> VideoConfig:
        _check_resolutions(self.resolutions, self.buckets, "video")
        return self


def _check_resolutions(resolutions: str | list[tuple[int, ...]], buckets: list[tuple[int, ...]], section: str) -> None:
    """A ``resolutions`` list must name distinct buckets of its section, at least one."""
    if isinstance(resolutions, list):
        if not resolutions:
            raise ValueError(f"{section}.resolutions: an empty list writes no {section}; use nearest")
        for i, size in enumerate(resolutions):
            if size not in buckets:
                raise ValueError(f"{section}.resolutions[{i}]={list(size)} is not one of {section}.buckets")
        if len(set(resolutions)) != len(resolutions):
            raise ValueError(f"{section}.resolutions has duplicates: {resolutions}")


class AudioConfig(StrictModel):
    """16 kHz log-mel (and optionally raw waveform), cropped or padded to a clip-length bucket."""

    sample_rate: int = Field(16000, gt=0)
    n_mels: int = Field(128, gt=0)
    n_fft: int = Field(1024, gt=0)
    hop_length: int = Field(160, gt=0)
    clip_seconds: list[float] = Field(default_factory=lambda: [1.0, 2.0], min_length=1)
    waveform: bool = False

    @field_validator("clip_seconds")
    @classmethod
    def _check_clips(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value):
            raise ValueError(f"audio.clip_seconds must be positive, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"audio.clip_seconds has duplicates: {value}")
        return sorted(value)

    def clip_samples(self, seconds: float) -> int:
        return int(round(seconds * self.sample_rate))

    def mel_frames(self, seconds: float) -> int:
        """Mel frames of one clip (the centred STFT's trailing frame is dropped so 1 s -> sr/hop)."""
        return self.clip_samples(seconds) // self.hop_length


class TextConfig(StrictModel):
    """Caption tokenisation; ``tokenizer`` None means ``tokenizer.json`` beside the shards or one level up.

    ``max_captions`` > 1 keeps up to that many of a sample's captions (a json ``caption`` list) as
    the ``captions_ids`` / ``captions_mask`` [K, L] columns: MIL-NCE's positives, and the pool NCE
    draws one caption from per step. ``text_ids`` stays the first caption.
    """

    tokenizer: str | None = None
    caption_key: str = "caption"
    length_buckets: list[int] = Field(default_factory=lambda: [16], min_length=1)
    max_captions: int = Field(1, ge=1)

    @field_validator("length_buckets")
    @classmethod
    def _check_lengths(cls, value: list[int]) -> list[int]:
        _positive(value, "text.length_buckets")
        return sorted(set(value))

    @property
    def max_tokens(self) -> int:
        return self.length_buckets[-1]


class ImageConfig(StrictModel):
    """Still-image (H, W) buckets; images are resized to the bucket nearest in aspect ratio.

    ``resolutions`` writes one image into several buckets, as ``video.resolutions`` does for clips:
    ``nearest``, ``all_fitting`` (every bucket at the nearest aspect ratio not above the native
    area, and at least the nearest) or a list of buckets.
    """

    buckets: list[tuple[int, int]] = Field(min_length=1)
    resolutions: Literal["nearest", "all_fitting"] | list[tuple[int, int]] = "nearest"

    @field_validator("buckets")
    @classmethod
    def _check_buckets(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for i, bucket in enumerate(value):
            _positive(bucket, f"image.buckets[{i}]")
        return value

    @model_validator(mode="after")
    def _resolutions_are_buckets(self) -> ImageConfig:
        _check_resolutions(self.resolutions, self.buckets, "image")
        return self


class BucketPolicyConfig(StrictModel):
    """How a native shape picks its bucket: aspect ratio first, then duration."""

    aspect: Literal["nearest"] = "nearest"
    duration: Literal["nearest", "floor"] = "nearest"  # floor: longest clip not longer than the input


class PatchConfig(StrictModel):
    """Patch sizes used to count tokens per sample (they must match the model's embedders)."""

    video: tuple[int, int, int] = (2, 8, 8)
    image: tuple[int, int] = (8, 8)
    audio_mel: tuple[int, int] = (16, 16)
    audio_wave: int = 256

    @model_validator(mode="after")
    def _positive_patches(self) -> PatchConfig:
        _positive(self.video, "patches.video")
        _positive(self.image, "patches.image")
        _positive(self.audio_mel, "patches.audio_mel")
        _positive([self.audio_wave], "patches.audio_wave")
        return self


class LimitsConfig(StrictModel):
    """Refuse inputs whose headers promise absurd work, before decoding a frame."""

    max_side: int = Field(4096, gt=0)
    max_duration_s: float = Field(3600.0, gt=0)
    max_member_mb: float = Field(256.0, gt=0)  # a bigger tar member (sparse ones count expanded) is never read
    sample_timeout_s: float | None = Field(60.0, gt=0)  # per-sample decode time limit; None: unbounded


class DecodeConfig(StrictModel):
    """Decode stage sizing (Ray Data ``map_batches``) and how much the pipeline may hold in flight."""

    # tasks: plain Ray tasks on the pooled workers, which stay warm between runs (decoders imported
    # once per worker); actors: a pool started per run, each new process importing torch and the
    # decoders first (~10 s that only a large input wins back: the pool decodes faster in steady
    # state). auto: actors from ``actors_from_mb`` MiB of raw shards on. See data/pipeline.map_decode.
    # The default stays ``actors`` (the long-tested path) until ``auto`` has a record of its own;
    # the shipped pipelines/ opt in to ``auto``.
    compute: Literal["auto", "tasks", "actors"] = "actors"
    actors_from_mb: float = Field(256.0, ge=0)
    num_actors: int = Field(2, gt=0)  # decode concurrency: tasks at once, or actors in the pool
    batch_size: int = Field(16, gt=0)
    num_threads: int = Field(1, ge=0)  # decoder threads per decode task or actor; 1 when they are many
    # MiB of blocks the pipeline may keep in Ray's object store at once (raw shards read ahead,
    # decoded rows not yet written); Ray Data backpressures past it, so peak memory stays flat
    # however long the input. None: Ray Data's default share of the object store.
    object_store_mb: int | None = Field(None, ge=16)


class DatasetConfig(StrictModel):
    """What the corpus *means*: class names (index = label id) and zero-shot prompt templates.

    The pipeline copies this card into ``manifest.json`` so training, eval and inspection read
    a processed dataset's classes and prompts without the YAML. ``classes`` may be a list of
    names or the path of a text file (one name per line) or a JSON list, relative to the YAML.
    """

    classes: list[str] | str | None = None
    prompts: list[str] = Field(default_factory=lambda: ["{}"], min_length=1)  # "{}" = class name
    label_key: str = "label"  # json field holding the class (its index or its name)

    @field_validator("prompts")
    @classmethod
    def _prompts_name_the_class(cls, value: list[str]) -> list[str]:
        bad = [p for p in value if p.count("{}") != 1]
        if bad:
            raise ValueError(f"each prompt needs exactly one '{{}}' for the class name, got {bad}")
        return value

    def resolve_paths(self, base_dir: str | Path) -> None:
        """Make a relative ``classes`` file path absolute against the YAML's folder, so the
        pipeline means the same corpus whatever the working directory of the process reading it."""
        if isinstance(self.classes, str) and not Path(self.classes).is_absolute():
            self.classes = str((Path(base_dir) / self.classes).resolve())

    def class_names(self, base_dir: str | Path | None = None) -> list[str] | None:
        """The class names (a file path is read relative to ``base_dir``), or None when none are declared."""
        if self.classes is None or isinstance(self.classes, list):
            names = self.classes
        else:
            path = Path(self.classes)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.is_file():
                raise ValueError(f"dataset.classes: file not found: {path}")
            text = path.read_text(encoding="utf-8")
            names = json.loads(text) if path.suffix == ".json" else [ln.strip() for ln in text.splitlines() if ln.strip()]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"dataset.classes: {path} must hold a JSON list of strings")
        if names is not None and len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"dataset.classes has duplicate names {dupes}")
        return names


class PipelineConfig(StrictModel):
    """A whole pipeline: source -> decode -> bucket -> output (token budgets are per training task)."""

    name: str = "pipeline"
    source: SourceConfig
    output: OutputConfig
    modalities: ModalitiesConfig = Field(default_factory=ModalitiesConfig)
    video: VideoConfig | None = None
    audio: AudioConfig = Field(default_factory=AudioConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    image: ImageConfig | None = None
    bucket_policy: BucketPolicyConfig = Field(default_factory=BucketPolicyConfig)
    patches: PatchConfig = Field(default_factory=PatchConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        enabled = self.modalities.enabled
        for name in ("video", "image"):
            if name in enabled and getattr(self, name) is None:
                raise ValueError(f"modality {name!r} is enabled but the {name}: section (with buckets) is missing")
        if self.video is not None:
            pt, ph, pw = self.patches.video
            for i, (t, h, w) in enumerate(self.video.buckets):
                if t % pt or h % ph or w % pw:
                    raise ValueError(f"video.buckets[{i}]={[t, h, w]} is not divisible by patches.video={[pt, ph, pw]}")
        if self.image is not None:
            ph, pw = self.patches.image
            for i, (h, w) in enumerate(self.image.buckets):
                if h % ph or w % pw:
                    raise ValueError(f"image.buckets[{i}]={[h, w]} is not divisible by patches.image={[ph, pw]}")
        too_long = [s for s in self.audio.clip_seconds if s > self.limits.max_duration_s]
        if too_long:
            raise ValueError(f"audio.clip_seconds {too_long} exceed limits.max_duration_s={self.limits.max_duration_s}")
        return self


def load_pipeline(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline YAML (default: the embedded moving-digits pipeline) with ``--set`` overrides.

    A relative ``dataset.classes`` file is resolved against the YAML's folder.
    """
    path = Path(path or EMBEDDED_PIPELINE)
    cfg = load_config(PipelineConfig, path, overrides)
    cfg.dataset.resolve_paths(path.parent)
    return cfg
