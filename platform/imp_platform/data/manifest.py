"""The preprocess report: what each write task wrote and skipped, merged into ``manifest.json``.

Write tasks return a ``TaskReport``; the driver merges them, so the manifest's counts come
from the rows actually written (``total_read == kept + skipped`` by construction; ``kept`` counts
samples, ``rows_written`` and the bucket counts count rows, one per bucket a sample went to) and the
training side can find every bucket's files and row groups without listing the output.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from imp_platform.data.sources import filesystem

MANIFEST_NAME = "manifest.json"
# A manifest being written on local disk: ``manifest.json.tmp-<id>``, renamed over the manifest when complete.
TMP_SUFFIX = ".tmp-"
# Keys kept per skip kind in ``skipped_examples``; counts in ``skipped`` are always complete.
MAX_EXAMPLES_PER_KIND = 1000


@dataclass
class BucketPart:
    """Rows of one bucket written by one task: per-file row-group sizes and column layout."""

    count: int = 0
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"dtype", "shape"}
    files: list[dict[str, Any]] = field(default_factory=list)  # {"path": relative, "row_groups": [n]}


@dataclass
class TaskReport:
    """What one write task saw: samples read and kept, rows written per bucket, keys skipped per kind.

    A sample written at several video resolutions is one sample kept and one row in each of its
    buckets, so ``kept`` counts samples and bucket counts count rows.
    """

    read: int = 0
    kept: int = 0
    buckets: dict[str, BucketPart] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, kind: str, key: str) -> None:
        self.read += 1
        self.skipped.setdefault(kind, []).append(key)

    def merge(self, other: TaskReport) -> TaskReport:
        self.read += other.read
        self.kept += other.kept
        for kind, keys in other.skipped.items():
            self.skipped.setdefault(kind, []).extend(keys)
        for name, part in other.buckets.items():
            mine = self.buckets.setdefault(name, BucketPart(columns=part.columns))
            if mine.columns != part.columns:
                raise ValueError(f"bucket {name}: column layouts differ between tasks ({mine.columns} vs {part.columns})")
            mine.count += part.count
            mine.files.extend(part.files)
        return self

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (a preprocess resume record holds one per shard)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskReport:
        buckets = {name: BucketPart(**part) for name, part in data["buckets"].items()}
        return cls(read=data["read"], kept=data["kept"], buckets=buckets, skipped=data["skipped"])


def shapes(columns: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """Per-column shapes of the array-valued columns (scalars and strings left out)."""
    return {name: spec["shape"] for name, spec in columns.items() if spec["shape"]}


def build(
    report: TaskReport,
    shard_skips: dict[str, list[str]],
    tokens_per_sample: dict[str, int],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The manifest mapping; shard-level skips (empty shard, non-tar) count as skipped inputs."""
    skipped_keys: dict[str, list[str]] = {}
    for source in (shard_skips, report.skipped):
        for kind, keys in source.items():
            skipped_keys.setdefault(kind, []).extend(keys)
    buckets = [
        {
            "name": name,
            "count": part.count,
            "shape": shapes(part.columns),
            "tokens_per_sample": tokens_per_sample[name],
            "columns": part.columns,
            "files": sorted(part.files, key=lambda f: f["path"]),
        }
        for name, part in sorted(report.buckets.items())
    ]
    skipped_files = sum(len(keys) for keys in shard_skips.values())
    # Unusable files count as inputs read, so total_read == kept + sum(skipped.values()).
    return {
        "buckets": buckets,
        "skipped": {kind: len(keys) for kind, keys in sorted(skipped_keys.items())},
        "skipped_examples": {kind: sorted(keys)[:MAX_EXAMPLES_PER_KIND] for kind, keys in sorted(skipped_keys.items())},
        "total_read": report.read + skipped_files,
        "kept": report.kept,
        "rows_written": sum(b["count"] for b in buckets),  # kept, unless samples went to several buckets
        "samples_read": report.read,
        "skipped_files": skipped_files,
        **extra,
    }


def write(manifest: dict[str, Any], url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Replace the manifest at ``url`` in one step: a reader (or a crash) sees the old one or the new
    one, never a torn file. The manifest is the commit point of a preprocess run (readers use only
    the files it names), so this write comes last, after every file it names is closed.

    Local disk: a temporary file beside it, fsynced, then ``os.replace`` (atomic within a folder).
    Object stores (S3): a single PUT is atomic already.
    """
    fs, path = filesystem(url, storage_options)
    data = json.dumps(manifest, indent=2).encode("utf-8")
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}{TMP_SUFFIX}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a manifest; a missing one says which output folder lacks it."""
    fs, path = filesystem(url, storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST_NAME} at {url}: run `platform data preprocess` first") from None


def format_summary(manifest: dict[str, Any]) -> str:
    """A short table for the end of a preprocess run: buckets with counts, then skips by kind."""
    rows = [("bucket", "count", "tokens/sample")]
    rows += [(b["name"], str(b["count"]), str(b["tokens_per_sample"])) for b in manifest["buckets"]]
    rows += [(f"skipped: {kind}", str(n), "") for kind, n in manifest["skipped"].items()]
    rows.append(("total read", str(manifest["total_read"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
