"""Webdataset tar shards read as raw samples, where a broken shard becomes skip records, never an exception.

Ray's ``read_webdataset`` fails the whole job on a truncated shard, on a member repeated
inside one sample and on a sample key that comes back later in the shard (issue 2 §6). This
reader groups members exactly as webdataset does (key = folder + base name up to the first
dot, extension = the rest; members of a sample are contiguous) but turns each of those
faults into a sample whose ``skip`` names the fault kind, so the decode step counts it with
its key like any other bad sample. Also counted rather than trusted (issue 13 §1): members
bigger than the size cap (a sparse member counts at its expanded size; neither is ever read,
so a tiny shard cannot inflate to gigabytes in memory), names that are not UTF-8, members
that are not regular files, and a header that is garbage in the middle of a shard: the
reader resynchronises on the next block that is a valid header (ustar magic and checksum),
drops the sample being read (it may have lost members) and records how many bytes were lost.
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
HUGE_MEMBER = "huge_member"
NON_UTF8_NAME = "non_utf8_name"
NON_REGULAR_MEMBER = "non_regular_member"
BAD_TAR_HEADER = "bad_tar_header"
# Not a fault: the record after a shard's last sample, its detail the number of samples before it
# (a preprocess counts what it wrote per shard against it to know the shard is finished).
END_OF_SHARD = "end_of_shard"
# Member size cap when the caller gives none (``limits.max_member_mb`` in a pipeline).
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
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
    """Reports every header read to its ``_Tar``: tarfile (with ``ignore_zeros``) skips an
    invalid block and tries the next, and past the first member ends the iteration silently on
    a truncated header, as if the shard ended there."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        info = super().frombuf(buf, encoding, errors)
        if buf[257:262] != b"ustar":  # a data block whose checksum happens to match is not a header
            raise tarfile.InvalidHeaderError("no ustar magic")
        return info

    @classmethod
    def fromtarfile(cls, tar: _Tar) -> tarfile.TarInfo:  # type: ignore[override]
        offset = tar.offset
        try:
            info = super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.header_failed(offset, exc)
            raise
        tar.header_read(offset)
        return info


class _Tar(tarfile.TarFile):
    """A tar stream that resynchronises past garbage headers and can tell a proper
    end-of-archive marker from a shard that breaks off.

    ``ignore_zeros`` makes tarfile try the next 512-byte block after a zero or invalid one;
    only a block with a valid checksum (and, here, ustar magic) is taken as the next header.
    """

    tarinfo = _Header
    stopped_by: tarfile.HeaderError | None = None
    end_marker = False  # a zero block came after the last member
    lost_at: int | None = None  # offset of the first unreadable block since the last good header

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lost: list[tuple[int, int]] = []  # (offset, bytes) of each unreadable region, resynchronised past
        super().__init__(*args, **kwargs)

    def header_failed(self, offset: int, exc: tarfile.HeaderError) -> None:
        self.stopped_by = exc
        if isinstance(exc, tarfile.EOFHeaderError):
            self.end_marker = True
        elif isinstance(exc, tarfile.InvalidHeaderError) and self.lost_at is None:
            self.lost_at = offset

    def header_read(self, offset: int) -> None:
        if self.lost_at is not None:
            self.lost.append((self.lost_at, offset - self.lost_at))
        self.stopped_by, self.end_marker, self.lost_at = None, False, None

    def broken(self) -> str | None:
        """Why the member iteration stopped early, or None when it reached the end-of-archive marker."""
        if self.lost_at is not None:
            return f"unreadable from byte {self.lost_at} to the end ({_why(self.stopped_by)})"
        ended = self.end_marker and isinstance(self.stopped_by, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError))
        return None if ended else _why(self.stopped_by)


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

    def fail(self, kind: str, detail: str) -> None:
        """Mark the current sample unusable (the first fault wins)."""
        assert self.current is not None, "begin() first"
        if not self.current.skip:
            self.current.fail(kind, detail)

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


