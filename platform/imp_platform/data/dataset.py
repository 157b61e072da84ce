"""The declared dataset: class names, zero-shot prompts, and the caption tokenizer.

What a corpus *means* is data, not code: the pipeline YAML's ``dataset:`` section declares
the class names and prompt templates, preprocessing copies them into the processed split's
``manifest.json`` (the dataset card) and the tokenizer beside it, so training, eval and
inspection need nothing but the processed data. Processed data without a card (written
before cards existed) falls back to the run's pipeline YAML.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import numpy as np

from imp_platform.config import ConfigError
from imp_platform.config.pipeline import EMBEDDED_PIPELINE, DatasetConfig, PipelineConfig, load_pipeline
from imp_platform.data import manifest as manifest_io
from imp_platform.data.sources import filesystem, join

if TYPE_CHECKING:
    from imp_platform.config.train import PretrainConfig

log = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.json"
# Ids 0 and 1, in this order: decode.tokenize pads with 0, so [PAD] must be id 0.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]")
TEXT_EXTENSIONS: tuple[str, ...] = ("json", "txt")  # json first: it may carry a list of captions
TokenizerKind = Literal["wordpiece", "bpe"]


@dataclass(frozen=True)
class DatasetCard:
    """Class names (index = label id; None when the corpus declares none) and prompt templates."""

    classes: tuple[str, ...] | None
    prompts: tuple[str, ...] = ("{}",)

    @classmethod
    def from_config(cls, cfg: DatasetConfig) -> DatasetCard:
        """The card a pipeline YAML declares (load it with ``load_pipeline`` so a classes file resolves)."""
        names = cfg.class_names()
        return cls(None if names is None else tuple(names), tuple(cfg.prompts))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> DatasetCard | None:
        """The card a preprocess wrote into ``manifest.json``, or None when it has none."""
        card = manifest.get("dataset")
        if not isinstance(card, Mapping):
            return None
        classes = card.get("classes")
        return cls(None if classes is None else tuple(classes), tuple(card.get("prompts") or ("{}",)))

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def prompt_texts(self) -> tuple[list[str], np.ndarray]:
        """Every template filled with every class name, and the class id of each text."""
        if self.classes is None:
            raise ValueError("the dataset declares no classes, so it has no class prompts")
        texts = [p.replace("{}", name) for name in self.classes for p in self.prompts]
        return texts, np.repeat(np.arange(len(self.classes)), len(self.prompts))


def pipeline_of(cfg: PretrainConfig) -> PipelineConfig:
    """The run's pipeline YAML; a relative path missing from the working directory is read
    from the repository (Ray workers may run elsewhere)."""
    path = Path(cfg.data.pipeline)
    if not path.is_absolute() and not path.exists():
        path = EMBEDDED_PIPELINE.parents[1] / path
    return load_pipeline(path)


def read_manifest(cfg: PretrainConfig, split: str) -> dict[str, Any] | None:
    """The processed split's manifest, or None when it was not preprocessed yet."""
    try:
        url = join(cfg.data.processed_path(split), manifest_io.MANIFEST_NAME)
        return manifest_io.read(url, cfg.data.storage_options)
    except FileNotFoundError:
        return None


def load_card(cfg: PretrainConfig, split: str, manifest: Mapping[str, Any] | None = None) -> DatasetCard:
    """The card of a run's split: its manifest's, else the pipeline YAML's ``dataset:`` section,
    else (neither readable) a card without classes."""
    manifest = manifest if manifest is not None else read_manifest(cfg, split)
    card = DatasetCard.from_manifest(manifest) if manifest else None
    if card is not None:
        return card
    try:
        return DatasetCard.from_config(pipeline_of(cfg).dataset)
    except ConfigError as exc:
        log.warning("split %s has no dataset card and the pipeline YAML is unreadable (%s): no classes", split, exc)
        return DatasetCard(None)


