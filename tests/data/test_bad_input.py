"""A corpus planting every fault of issue 2 §6 and issue 13 §1: each is skipped and counted with its key under
a named kind (at least 20 kinds), and every good sample is kept, including the hard good ones (a video with no
frame count, a truncated video that still yields real frames, a corrupt video beside a good one of another
extension, a long recording of which only the clip is decoded, a label given by class name)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from media import encode_audio, encode_video, tone, wav_header
from tarfaults import add, add_sample, sparse_member
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


def with_audio(members: dict[str, bytes], ext: str, data: bytes) -> dict[str, bytes]:
    """The sample with its audio member replaced."""
    return {**{k: v for k, v in members.items() if k not in ("wav", "flac")}, ext: data}


def with_json(members: dict[str, bytes], **fields: object) -> dict[str, bytes]:
    return {**members, "json": json.dumps({**json.loads(members["json"]), **fields}).encode()}


def hard_good_samples(base: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """Samples a real corpus holds that must be kept, each the harder way."""
    no_video = {k: v for k, v in base.items() if k != "mp4"}
    webm = encode_video(64, 64, frames=24, fps=12, ext="webm")
    long_audio = np.concatenate([np.zeros(8000 * 150, np.float32), tone(700, 2.0, 8000), np.zeros(8000 * 150, np.float32)])
    return {
        "good-raw-h264": {**base, "mp4": encode_video(48, 48, frames=20, fps=10, fmt="h264")},  # no duration nor count
        "good-truncated-webm": {**no_video, "webm": webm[: int(len(webm) * 0.6)]},  # kept: its frames are real
        "good-fallback-webm": {**base, "mp4": bytes(range(256)) * 40, "webm": webm},  # the mp4 is junk
        "good-long-flac": with_audio(base, "flac", encode_audio(long_audio, 8000, "flac")),  # 302 s, 2 s decoded
        "good-label-name": with_json(base, label="three", source="crawl-7"),
        "good-mkv-opus": with_audio({**no_video, "mkv": encode_video(56, 32, frames=16, fps=8, ext="mkv")},
                                    "opus", encode_audio(tone(440, 1.5, 48000), 48000, "opus")),
    }


def label_and_caption_faults(base: dict[str, bytes]) -> dict[str, tuple[str, dict[str, bytes]]]:
    return {
        "bad-label-42": ("label_out_of_range", with_json(base, label=42)),
        "bad-label-int64": ("label_out_of_range", with_json(base, label=2**64)),
        "bad-label-name": ("unknown_label", with_json(base, label="eleven")),
        "bad-label-float": ("bad_label", with_json(base, label=3.5)),
        "bad-empty-caption": ("empty_caption", with_json(base, caption=["", "   "])),
    }


def audio_faults(base: dict[str, bytes]) -> dict[str, tuple[str, dict[str, bytes]]]:
    eleven_minutes = encode_audio(np.zeros(1000 * 660, np.float32), 1000, "flac")  # limits.max_duration_s is 600
    return {
        "bad-rate-2ghz": ("absurd_audio", with_audio(base, "wav", wav_header(2_000_000_000, 1))),
        "bad-1000-channels": ("absurd_audio", with_audio(base, "wav", wav_header(16000, 1000))),
        "bad-11-minutes": ("absurd_duration", with_audio(base, "flac", eleven_minutes)),
    }


def write_odd_members_shard(path: Path, base: dict[str, bytes], huge: int) -> dict[str, str]:
    """A shard of members that must not be read or trusted: sparse, huge, non-UTF-8 names, links, folders."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add_sample(tar, "bad-huge", {**base, "mp4": bytes(huge)})
        add_sample(tar, "bad-caf\udce9", base)  # the raw byte 0xe9: not UTF-8
        add(tar, "bad-link.mp4", kind=tarfile.SYMTYPE)
        add(tar, "a-folder", kind=tarfile.DIRTYPE)
        add_sample(tar, "good-after-odd", base)
    path.write_bytes(sparse_member("bad-sparse.mp4", 64 * 2**30) + buf.getvalue())
    return {"bad-sparse": "huge_member", "bad-huge": "huge_member", "bad-caf\\xe9": "non_utf8_name",
            "bad-link.mp4": "non_regular_member", "a-folder": "non_regular_member"}


