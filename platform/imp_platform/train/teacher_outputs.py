"""Teacher outputs precomputed once and stored with the processed data (cheaper than a large
teacher forward on every training step).

The fused logits (``Teacher.logits``: what the online path computes) of every row become a
float32 ``[C]`` column of the split. Like preprocessing, the manifest is the commit point: each
parquet file is rewritten under a new name with the column added (row groups kept), the
manifest is replaced in one step to name the new files, and only then are the old files
removed. The manifest records which teacher wrote the column (``teacher_outputs``).

An Expert-Choice MoE teacher routes each token against its batch mates, so its stored logits
match the online ones exactly only for a dense teacher (or the same batches); the difference is
routing noise, not a bias.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from imp_platform.config import ConfigError
from imp_platform.config.train import PretrainConfig
from imp_platform.data import manifest as manifest_io
from imp_platform.data import modalities as registry
from imp_platform.data.sources import filesystem, join
from imp_platform.data.stream import ProcessedDataset
from imp_platform.train.teacher import load_teacher

log = logging.getLogger(__name__)


def store_teacher_logits(split: str, teacher: str, modalities: list[str], heads: dict[str, str], column: str,
                         storage_options: dict[str, Any] | None = None, batch_size: int = 64) -> int:
    """Add ``column`` (the teacher's fused logits) to every bucket of the processed ``split`` that has
    the teacher's modalities; returns the rows written."""
    dataset = ProcessedDataset.open(split, storage_options)
    model = load_teacher(teacher)
    needed = [c for m in modalities for c in registry.modality(m).columns]
    manifest = dataset.manifest
    stale: list[str] = []
    rows = 0
    for entry, info in zip(manifest["buckets"], dataset.buckets):
        if not all(c in info.columns for c in needed):
            log.info("bucket %s lacks %s: no %s there (tasks that read it skip the bucket)", info.name, needed, column)
            continue
        # stored order (file by file, row group by row group), the order the files are rewritten in
        logits = np.concatenate([model.logits(batch, modalities, heads, torch.device("cpu")).numpy()
                                 for batch in dataset.iter_batches(info, batch_size, needed)]).astype(np.float32)
        classes, offset = logits.shape[1], 0
        for file_entry, url in zip(entry["files"], info.files):
            fs, path = filesystem(url, storage_options)
            with fs.open(path, "rb") as fh:
                parquet = pq.ParquetFile(fh)
                groups = [parquet.read_row_group(g) for g in range(parquet.num_row_groups)]
            tables = []
            for group in groups:
                tables.append(_with_column(group, column, logits[offset:offset + group.num_rows]))
                offset += group.num_rows
            new_name = f"{file_entry['path'].rsplit('.parquet', 1)[0]}-{column}-{uuid.uuid4().hex[:6]}.parquet"
            _, new_path = filesystem(join(dataset.root, new_name), storage_options)
            with fs.open(new_path, "wb") as fh, pq.ParquetWriter(fh, tables[0].schema) as writer:
                for table in tables:  # one write per row group: the manifest's row-group sizes stay true
                    writer.write_table(table)
            stale.append(path)
            file_entry["path"] = new_name
        rows += offset
        entry["columns"][column] = {"dtype": "float32", "shape": [classes]}
    if not stale:
        raise ConfigError(f"{split}: no bucket has the teacher's columns {needed}")
    manifest.setdefault("teacher_outputs", {})[column] = {"teacher": teacher, "modalities": modalities,
                                                          "heads": heads}
    manifest_io.write(manifest, join(dataset.root, manifest_io.MANIFEST_NAME), storage_options)
    for path in stale:
        dataset.fs.rm(path)
    log.info("stored %s (teacher %s) for %d rows of %s", column, teacher, rows, split)
    return rows


def _with_column(group: pa.Table, column: str, values: np.ndarray) -> pa.Table:
    """``group`` with ``column`` (replaced if there) holding ``values`` [rows, C] as fixed-size lists."""
    if column in group.column_names:
        group = group.drop_columns([column])
    return group.append_column(column, pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))


def precompute(cfg: PretrainConfig) -> dict[str, int]:
    """For every distill objective with ``teacher_column``: store its teacher's logits in its task's split."""
    done: dict[str, int] = {}
    for name, task in cfg.tasks.items():
        for obj in task.objectives:
            if obj.kind == "distill" and obj.teacher_column:
                split = cfg.data.processed_path(task.split)
                done[f"{name}:{obj.teacher_column}"] = store_teacher_logits(
                    split, obj.teacher, obj.teacher_modalities, obj.teacher_heads, obj.teacher_column,
                    cfg.data.storage_options)
    if not done:
        raise ConfigError("no distill objective sets teacher_column: nothing to precompute")
    return done