def _tokenizer_candidates(cfg: PretrainConfig, split: str) -> Iterator[str]:
    """Where a run's tokenizer may be, best first (the pipeline YAML is read only if needed)."""
    if cfg.data.tokenizer:
        yield cfg.data.tokenizer
        return
    processed = cfg.data.processed_path(split).rstrip("/")
    yield join(processed, TOKENIZER_NAME)
    yield join(processed.rsplit("/", 1)[0], TOKENIZER_NAME)
    try:
        if tokenizer := pipeline_of(cfg).text.tokenizer:
            yield tokenizer
    except ConfigError:
        pass
    yield join(cfg.data.raw_root, TOKENIZER_NAME)


def read_tokenizer(cfg: PretrainConfig, split: str) -> str:
    """The run's tokenizer as JSON text: ``data.tokenizer`` if set, else the processed split's
    copy (in the split folder or its parent), the pipeline's ``text.tokenizer``, ``ROOT/raw``'s."""
    looked = []
    for url in _tokenizer_candidates(cfg, split):
        fs, path = filesystem(url, cfg.data.storage_options)
        if fs.exists(path):
            with fs.open(path, "r") as fh:
                return fh.read()
        looked.append(url)
    raise ConfigError(f"no tokenizer found (looked at {looked}); set data.tokenizer")


# ---------------------------------------------------------------- training a tokenizer


@dataclass
class CaptionStats:
    """What a pass over the shards found: captions yielded, samples without a usable caption."""

    shards: int = 0
    captions: int = 0
    samples_without_caption: int = 0


def _captions_of(members: Mapping[str, bytes], caption_key: str) -> list[str]:
    """The non-empty captions of one sample's first text member (a json caption may be a list)."""
    from imp_platform.data.decode import DecodeError, decode_text

    by_ext = {name.rsplit(".", 1)[-1].lower(): data for name, data in members.items()}
    for ext in TEXT_EXTENSIONS:
        if ext in by_ext:
            try:
                return [c for c in decode_text(by_ext[ext], ext, caption_key).captions if c]
            except DecodeError:
                return []
    return []


def iter_captions(paths: list[str], storage_options: dict[str, Any] | None = None, caption_key: str = "caption",
                  stats: CaptionStats | None = None) -> Iterator[str]:
    """Every caption in the tar shards under ``paths`` (local or s3://), streamed shard by shard."""
    from imp_platform.data.sources import list_shards
    from imp_platform.data.tars import read_samples

    stats = stats if stats is not None else CaptionStats()
    for url in list_shards(paths, storage_options).shards:
        stats.shards += 1
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as fh:
            for sample in read_samples(fh, url):
                captions = _captions_of(sample.members, caption_key)
                stats.captions += len(captions)
                stats.samples_without_caption += not captions
                yield from captions


def train_tokenizer(captions: Iterable[str], vocab_size: int = 1024, kind: TokenizerKind = "wordpiece") -> Any:
    """A lower-cased WordPiece or BPE ``tokenizers.Tokenizer`` trained on ``captions``; [PAD] = 0, [UNK] = 1."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
        tokenizer.decoder = decoders.WordPiece()
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      end_of_word_suffix="</w>")
        tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    else:
        raise ValueError(f"tokenizer kind must be wordpiece or bpe, got {kind!r}")
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(captions, trainer=trainer)
    return tokenizer


def build_tokenizer(inputs: list[str], out: str, vocab_size: int = 1024, kind: TokenizerKind = "wordpiece",
                    caption_key: str = "caption", storage_options: dict[str, Any] | None = None) -> CaptionStats:
    """Train a tokenizer on the captions of the shards under ``inputs`` and write it to ``out`` (local or s3://)."""
    stats = CaptionStats()
    tokenizer = train_tokenizer(iter_captions(inputs, storage_options, caption_key, stats), vocab_size, kind)
    if not stats.captions:
        raise FileNotFoundError(f"no captions (json {caption_key!r} or txt members) in the shards under {inputs}")
    fs, path = filesystem(out, storage_options)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    with fsspec.open(out, "w", **(storage_options or {})) as fh:
        fh.write(tokenizer.to_str())
    log.info("tokenizer (%s, %d tokens) from %d captions in %d shards -> %s", kind, tokenizer.get_vocab_size(),
             stats.captions, stats.shards, out)
    return stats
