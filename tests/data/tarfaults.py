"""Tar members the standard writer will not make for us: sparse members, raw names, non-regular types."""

from __future__ import annotations

import io
import tarfile


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    """One member; ``name`` may hold surrogate escapes (``\\udce9``), written as those raw bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    tar.addfile(info, io.BytesIO(data))


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    for ext, data in members.items():
        add(tar, f"{key}.{ext}", data)


def sparse_member(name: str, expanded: int) -> bytes:
    """A GNU sparse member (header + one stored block) that expands to ``expanded`` bytes when read whole."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, tarfile.BLOCKSIZE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(tarfile.BLOCKSIZE, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(expanded, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"x" * tarfile.BLOCKSIZE
