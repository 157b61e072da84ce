"""What batch inference reads: raw tar shards decoded by the preprocess graph, or a processed split.

Raw shards go through ``data.pipeline.decoded_dataset``, the very read -> decode graph
``platform data preprocess`` runs (same decode ops, same skip records, same cross-shard
duplicate check), configured by a pipeline YAML. A processed split (a folder with
``manifest.json``) is read bucket by bucket, in the batches eval reads. Either way the dataset
card (classes, prompts) and the tokenizer come with the data, as they do for eval.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imp_platform.config import ConfigError, validate
from imp_platform.config.base import apply_overrides
from imp_platform.config.infer import InferConfig
from imp_platform.config.pipeline import PipelineConfig, load_pipeline
from imp_platform.data import manifest as manifest_io
from imp_platform.data import modalities as registry
from imp_platform.data.dataset import TOKENIZER_NAME, DatasetCard, pipeline_of, read_tokenizer
from imp_platform.data.sources import filesystem, join

if TYPE_CHECKING:
    import ray.data

    from imp_platform.config.train import PretrainConfig

@dataclass
class InferenceInput:
    """A lazy dataset of decoded rows and what the model step needs to know about it."""

    dataset: ray.data.Dataset
    kind: str  # "shards" (packed decode rows, skip records included) or "processed" (uniform bucket rows)
    card: DatasetCard
    tokenizer_json: str | None
    modalities: tuple[str, ...]  # encoder modalities the rows can hold
    prompt_length: int | None  # prompts pad to this (the longest stored caption), None: the longest prompt
    skipped_files: dict[str, list[str]] = field(default_factory=dict)  # files skipped while listing, by kind
    shards: int = 0


def is_processed(path: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is a processed split (holds ``manifest.json``) rather than raw shards."""
    fs, base = filesystem(path.rstrip("/"), storage_options)
    return fs.exists(join(base, manifest_io.MANIFEST_NAME))


def pipeline_config(cfg: InferConfig, run_cfg: PretrainConfig | None) -> PipelineConfig:
    """``--pipeline`` (else the run's pipeline, else the embedded one) with its overrides; source = ``--input``."""
    if cfg.pipeline is None and run_cfg is not None:
        base = pipeline_of(run_cfg).model_dump(mode="json")  # classes file paths are absolute by now
        pipe = validate(PipelineConfig, apply_overrides(base, cfg.pipeline_overrides), source=run_cfg.data.pipeline)
    else:
        pipe = load_pipeline(cfg.pipeline, cfg.pipeline_overrides)
    pipe.source.paths = [cfg.input]
    return pipe


def _run_tokenizer(run_cfg: PretrainConfig | None) -> str | None:
    return read_tokenizer(run_cfg, run_cfg.data.eval_split) if run_cfg is not None else None


def open_shards(pipe: PipelineConfig, run_cfg: PretrainConfig | None) -> InferenceInput:
    """Raw shards through the preprocess read -> decode graph (packed rows of every bucket)."""
    from imp_platform.data.pipeline import bucket_layouts, decoded_dataset, resolve_tokenizer

    ds, listing = decoded_dataset(pipe)
    columns = {c for layout in bucket_layouts(pipe).values() for c in layout}
    tokenizer = resolve_tokenizer(pipe, listing.shards) if "text" in pipe.modalities.enabled else _run_tokenizer(run_cfg)
    return InferenceInput(ds, "shards", DatasetCard.from_config(pipe.dataset), tokenizer, registry.present(columns),
                          None, listing.skipped, len(listing.shards))


def _processed_tokenizer(root: str, storage_options: dict[str, Any], run_cfg: PretrainConfig | None) -> str | None:
    """The tokenizer a preprocess wrote beside the split (or one folder up), else the run's."""
    for url in (join(root, TOKENIZER_NAME), join(root.rsplit("/", 1)[0], TOKENIZER_NAME)):
        fs, path = filesystem(url, storage_options)
        if fs.exists(path):
            return fs.cat_file(path).decode("utf-8")
    return _run_tokenizer(run_cfg)


def read_buckets(names: dict[str, np.ndarray], root: str, storage_options: dict[str, Any],
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the named buckets in stored order, cut as ``platform eval`` cuts them
    (``ProcessedDataset.iter_batches``), so equal batch sizes give the model equal batches."""
    from imp_platform.data.stream import ProcessedDataset

    split = ProcessedDataset.open(root, storage_options)
    for name in names["bucket"]:
        yield from split.iter_batches(str(name), batch_size)


def open_processed(path: str, pipe: PipelineConfig, run_cfg: PretrainConfig | None, batch_size: int) -> InferenceInput:
    """A processed split, one read task per bucket in manifest order (each block holds one bucket's rows)."""
    import ray.data

    from imp_platform.data.pipeline import IO_TASK_CPUS
    from imp_platform.data.stream import ProcessedDataset

    storage = pipe.source.storage_options
    split = ProcessedDataset.open(path, storage)
    buckets = [b for b in split.buckets if b.count]
    if not buckets:
        raise ConfigError(f"processed split {path} holds no rows")
    names = ray.data.from_items([{"bucket": b.name} for b in buckets], override_num_blocks=len(buckets))
    ds = names.map_batches(read_buckets, batch_size=1, num_cpus=IO_TASK_CPUS,
                           fn_kwargs={"root": split.root, "storage_options": storage, "batch_size": batch_size})
    stored = set().union(*(b.columns for b in buckets))
    lengths = [b.shape["text_ids"][0] for b in buckets if "text_ids" in b.shape]
    card = DatasetCard.from_manifest(split.manifest) or DatasetCard.from_config(pipe.dataset)
    return InferenceInput(ds, "processed", card, _processed_tokenizer(split.root, storage, run_cfg), registry.present(stored),
                          max(lengths) if lengths else None)


def open_input(cfg: InferConfig, run_cfg: PretrainConfig | None) -> InferenceInput:
    """Raw shards or a processed split, whichever ``cfg.input`` is."""
    pipe = pipeline_config(cfg, run_cfg)
    if is_processed(cfg.input, pipe.source.storage_options):
        return open_processed(cfg.input, pipe, run_cfg, cfg.batch_size)
    return open_shards(pipe, run_cfg)
