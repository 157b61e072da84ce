"""A corpus planting every fault of issue 2 §6: each is skipped and counted with its key, every good sample kept."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from imp_platform.cli import app
from imp_platform.data.pipeline import load_preprocess_config, preprocess

GOOD = 6


def read_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a synth shard, in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    for ext, data in members.items():
        add(tar, f"{key}.{ext}", data)


def write_cut_shard(path: Path, good: dict[str, dict[str, bytes]], key: str, members: dict[str, bytes]) -> None:
    """Good samples, then ``key`` cut in the middle of its last member (an interrupted copy)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for good_key, good_members in good.items():
            add_sample(tar, good_key, good_members)
        *head, (ext, data) = members.items()
        add_sample(tar, key, dict(head))
        cut = buf.tell() + tarfile.BLOCKSIZE + len(data) // 2
        add(tar, f"{key}.{ext}", data)
    path.write_bytes(buf.getvalue()[:cut])


def nan_wav() -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.full(8000, np.nan, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def audio_ext(members: dict[str, bytes]) -> str:
    return next(ext for ext in members if ext in ("wav", "flac"))


def build_corpus(root: Path, source: dict[str, dict[str, bytes]]) -> tuple[list[str], dict[str, str]]:
    """Write good and faulty samples plus unusable files; return good keys and {fault key: expected kind}."""
    items = list(source.values())
    good = {f"good-{i}": items[i] for i in range(GOOD)}
    base = items[GOOD]
    before_cut = {f"before-cut-{i}": items[GOOD + 1 + i] for i in range(2)}
    repeated = items[GOOD + 3]  # kept once; its key comes back later in the shard
    mp4 = base["mp4"]
    y4m_16k = b"YUV4MPEG2 W16000 H16000 F8:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(4096)  # header promises 16k x 16k
    faults: dict[str, tuple[str, dict[str, bytes]]] = {
        "bad-truncated-mp4": ("corrupt_video", {**base, "mp4": mp4[: len(mp4) // 3]}),
        "bad-corrupt-mp4": ("corrupt_video", {**base, "mp4": bytes(range(256)) * 40}),
        "bad-zero-audio": ("empty_audio", {**base, audio_ext(base): b""}),
        "bad-nan-audio": ("nan_audio", {**{k: v for k, v in base.items() if k not in ("wav", "flac")}, "wav": nan_wav()}),
        "bad-unknown-codec": ("unknown_codec", {**base, "mp4": mp4.replace(b"avc1", b"zq9x")}),
        "bad-missing-video": ("missing_modality", {k: v for k, v in base.items() if k != "mp4"}),
        "bad-non-utf8": ("bad_text_encoding", {**base, "json": b'{"caption": "a \xff\xfe digit", "label": 1}'}),
        "bad-16k-header": ("absurd_resolution", {**base, "mp4": y4m_16k}),
    }
    src = root / "src"
    src.mkdir()
    with tarfile.open(src / "mixed-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        add_sample(tar, "repeated", repeated)
        for key, members in [*good.items(), *((k, m) for k, (_, m) in faults.items())]:
            add_sample(tar, key, members)
        add_sample(tar, "bad-duplicate-member", base)
        add(tar, "bad-duplicate-member.json", base["json"])  # the same extension twice in one sample
        add(tar, "repeated.json", repeated["json"])  # not contiguous with its first group
        add(tar, "../x", b"escapes the extraction folder")
    write_cut_shard(src / "cut-00003.tar", before_cut, "bad-cut-mid-member", base)
    (src / "empty-00001.tar").write_bytes(b"")
    with tarfile.open(src / "no-members-00002.tar", "w"):
        pass
    (src / "notes.txt").write_text("not a shard")
    expected = {key: kind for key, (kind, _) in faults.items()}
    expected["bad-duplicate-member"] = "duplicate_member"
    expected["repeated"] = "duplicate_key"
    expected["bad-cut-mid-member"] = "truncated_shard"
    expected["../x"] = "unsafe_member_name"
    expected[str(src / "empty-00001.tar")] = "empty_shard"
    expected[str(src / "no-members-00002.tar")] = "empty_shard"
    expected[str(src / "notes.txt")] = "not_tar"
    return [*good, *before_cut, "repeated"], expected


def test_every_planted_fault_is_skipped_and_counted(
    ray_local: None, synth_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = read_samples(sorted(synth_shards["test"].glob("*.tar"))[0])
    good, expected = build_corpus(tmp_path, source)
    (tmp_path / "tokenizer.json").write_bytes((synth_shards["root"] / "tokenizer.json").read_bytes())

    # Through the CLI, with a relative output path: Ray's workers do not share this cwd, so files
    # written anywhere but tmp_path/out (resolved here, before Ray sees it) fail the checks below.
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["data", "preprocess", "--input", str(tmp_path / "src"), "--output", "out",
                                      "--set", "decode.num_actors=1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert re.search(rf"total read\W+{manifest['total_read']}\b", result.output), result.output  # the summary table

    examples = manifest["skipped_examples"]
    for key, kind in expected.items():
        assert key in examples.get(kind, []), f"{key} not counted as {kind}: {examples}"
    counted = {(kind, key) for kind, keys in examples.items() for key in keys}
    assert counted == {(kind, key) for key, kind in expected.items()}, "something else was skipped"
    assert manifest["skipped"] == {kind: len(keys) for kind, keys in examples.items()}
    assert manifest["kept"] == len(good)
    assert manifest["total_read"] == manifest["kept"] + sum(manifest["skipped"].values()) == len(good) + len(expected)
    kept = {k for b in manifest["buckets"] for k in _keys(tmp_path / "out", b["name"])}
    assert kept == set(good)


def _keys(root: Path, bucket: str) -> list[str]:
    import pyarrow.parquet as pq

    return [k for f in (root / f"bucket={bucket}").glob("*.parquet") for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]


def test_missing_source_path_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="source path not found"):
        preprocess(load_preprocess_config(None, str(tmp_path / "absent" / "*.tar"), str(tmp_path / "out")))
