"""Webdataset tar shards read as raw samples, where a broken shard becomes skip records, never an exception.

Ray's ``read_webdataset`` fails the whole job on a truncated shard, on a member repeated
inside one sample and on a sample key that comes back later in the shard (issue 2 §6). This
reader groups members exactly as webdataset does (key = folder + base name up to the first
dot, extension = the rest; members of a sample are contiguous) but turns each of those
faults into a sample whose ``skip`` names the fault kind, so the decode step counts it with
its key like any other bad sample.
"""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

TRUNCATED_SHARD = "truncated_shard"
DUPLICATE_MEMBER = "duplicate_member"
DUPLICATE_KEY = "duplicate_key"
# Columns of a raw block besides one bytes column per member extension.
KEY, URL, SKIP, DETAIL = "__key__", "__url__", "__skip__", "__skip_detail__"
# Samples per raw block: bounds a read task's memory, and small enough (~10 MB of media) that
# one big shard's blocks spread over every decode actor instead of queueing at one.
READ_BLOCK_ROWS = 64


@dataclass
class RawSample:
    """One sample as read from a shard: key, {extension: bytes}, and the fault kind + why if unusable."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    skip: str = ""
    detail: str = ""

    def fail(self, kind: str, detail: str) -> None:
        """Mark the sample unusable; its bytes are dropped since nothing of it may be kept."""
        self.skip, self.detail, self.members = kind, detail, {}

    def row(self, url: str) -> dict[str, Any]:
        """The sample as a row of a raw block (the shape of ``read_webdataset(decoder=None)`` plus skip columns)."""
        return {KEY: self.key, URL: url, SKIP: self.skip, DETAIL: self.detail, **self.members}


def split_member(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member name, split as webdataset splits it.

    Webdataset silently drops names it cannot split (``README``, ``../x``, ``.hidden``);
    those get the extension ``noext`` instead, so the decode step skips and counts them.
    """
    folder, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if stem and dot:
        return folder + slash + stem, ext
    return folder + slash + (base.replace(".", "%2E") or "%2E"), "noext"


def _why(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Header(tarfile.TarInfo):
    """Remembers on its ``_Tar`` why reading a header failed: past the first member, tarfile
    ends the iteration silently on a truncated or invalid header, as if the shard ended there."""

    @classmethod
    def fromtarfile(cls, tar: _Tar) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.stopped_by = exc
            raise


class _Tar(tarfile.TarFile):
    """A tar stream that can tell a proper end-of-archive marker from a shard that breaks off."""

    tarinfo = _Header
    stopped_by: tarfile.HeaderError | None = None

    def broken(self) -> str | None:
        """Why the member iteration stopped early, or None when it reached the end-of-archive marker."""
        return None if isinstance(self.stopped_by, tarfile.EOFHeaderError) else _why(self.stopped_by)


class _Grouper:
    """Contiguous members -> samples, the webdataset way, with faults marked on the sample."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.current: RawSample | None = None
        self.seen: set[str] = set()

    def begin(self, key: str) -> Iterator[RawSample]:
        """Make ``key`` the current sample; yields the previous one, which is complete once the key changes."""
        if self.current is not None and self.current.key == key:
            return
        yield from self.finish()
        self.current = RawSample(key)
        if key in self.seen:
            self.current.fail(DUPLICATE_KEY, f"{key!r} comes back after other samples in {self.url}; later group skipped")
        self.seen.add(key)

    def put(self, ext: str, data: bytes) -> None:
        """Add one member to the current sample."""
        sample = self.current
        assert sample is not None, "begin() first"
        if sample.skip:
            return
        if ext in sample.members:
            sample.fail(DUPLICATE_MEMBER, f"{sample.key}.{ext} appears twice in one sample in {self.url}")
        else:
            sample.members[ext] = data

    def finish(self) -> Iterator[RawSample]:
        if self.current is not None:
            yield self.current
            self.current = None

    def break_off(self, reason: str) -> Iterator[RawSample]:
        """The shard broke: the sample being read, or (with none) the shard itself, counts as truncated."""
        sample = self.current or RawSample(f"{self.url}#truncated")
        self.current = None
        sample.fail(TRUNCATED_SHARD, f"{self.url} breaks off here: {reason}")
        yield sample


def read_samples(fileobj: IO[bytes], url: str) -> Iterator[RawSample]:
    """The samples of one shard in tar order, streamed (one sample in memory); faults are marked, not raised.

    Samples completed before a break are kept; the one being read when the shard breaks off
    (data, padding or a header cut short, or no end-of-archive marker) is ``truncated_shard``.
    Non-regular members (folders, links) are ignored, as webdataset does.
    """
    grouper = _Grouper(url)
    try:
        with _Tar.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                if info.isreg():
                    key, ext = split_member(info.name)
                    yield from grouper.begin(key)
                    grouper.put(ext, tar.extractfile(info).read())
            reason = tar.broken()
    except tarfile.TarError as exc:
        reason = _why(exc)
    if reason:
        yield from grouper.break_off(reason)
    else:
        yield from grouper.finish()


def sample_blocks(fileobj: IO[bytes], url: str, rows: int = READ_BLOCK_ROWS) -> Iterator[Any]:
    """Raw blocks (Arrow tables of at most ``rows`` samples; a member a sample lacks is null) of one shard."""
    import pyarrow as pa

    samples = read_samples(fileobj, url)
    while chunk := list(itertools.islice(samples, rows)):
        records = [s.row(url) for s in chunk]
        # Every column any sample has (``Table.from_pylist`` would take the first row's keys only).
        columns = dict.fromkeys(name for record in records for name in record)
        yield pa.table({name: [record.get(name) for record in records] for name in columns})


def datasource(paths: list[str], fs: Any) -> Any:
    """A Ray Data ``FileBasedDatasource`` of these ``.tar`` shards, yielding ``sample_blocks``.

    Built on call so that importing this module does not import Ray Data (seconds).
    """
    from ray.data.datasource import FileBasedDatasource

    class TarShardsDatasource(FileBasedDatasource):
        def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
            yield from sample_blocks(f, path)

    return TarShardsDatasource(paths, filesystem=fs, file_extensions=["tar"])
