"""Shard listing: symlinked shards are read; links that are not to a file are counted, never dropped silently."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from imp_platform.data.sources import list_shards


def write_tar(path: Path) -> int:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("s0.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return path.stat().st_size


def test_symlinked_shards_are_read_and_other_links_counted(tmp_path: Path) -> None:
    store, source = tmp_path / "store", tmp_path / "source"
    store.mkdir()
    source.mkdir()
    size = write_tar(store / "real.tar")
    write_tar(source / "plain.tar")
    (source / "linked.tar").symlink_to(store / "real.tar")
    (source / "dangling.tar").symlink_to(tmp_path / "gone.tar")
    (source / "folder").symlink_to(store, target_is_directory=True)
    os.mkfifo(source / "pipe.tar")
    listing = list_shards(str(source))
    assert sorted(Path(s).name for s in listing.shards) == ["linked.tar", "plain.tar"]
    assert listing.raw_bytes == 2 * size  # the link counts its target's bytes
    assert {kind: [Path(p).name for p in paths] for kind, paths in listing.skipped.items()} == {
        "broken_symlink": ["dangling.tar"], "symlinked_dir": ["folder"], "not_regular_file": ["pipe.tar"]}
    # A glob and a single path to a link read it too.
    assert [Path(s).name for s in list_shards(str(source / "link*.tar")).shards] == ["linked.tar"]
    assert [Path(s).name for s in list_shards(str(source / "linked.tar")).shards] == ["linked.tar"]
    with pytest.raises(FileNotFoundError, match="dangling.tar"):  # named as the source itself
        list_shards(str(source / "dangling.tar"))