def write_resync_shard(path: Path, base: dict[str, bytes]) -> dict[str, str]:
    """resync-a, then resync-lost whose second member's header is garbage, then resync-b."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add_sample(tar, "good-resync-a", base)
        first, *rest = base.items()
        add_sample(tar, "bad-resync-lost", dict([first]))
        garbage_at = buf.tell()
        add_sample(tar, "bad-resync-lost", dict(rest))
        add_sample(tar, "good-resync-b", base)
    data = buf.getvalue()
    path.write_bytes(data[:garbage_at] + b"\xff" * tarfile.BLOCKSIZE + data[garbage_at + tarfile.BLOCKSIZE :])
    return {"bad-resync-lost": "bad_tar_header", f"{path}@{garbage_at}": "bad_tar_header"}


def build_corpus(root: Path, source: dict[str, dict[str, bytes]]) -> tuple[list[str], dict[str, str]]:
    """Write good and faulty samples plus unusable files; return good keys and {fault key: expected kind}."""
    items = list(source.values())
    good = {f"good-{i}": items[i] for i in range(GOOD)}
    base = items[GOOD]
    hard = hard_good_samples(base)
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
        **label_and_caption_faults(base),
        **audio_faults(base),
    }
    src = root / "src"
    src.mkdir()
    with tarfile.open(src / "mixed-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        add_sample(tar, "repeated", repeated)
        for key, members in [*good.items(), *hard.items(), *((k, m) for k, (_, m) in faults.items())]:
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
    with tarfile.open(root / "elsewhere-00007.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        add_sample(tar, "good-linked", base)  # read through a symlink in the source folder
    (src / "linked-00007.tar").symlink_to(root / "elsewhere-00007.tar")
    (src / "dangling-00008.tar").symlink_to(root / "gone.tar")
    with tarfile.open(src / "dup-00004.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        add_sample(tar, "good-0", good["good-0"])  # the same key in a second shard: one copy is dropped
    expected = {key: kind for key, (kind, _) in faults.items()}
    expected |= write_odd_members_shard(src / "odd-00005.tar", base, huge=2 * 2**20)
    expected |= write_resync_shard(src / "resync-00006.tar", base)
    expected["bad-duplicate-member"] = "duplicate_member"
    expected["repeated"] = "duplicate_key"
    expected["bad-cut-mid-member"] = "truncated_shard"
    expected["../x"] = "unsafe_member_name"
    expected[str(src / "empty-00001.tar")] = "empty_shard"
    expected[str(src / "no-members-00002.tar")] = "empty_shard"
    expected[str(src / "notes.txt")] = "not_tar"
    expected[str(src / "dangling-00008.tar")] = "broken_symlink"
    return [*good, *hard, *before_cut, "repeated", "good-after-odd", "good-resync-a", "good-resync-b", "good-linked"], expected


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
                                      "--set", "decode.num_actors=1", "--set", "limits.max_member_mb=1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert re.search(rf"total read\W+{manifest['total_read']}\b", result.output), result.output  # the summary table

    examples = manifest["skipped_examples"]
    expected_skips = {(kind, key) for key, kind in expected.items()} | {("duplicate_key", "good-0")}  # the second copy
    for kind, key in sorted(expected_skips):
        assert key in examples.get(kind, []), f"{key} not counted as {kind}: {examples}"
    counted = {(kind, key) for kind, keys in examples.items() for key in keys}
    assert counted == expected_skips, f"something else was skipped: {counted - expected_skips}"
    assert len(manifest["skipped"]) >= 20, sorted(manifest["skipped"])
    assert manifest["skipped"] == {kind: len(keys) for kind, keys in examples.items()}
    assert manifest["kept"] == len(good)
    assert manifest["total_read"] == manifest["kept"] + sum(manifest["skipped"].values()) == len(good) + len(expected_skips)
    rows = {row["key"]: row for b in manifest["buckets"] for row in _rows(tmp_path / "out", b["name"])}
    assert sorted(rows) == sorted(good)  # each key once: the cross-shard duplicate was dropped, not written twice
    assert rows["good-label-name"]["label"] == 3 and json.loads(rows["good-label-name"]["meta"])["source"] == "crawl-7"
    assert "direction" in json.loads(rows["good-0"]["meta"])  # extra json fields pass through as metadata


def _rows(root: Path, bucket: str) -> list[dict]:
    import pyarrow.parquet as pq

    columns = ["key", "label", "meta"]
    return [row for f in (root / f"bucket={bucket}").glob("*.parquet") for row in pq.read_table(f, columns=columns).to_pylist()]


def test_missing_source_path_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="source path not found"):
        preprocess(load_preprocess_config(None, str(tmp_path / "absent" / "*.tar"), str(tmp_path / "out")))
