"""The modality registry: what a modality is, in one table.

Two levels, because a webdataset member and an encoder input are not the same thing:

* a ``Source`` is a member group of a raw sample (``mp4``/``webm`` -> video, ``wav`` -> audio):
  its tar extensions in preference order, the named decode ops (``data.decode.OPS``) composed
  to turn one member into processed columns, and the column shapes its buckets can have;
* a ``Modality`` is an encoder input (``video``, ``image``, ``audio_mel``, ``audio_wave``,
  ``text``): the processed columns it reads, its bucket-name tag, how its sample shape maps
  to a token grid, its input stem (``model.embed.STEMS``) and the family whose projection
  heads it shares (zero-shot metrics are named by its source: ``zeroshot_audio_top1``).

Adding a modality is one ``register_source`` / ``register_modality`` call plus, when no
existing op fits, one decode op; bucketing, the processed schema, the embedders, the task
columns, the heads and eval read these tables. Registry order is the order of bucket-name
parts and of embedder construction, so processed data and checkpoints stay as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imp_platform.config.model import ModelConfig
    from imp_platform.config.pipeline import PatchConfig, PipelineConfig

ColumnSpec = tuple[str, list[int]]  # (dtype, per-sample shape) of one processed tensor column
Layouts = Callable[["PipelineConfig", str], list[dict[str, ColumnSpec]]]


@dataclass(frozen=True)
class Source:
    """A member group of a raw sample and how it is decoded into processed columns."""

    name: str
    extensions: tuple[str, ...]  # preference order: the first that decodes is kept
    decode: tuple[str, ...]  # decode op names (data.decode.OPS), composed in order on one member
    layouts: Layouts  # every column -> (dtype, shape) option its buckets can have under a config
    always_read: bool = False  # read even when not enabled (text json carries the label and metadata)
    feeds: str | None = None  # a source its members may also supply (a video's soundtrack: ``audio_from_video``)


@dataclass(frozen=True)
class Modality:
    """An encoder input: its processed columns, token grid, input stem and head family."""

    name: str
    source: str  # the Source whose decode writes its column
    column: str  # processed tensor column holding the input
    tag: str  # bucket-name tag of ``column``
    dtype: str  # stored dtype; uint8 pixels are scaled to [0, 1] before the stem
    input_shape: Callable[[ModelConfig], tuple[int | None, ...]]  # per-sample shape the stem takes (None = any)
    grid_axes: tuple[int, ...]  # token-grid axis (t, h, w) each patched sample dim fills
    model_patch: Callable[[ModelConfig], tuple[int, ...]]  # patch per patched dim, in the model
    data_patch: Callable[[PatchConfig], tuple[int, ...]]  # the same in the pipeline's token counting
    stem: str  # input layer kind (model.embed.STEMS): tubelets | patches | tokens
    embedder: str  # Embedders attribute (checkpoint parameter names); equal names share one layer
    type_id: int  # modality-type embedding row (shared where the embedder is)
    family: str  # projections and temperatures are keyed by it: vision | audio | text
    mask_column: str | None = None  # padding mask column (text)

    def grid(self, shape: tuple[int, ...] | list[int], patch: tuple[int, ...], ceil: bool = False) -> tuple[int, int, int]:
        """Token grid (t, h, w) of one sample of ``shape``: whole patches, or partial ones counted (``ceil``)."""
        grid = [1, 1, 1]
        for dim, (axis, size) in enumerate(zip(self.grid_axes, patch, strict=True)):
            grid[axis] = -(-int(shape[dim]) // size) if ceil else int(shape[dim]) // size
        return grid[0], grid[1], grid[2]

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,) if self.mask_column is None else (self.column, self.mask_column)


SOURCES: dict[str, Source] = {}
MODALITIES: dict[str, Modality] = {}


def register_source(source: Source) -> Source:
    """Add a member group; an extension belongs to one source only, so a member is never ambiguous."""
    if source.name in SOURCES:
        raise ValueError(f"source {source.name!r} is already registered")
    taken = {ext: s.name for s in SOURCES.values() for ext in s.extensions}
    clash = [ext for ext in source.extensions if ext in taken]
    if clash:
        raise ValueError(f"source {source.name!r}: extensions {clash} already belong to {taken[clash[0]]!r}")
    SOURCES[source.name] = source
    return source


def register_modality(modality: Modality) -> Modality:
    """Add an encoder input; its column and tag must be new, as bucket names and rows are keyed by them."""
    if modality.name in MODALITIES:
        raise ValueError(f"modality {modality.name!r} is already registered")
    if modality.source not in SOURCES:
        raise ValueError(f"modality {modality.name!r}: unknown source {modality.source!r}")
    taken = [m.name for m in MODALITIES.values() if m.column == modality.column or m.tag == modality.tag]
    if taken:
        raise ValueError(f"modality {modality.name!r}: column or tag already used by {taken[0]!r}")
    MODALITIES[modality.name] = modality
    return modality


def modality(name: str) -> Modality:
    """The registry entry of an encoder modality; a clear error for an unknown name."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; expected one of {tuple(MODALITIES)}") from None