def printable(name: str) -> str:
    """A member name as valid UTF-8: bytes tarfile could not decode (kept as surrogates) become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _member_fault(info: tarfile.TarInfo, max_member_bytes: int) -> tuple[str, str] | None:
    """(kind, why) when a member must not be read, checked on its header alone."""
    if not info.isreg():
        return NON_REGULAR_MEMBER, f"{printable(info.name)!r} is a tar member of type {info.type!r}, not a regular file"
    if info.size > max_member_bytes:
        what = "sparse member expanding" if info.issparse() else "member"
        return HUGE_MEMBER, f"{printable(info.name)!r}: {what} to {info.size} bytes > the {max_member_bytes}-byte cap"
    return None


def read_samples(fileobj: IO[bytes], url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawSample]:
    """The samples of one shard in tar order, streamed (one sample in memory); faults are marked, not raised.

    Samples completed before a break are kept; the one being read when the shard breaks off
    (data, padding or a header cut short, or no end-of-archive marker) is ``truncated_shard``.
    A non-regular member (folder, link, device) is a ``non_regular_member`` record of its own;
    a member over ``max_member_bytes`` (never read: tarfile skips its data) fails its sample
    as ``huge_member``, a name that is not UTF-8 as ``non_utf8_name``. After a garbage header
    the reader resynchronises: the sample being read fails as ``bad_tar_header`` and the lost
    bytes are one more ``bad_tar_header`` record keyed ``URL@OFFSET``.
    """
    grouper = _Grouper(url)
    try:
        with _Tar.open(fileobj=fileobj, mode="r|*", ignore_zeros=True) as tar:
            for info in tar:
                yield from _resynchronised(grouper, tar)
                fault = _member_fault(info, max_member_bytes)
                if fault and fault[0] == NON_REGULAR_MEMBER:
                    yield RawSample(printable(info.name), skip=fault[0], detail=f"{fault[1]} in {url}")
                    continue
                key, ext = split_member(printable(info.name))
                yield from grouper.begin(key)
                if printable(info.name) != info.name:
                    grouper.fail(NON_UTF8_NAME, f"member name {printable(info.name)!r} in {url} is not UTF-8")
                elif fault:
                    grouper.fail(*fault)
                else:
                    grouper.put(ext, tar.extractfile(info).read(max_member_bytes + 1))
            reason = tar.broken()
    except tarfile.TarError as exc:
        reason = _why(exc)
    if reason:
        yield from grouper.break_off(reason)
    else:
        yield from grouper.finish()


def _resynchronised(grouper: _Grouper, tar: _Tar) -> Iterator[RawSample]:
    """A record for each region the reader just skipped to reach a valid header; the sample being
    read when it broke fails too (it may have lost members; what remains of it after the region
    is absorbed into it)."""
    for offset, size in tar.lost:
        if grouper.current is not None:
            grouper.fail(BAD_TAR_HEADER, f"garbage header at byte {offset} of {grouper.url}: members may be lost")
        yield RawSample(f"{grouper.url}@{offset}", skip=BAD_TAR_HEADER,
                        detail=f"{size} bytes unreadable from byte {offset} of {grouper.url}; resynchronised on the next valid header")
    tar.lost.clear()


class KeyRegistry:
    """Ray actor holding which shard first kept each sample key, so a key kept from one shard
    is a ``duplicate_key`` in any other (the reader finds duplicates within a shard).

    The first shard to claim a key keeps it: with shards decoded in parallel that is the
    copy decoded first, not necessarily the one listed first. Claims are idempotent per
    (key, shard), so a retried decode task is not mistaken for a duplicate. Memory: one
    entry per kept sample on one actor (~100 bytes each). It lives here, with nothing heavy
    imported, so its actor process starts in well under a second.
    """

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}

    def claim(self, claims: list[tuple[str, str]]) -> list[str | None]:
        """For each (key, shard): None when this shard owns the key, else the shard that does."""
        result = []
        for key, url in claims:
            owner = self.owner.setdefault(key, url)
            result.append(None if owner == url else owner)
        return result


def with_end_marker(samples: Iterator[RawSample], url: str) -> Iterator[RawSample]:
    """The samples, then an ``END_OF_SHARD`` record whose detail counts them."""
    count = 0
    for sample in samples:
        count += 1
        yield sample
    yield RawSample(f"{url}#end", skip=END_OF_SHARD, detail=str(count))


def sample_blocks(fileobj: IO[bytes], url: str, rows: int = READ_BLOCK_ROWS,
                  max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, end_marker: bool = False) -> Iterator[Any]:
    """Raw blocks (Arrow tables of at most ``rows`` samples; a member a sample lacks is null) of one
    shard; with ``end_marker`` its last row is the ``END_OF_SHARD`` record."""
    import pyarrow as pa

    samples = read_samples(fileobj, url, max_member_bytes)
    if end_marker:
        samples = with_end_marker(samples, url)
    while chunk := list(itertools.islice(samples, rows)):
        records = [s.row(url) for s in chunk]
        # Every column any sample has (``Table.from_pylist`` would take the first row's keys only).
        columns = dict.fromkeys(name for record in records for name in record)
        yield pa.table({name: [record.get(name) for record in records] for name in columns})


def datasource(paths: list[str], fs: Any, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               end_markers: bool = False) -> Any:
    """A Ray Data ``FileBasedDatasource`` of these ``.tar`` shards, yielding ``sample_blocks``.

    Built on call so that importing this module does not import Ray Data (seconds).
    """
    from ray.data.datasource import FileBasedDatasource

    class TarShardsDatasource(FileBasedDatasource):
        def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
            yield from sample_blocks(f, path, max_member_bytes=max_member_bytes, end_marker=end_markers)

    return TarShardsDatasource(paths, filesystem=fs, file_extensions=["tar"])
