"""The tar shard reader without Ray: webdataset grouping, and broken shards as skip records instead of exceptions."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable

import pytest
from tarfaults import add, sparse_member

from imp_platform.data.pipeline import raw_samples
from imp_platform.data.tars import KeyRegistry, RawSample, read_samples, sample_blocks, split_member

URL = "bucket/shard-00000.tar"


def shard(*members: tuple[str, bytes]) -> tuple[bytes, list[int]]:
    """A tar of these (name, data) members, and the offset where each member ends (before the end marker)."""
    buf, ends = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add(tar, name, data)
            ends.append(buf.tell())
    return buf.getvalue(), ends


def read(data: bytes) -> list[tuple[str, dict[str, bytes], str]]:
    return [(s.key, s.members, s.skip) for s in read_samples(io.BytesIO(data), URL)]


TWO = [("a.json", b"{}"), ("a.mp4", b"A" * 1500), ("b.json", b"[]"), ("b.mp4", b"B" * 1500)]


@pytest.mark.parametrize(("name", "split"), [
    ("x.mp4", ("x", "mp4")),
    ("dir.v1/x.seg.mp4", ("dir.v1/x", "seg.mp4")),  # folder kept, extension = all after the first dot
    ("x.", ("x", "")),
    ("README", ("README", "noext")),  # webdataset would drop these silently
    ("../x", ("../x", "noext")),
    ("dir/.hidden", ("dir/%2Ehidden", "noext")),
])
def test_split_member_as_webdataset(name: str, split: tuple[str, str]) -> None:
    assert split_member(name) == split


def test_groups_contiguous_members_and_counts_non_regular() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, "dir", kind=tarfile.DIRTYPE)
        add(tar, "dir/a.mp4", b"v")
        add(tar, "dir/link.mp4", kind=tarfile.SYMTYPE)  # between two members of dir/a: does not split it
        add(tar, "dir/a.json", b"{}")
        add(tar, "fifo", kind=tarfile.FIFOTYPE)
        add(tar, "README", b"hi")
    assert read(buf.getvalue()) == [
        ("dir", {}, "non_regular_member"), ("dir/link.mp4", {}, "non_regular_member"), ("fifo", {}, "non_regular_member"),
        ("dir/a", {"mp4": b"v", "json": b"{}"}, ""), ("README", {"noext": b"hi"}, "")]  # a sample ends at the next key


def test_huge_and_sparse_members_are_never_read() -> None:
    data, _ = shard(("a.json", b"{}"), ("a.mp4", b"v" * 5000), ("b.json", b"{}"), ("b.mp4", b"v" * 100))
    assert read_samples_capped(data, 4096) == [("a", {}, "huge_member"), ("b", {"json": b"{}", "mp4": b"v" * 100}, "")]
    # A GNU sparse member of 64 GiB stored in one block: its header alone says how big it expands.
    data = sparse_member("c.mp4", 64 * 2**30) + shard(("d.json", b"{}"))[0]
    samples = list(read_samples(io.BytesIO(data), URL, max_member_bytes=2**30))
    assert [(s.key, s.skip) for s in samples] == [("c", "huge_member"), ("d", "")]
    assert "sparse member expanding to 68719476736 bytes" in samples[0].detail


def read_samples_capped(data: bytes, cap: int) -> list[tuple[str, dict[str, bytes], str]]:
    return [(s.key, s.members, s.skip) for s in read_samples(io.BytesIO(data), URL, max_member_bytes=cap)]


def test_non_utf8_member_names_fail_their_sample_only() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        add(tar, "caf\u00e9.json", b"{}")  # written as latin-1: not valid UTF-8
        add(tar, "b.json", b"{}")
    samples = list(read_samples(io.BytesIO(buf.getvalue()), URL))
    assert [(s.key, s.skip) for s in samples] == [("caf\\xe9", "non_utf8_name"), ("b", "")]


def test_garbage_header_mid_shard_resynchronises_and_counts_the_loss() -> None:
    data, ends = shard(("a.json", b"{}"), ("b.json", b"{}"), ("b.mp4", b"B" * 1500), ("c.json", b"{}"))
    # Overwrite b.mp4's header (it starts where b.json's data ends) with garbage.
    broken = data[: ends[1]] + b"x" * tarfile.BLOCKSIZE + data[ends[1] + tarfile.BLOCKSIZE :]
    samples = list(read_samples(io.BytesIO(broken), URL))
    assert [(s.key, s.skip) for s in samples] == [
        ("a", ""), (f"{URL}@{ends[1]}", "bad_tar_header"), ("b", "bad_tar_header"), ("c", "")]
    assert f"{ends[2] - ends[1]} bytes unreadable" in samples[1].detail  # the header and b.mp4's data


def test_duplicate_member_skips_that_sample_only() -> None:
    data, _ = shard(("a.json", b"1"), ("a.mp4", b"v"), ("a.json", b"2"), ("b.json", b"3"))
    assert read(data) == [("a", {}, "duplicate_member"), ("b", {"json": b"3"}, "")]


def test_key_coming_back_skips_the_later_group() -> None:
    data, _ = shard(("a.json", b"1"), ("b.json", b"2"), ("a.mp4", b"v"), ("a.txt", b"t"), ("c.json", b"3"))
    assert read(data) == [
        ("a", {"json": b"1"}, ""), ("b", {"json": b"2"}, ""), ("a", {}, "duplicate_key"), ("c", {"json": b"3"}, "")]


@pytest.mark.parametrize(("cut", "reason"), [
    (lambda ends: ends[1] + tarfile.BLOCKSIZE + 1, "ReadError"),  # inside b's first member
    (lambda ends: ends[2] + 100, "TruncatedHeaderError"),  # inside b.mp4's header
    (lambda ends: ends[3] - 700, "ReadError"),  # inside b.mp4's data
    (lambda ends: ends[3] - 10, "ReadError"),  # inside the padding after b.mp4's data
    (lambda ends: ends[3], "EmptyHeaderError"),  # after b.mp4, with no end-of-archive marker
    (lambda ends: ends[3] + 100, "TruncatedHeaderError"),  # inside the end-of-archive marker
])
def test_truncated_shard_keeps_completed_samples_and_counts_the_broken_one(cut: Callable[[list[int]], int], reason: str) -> None:
    data, ends = shard(*TWO)
    samples = list(read_samples(io.BytesIO(data[: cut(ends)]), URL))
    assert [(s.key, s.members, s.skip) for s in samples] == [
        ("a", {"json": b"{}", "mp4": b"A" * 1500}, ""), ("b", {}, "truncated_shard")]
    assert URL in samples[1].detail and reason in samples[1].detail


def test_truncated_inside_first_sample_or_before_any() -> None:
    data, ends = shard(*TWO)
    assert read(data[: ends[0] + 100]) == [("a", {}, "truncated_shard")]
    folder_only = io.BytesIO()
    with tarfile.open(fileobj=folder_only, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, "dir", kind=tarfile.DIRTYPE)
    assert read(folder_only.getvalue()[: tarfile.BLOCKSIZE + 100]) == [
        ("dir", {}, "non_regular_member"), (f"{URL}#truncated", {}, "truncated_shard")]


def test_garbage_at_the_end_counts_as_truncated() -> None:
    data, ends = shard(*TWO)
    assert read(data[: ends[3]] + b"x" * tarfile.BLOCKSIZE)[-1] == ("b", {}, "truncated_shard")


def test_blocks_are_bounded_and_round_trip_through_a_batch() -> None:
    # Samples differ in their members (wav or flac): a block keeps every sample's own.
    samples = [RawSample(f"s{i}", {"json": b"{}", "mp4": bytes([i]) * 1000, ("wav", "flac")[i % 2]: b"a"}) for i in range(5)]
    data, ends = shard(*((f"{s.key}.{ext}", blob) for s in samples for ext, blob in s.members.items()))
    blocks = list(sample_blocks(io.BytesIO(data[: ends[-1] - 700]), URL, rows=2))
    assert [b.num_rows for b in blocks] == [2, 2, 1]
    assert all(set(b.column("__url__").to_pylist()) == {URL} for b in blocks)
    # A block as the decode tasks get it: Ray's numpy batch (a missing member is None).
    read_back = [s for b in blocks for _, s in raw_samples({c: b.column(c).to_numpy(zero_copy_only=False) for c in b.column_names})]
    assert read_back[:4] == samples[:4]
    assert (read_back[4].key, read_back[4].members, read_back[4].skip) == ("s4", {}, "truncated_shard")


def test_key_registry_keeps_the_first_shard_and_forgives_retries() -> None:
    registry = KeyRegistry()
    assert registry.claim([("a", "s0.tar"), ("b", "s0.tar")]) == [None, None]
    assert registry.claim([("a", "s1.tar"), ("c", "s1.tar")]) == ["s0.tar", None]  # a is s0's: a duplicate in s1
    assert registry.claim([("a", "s0.tar")]) == [None]  # s0's task retried: still its own key
