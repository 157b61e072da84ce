"""Per-shard resume of a killed preprocess: which source shards an earlier run with the same settings wrote in full.

Write tasks mix rows of several shards, so the sink writes one file per (bucket, shard, task) and, once
its files are closed, a record ``OUT/_resume/<fingerprint>/<run>-<task>.json``: per shard, what the task
wrote and skipped (a ``TaskReport``) and, when the reader's ``END_OF_SHARD`` row passed through it, how
many samples the shard has. A shard is done when the records of one run account for all its samples.
A rerun reads only the other shards and adds the done shards' reports; their files stay where they are
and the committed manifest names them. The folder goes once a manifest is committed. The fingerprint
covers every setting that changes the rows (and the tokenizer), so a rerun with other settings starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from imp_platform.config.pipeline import PipelineConfig
from imp_platform.data import manifest as manifest_io
from imp_platform.data.manifest import TaskReport
from imp_platform.data.sources import filesystem, join

log = logging.getLogger(__name__)

RESUME_DIR = "_resume"
# The pipeline sections that decide what a shard's rows are (not: where they go, how many actors decode).
ROW_SETTINGS = {"modalities", "video", "audio", "text", "image", "bucket_policy", "patches", "limits"}


@dataclass
class ShardProgress:
    """One shard as far as one write task (or, merged, one run) got: its rows' report and sample total."""

    report: TaskReport = field(default_factory=TaskReport)
    total: int | None = None  # samples in the shard; None until its END_OF_SHARD row is seen


@dataclass(frozen=True)
class DoneShard:
    """A shard a killed run wrote in full: its report and the keys it kept (claimed again on resume)."""

    report: TaskReport
    keys: list[str]


def fingerprint(cfg: PipelineConfig, tokenizer_json: str | None) -> str:
    """A short hash of what decides the rows, naming the resume folder of runs that may share shards."""
    settings = cfg.model_dump(mode="json", include=ROW_SETTINGS)
    blob = json.dumps({"settings": settings, "tokenizer": tokenizer_json}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def shard_id(url: str) -> str:
    """A file-name-safe id of a shard URL (part of each parquet file name)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]


def write_record(folder: str, name: str, shards: dict[str, ShardProgress],
                 storage_options: dict[str, Any] | None = None) -> None:
    """Save one write task's per-shard progress, atomically (a torn record would hide a shard's rows)."""
    fs, path = filesystem(folder, storage_options)
    fs.makedirs(path, exist_ok=True)
    record = {url: {"total": p.total, "report": p.report.to_json()} for url, p in shards.items()}
    manifest_io.write(record, join(folder, f"{name}.json"), storage_options)


def _runs(folder: str, storage_options: dict[str, Any] | None) -> dict[str, dict[str, ShardProgress]]:
    """Every record under ``folder`` merged per run id (the file name's part before the first ``-``)."""
    fs, path = filesystem(folder, storage_options)
    runs: dict[str, dict[str, ShardProgress]] = {}
    if not fs.exists(path):
        return runs
    for entry in sorted(fs.glob(join(path, "*.json"))):
        run = entry.rsplit("/", 1)[-1].split("-", 1)[0]
        for url, saved in json.loads(fs.cat_file(entry)).items():
            progress = runs.setdefault(run, {}).setdefault(url, ShardProgress())
            progress.report.merge(TaskReport.from_json(saved["report"]))
            progress.total = saved["total"] if saved["total"] is not None else progress.total
    return runs


def _kept_keys(root: str, report: TaskReport, storage_options: dict[str, Any] | None) -> list[str]:
    """The keys in a shard's files (reading them proves the files are there and whole)."""
    import pyarrow.parquet as pq

    fs, base = filesystem(root, storage_options)
    keys: list[str] = []
    for part in report.buckets.values():
        for f in part.files:
            with fs.open(join(base, f["path"]), "rb") as fh:
                keys += pq.read_table(fh, columns=["key"]).column("key").to_pylist()
    return keys


def done_shards(root: str, folder: str, shards: list[str],
                storage_options: dict[str, Any] | None = None) -> dict[str, DoneShard]:
    """The listed shards that one earlier run wrote in full (every sample kept or skipped, files readable)."""
    wanted, done = set(shards), {}
    for progress in _runs(folder, storage_options).values():
        for url, p in progress.items():
            if url in done or url not in wanted or p.total is None or p.report.read != p.total:
                continue
            try:
                done[url] = DoneShard(p.report, _kept_keys(root, p.report, storage_options))
            except (OSError, ValueError) as exc:  # a file gone or cut short: redo the shard
                log.warning("resume: redoing %s, its files are unreadable (%s)", url, exc)
    return done