def of_column(column: str) -> Modality | None:
    """The modality whose token column is ``column`` (None for masks and scalars)."""
    return next((m for m in MODALITIES.values() if m.column == column), None)


def present(columns: set[str] | frozenset[str]) -> tuple[str, ...]:
    """Encoder modalities (registry order) whose processed columns are all among ``columns``."""
    return tuple(m.name for m in MODALITIES.values() if all(c in columns for c in m.columns))


def families() -> tuple[str, ...]:
    """Head families in registry order (projections and temperatures are keyed by them)."""
    return tuple(dict.fromkeys(m.family for m in MODALITIES.values()))


def media() -> tuple[str, ...]:
    """Encoder modalities other than text, in registry order: what captions and zero-shot are made from."""
    return tuple(m.name for m in MODALITIES.values() if m.family != "text")


def token_columns() -> tuple[str, ...]:
    """Processed columns that become encoder tokens and name buckets, in naming order."""
    return tuple(m.column for m in MODALITIES.values())


def tensor_columns() -> tuple[str, ...]:
    """Every per-modality processed tensor column (inputs and masks)."""
    return tuple(c for m in MODALITIES.values() for c in m.columns)


def default_extensions() -> dict[str, list[str]]:
    return {s.name: list(s.extensions) for s in SOURCES.values()}


# ---------------------------------------------------------------- the built-in entries


def video_layouts(cfg: PipelineConfig, name: str) -> list[dict[str, ColumnSpec]]:
    """Clips in column ``name``, one option per ``video.buckets`` (T, H, W) entry."""
    return [{name: ("uint8", [t, h, w, 3])} for t, h, w in cfg.video.buckets] if cfg.video else []


def image_layouts(cfg: PipelineConfig, name: str) -> list[dict[str, ColumnSpec]]:
    """Pixels in column ``name``, one option per ``image.buckets`` (H, W) entry (any image-like source)."""
    return [{name: ("uint8", [h, w, 3])} for h, w in cfg.image.buckets] if cfg.image else []


def audio_layouts(cfg: PipelineConfig, name: str) -> list[dict[str, ColumnSpec]]:
    """Log-mel (and the waveform, when kept) per ``audio.clip_seconds`` entry."""
    audio = cfg.audio
    return [{"audio_mel": ("float32", [audio.mel_frames(s), audio.n_mels]),
             **({"audio_wave": ("float32", [audio.clip_samples(s)])} if audio.waveform else {})}
            for s in audio.clip_seconds]


def text_layouts(cfg: PipelineConfig, name: str) -> list[dict[str, ColumnSpec]]:
    """Token ids and mask (and the extra captions) per ``text.length_buckets`` entry."""
    from imp_platform.data.captions import IDS, MASK

    k = cfg.text.max_captions
    several = lambda n: {IDS: ("int32", [k, n]), MASK: ("bool", [k, n])} if k > 1 else {}  # noqa: E731
    return [{"text_ids": ("int32", [n]), "text_mask": ("bool", [n]), **several(n)} for n in cfg.text.length_buckets]


# Order: text first (the label is checked before any media is decoded), video before audio
# (a video member may supply the soundtrack).
register_source(Source("text", ("txt", "json"), ("annotation", "tokenize"), text_layouts, always_read=True))
register_source(Source("video", ("mp4", "webm", "mkv", "avi", "mov"), ("probe_video", "video_clips"), video_layouts,
                       feeds="audio"))
register_source(Source("audio", ("wav", "flac", "mp3", "ogg", "opus", "m4a"), ("audio_features",), audio_layouts))
register_source(Source("image", ("jpg", "png", "webp"), ("image_views",), image_layouts))

register_modality(Modality(
    "video", "video", "video", "v", "uint8", lambda c: (None, None, None, 3), (0, 1, 2),
    lambda c: tuple(c.video_patch), lambda p: tuple(p.video), "tubelets", "vision", 0, "vision"))
# An image runs through the video tubelets as a clip of video_patch[0] copies of itself (IMP).
register_modality(Modality(
    "image", "image", "image", "i", "uint8", lambda c: (None, None, 3), (1, 2),
    lambda c: tuple(c.video_patch[1:]), lambda p: tuple(p.image), "tubelets", "vision", 0, "vision"))
register_modality(Modality(
    "audio_mel", "audio", "audio_mel", "a", "float32", lambda c: (None, c.mel_bins), (0, 1),
    lambda c: tuple(c.audio_patch), lambda p: tuple(p.audio_mel), "patches", "audio_mel", 1, "audio"))
register_modality(Modality(
    "audio_wave", "audio", "audio_wave", "w", "float32", lambda c: (None,), (0,),
    lambda c: (c.wave_patch,), lambda p: (p.audio_wave,), "patches", "audio_wave", 2, "audio"))
register_modality(Modality(
    "text", "text", "text_ids", "t", "int32", lambda c: (None,), (0,),
    lambda c: (1,), lambda p: (1,), "tokens", "text", 3, "text", mask_column="text_mask"))
