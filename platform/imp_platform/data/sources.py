"""Where shards live: local folders/globs or ``s3://`` prefixes, listed through fsspec.

Listing happens on the driver before Ray Data starts so that the two faults that are about
*files* rather than samples (an empty shard, a non-tar file in the folder) are skipped and
counted by path, and a missing source fails at once with a message naming it.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)

TAR_BLOCK = 512
_GLOB_CHARS = set("*?[")


@dataclass
class ShardListing:
    """Readable tar shards (full URLs) plus the files skipped while listing, by kind."""

    shards: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    raw_bytes: int = 0  # summed size of the readable shards (the dataset card's raw bytes per sample)

    def skip(self, kind: str, path: str) -> None:
        self.skipped.setdefault(kind, []).append(path)


# S3 blips (503 SlowDown, a reset or stalled connection) must cost a retry, not a job: botocore's
# ``standard`` mode retries throttling, 5xx and connection/timeout errors with exponential backoff
# and jitter; the timeouts turn a stalled request into such an error instead of a hang. Reads and
# writes alike (s3fs for shards, parquet, manifests and checkpoints all come from ``filesystem``).
# Per source/output/run, ``storage_options.config_kwargs`` overrides any key, e.g.
# ``--set output.storage_options.config_kwargs.read_timeout=120``.
S3_CONFIG_DEFAULTS: dict[str, Any] = {
    "retries": {"max_attempts": 10, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 60,
}


def with_s3_defaults(path: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` with ``S3_CONFIG_DEFAULTS`` under the keys it leaves unset (s3:// only)."""
    if not str(path).startswith(("s3://", "s3a://")):
        return storage_options
    # A deep copy: botocore rewrites the ``retries`` mapping in place (max_attempts -> total_max_attempts).
    defaults = copy.deepcopy(S3_CONFIG_DEFAULTS)
    return {**storage_options, "config_kwargs": {**defaults, **storage_options.get("config_kwargs", {})}}


def filesystem(path: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` (local or ``s3://``, with retries and timeouts) and the path inside it."""
    return url_to_fs(str(path), **with_s3_defaults(str(path), storage_options or {}))


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path inside ``fs`` as a URL that ``filesystem`` maps back to the same file."""
    return fs.unstrip_protocol(path) if _is_remote(fs) else path


def absolute(path: str) -> str:
    """Local paths made absolute (URLs unchanged): Ray workers may run in another directory
    (a job's working_dir, or the one Ray's ``uv run`` support creates)."""
    return path if "://" in path else os.path.abspath(path)


def join(root: str, *parts: str) -> str:
    """Join path parts with ``/`` (works for local paths and URLs alike)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def _is_remote(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" not in fs.protocol and "local" not in fs.protocol


def _probe(fs: fsspec.AbstractFileSystem, path: str, size: int) -> str | None:
    """Return a skip kind for files that are not usable tar shards, else None.

    An all-zero first block is a tar with no members (the end-of-archive marker); a header
    without the ``ustar`` magic at offset 257 is not a (POSIX/GNU) tar at all.
    """
    if not path.endswith(".tar"):
        return "not_tar"
    if size == 0:
        return "empty_shard"
    with fs.open(path, "rb") as fh:
        head = fh.read(TAR_BLOCK)
    if len(head) < TAR_BLOCK:
        return "not_tar"
    if not any(head):
        return "empty_shard"
    if head[257:262] != b"ustar":
        return "not_tar"
    return None


def _expand(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """File entries (with name and size) under one source path, glob or folder."""
    if _GLOB_CHARS & set(path):
        matches = fs.glob(path, detail=True)
        if not matches:
            raise FileNotFoundError(f"source path not found: no files match {path!r}")
        entries: list[dict[str, Any]] = []
        for name, info in sorted(matches.items()):
            entries.extend(_expand(fs, name) if info["type"] == "directory" else [info])
        return entries
    if not fs.exists(path):
        raise FileNotFoundError(f"source path not found: {path!r}")
    if fs.isdir(path):
        return [info for _, info in sorted(fs.find(path, detail=True).items()) if info["type"] != "directory"]
    return [fs.info(path)]


def _followed(fs: fsspec.AbstractFileSystem, info: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A listed entry as the file to read, or the skip kind of one that is not a regular file.

    fsspec lists a symlink as type ``other`` without following it: a link to a file is read
    (with the target's size); a dangling link, a link to a folder (not followed: cycles) and
    anything else that is not a regular file (fifo, socket, device) are counted by kind.
    """
    if info["type"] == "file":
        return info, None
    if not info.get("islink"):
        return info, "not_regular_file"
    try:
        target = fs.info(info["name"])  # follows the link
    except FileNotFoundError:
        return info, "broken_symlink"
    if target["type"] == "directory":
        return info, "symlinked_dir"
    return ({**target, "name": info["name"]}, None) if target["type"] == "file" else (info, "not_regular_file")


def list_shards(paths: list[str] | str, storage_options: dict[str, Any] | None = None) -> ShardListing:
    """List tar shards under each path (folder, file or glob; local or ``s3://``).

    Raises FileNotFoundError naming the path when a source does not exist or a glob matches
    nothing, and when no readable shard remains at all; other unusable files are counted.
    """
    listing = ShardListing()
    for source in [paths] if isinstance(paths, str) else paths:
        fs, path = filesystem(source, storage_options)
        for entry in _expand(fs, path):
            info, kind = _followed(fs, entry)
            name = info["name"]
            kind = kind or _probe(fs, name, int(info.get("size") or 0))
            if kind:
                log.warning("skipping %s: %s", name, kind)
                listing.skip(kind, full_url(fs, name))
            else:
                listing.shards.append(full_url(fs, name))
                listing.raw_bytes += int(info.get("size") or 0)
    if not listing.shards:
        raise FileNotFoundError(f"no readable tar shards under {paths!r} (skipped: {listing.skipped})")
    return listing
