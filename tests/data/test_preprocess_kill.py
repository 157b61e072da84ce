"""Preprocess never loses the previous output, and a killed one resumes per shard. A run SIGKILLed once it
has written some shards in full leaves the old manifest and every file it names whole (readers use only
those); the rerun reads only the other shards, keeps the killed run's files of the finished ones, commits
a manifest with the same content as the uninterrupted first run and removes every file it does not name.

"Same content": bucket names, row counts, shapes, columns, tokens per sample, skip counts and examples,
samples read and kept, and the keys in the named files (each exactly once). Not: file names and row-group
sizes, timing, Ray stats.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from imp_platform.data import manifest as manifest_io
from imp_platform.data import resume
from imp_platform.data.pipeline import load_preprocess_config, preprocess
from imp_platform.data.sources import list_shards

# Enough samples for several write tasks (each writes >= 128 rows): the kill lands between them,
# when the first task has finished its shards and the rest are still being decoded.
SAMPLES, SHARDS = 256, 8
RUN_INDEPENDENT = ("skipped", "skipped_examples", "total_read", "kept", "samples_read", "skipped_files")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imp_platform.data.synth import write_dataset

    root = tmp_path_factory.mktemp("kill_shards")
    write_dataset(root, samples=SAMPLES, shards=SHARDS, seed=5, split="train")
    return root / "train"


def _content(manifest: dict[str, Any]) -> dict[str, Any]:
    """What two runs over the same source must agree on (file names, timing and stats differ)."""
    buckets = [{k: b[k] for k in ("name", "count", "shape", "tokens_per_sample", "columns")} for b in manifest["buckets"]]
    return {"buckets": buckets, **{k: manifest[k] for k in RUN_INDEPENDENT}}


def _keys(out: Path, manifest: dict[str, Any]) -> list[str]:
    """Every sample key in the files the manifest names (reading them proves they are whole)."""
    files = [f["path"] for b in manifest["buckets"] for f in b["files"]]
    return sorted(k for path in files for k in pq.read_table(out / path, columns=["key"]).column("key").to_pylist())


def _parquet_files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.glob("bucket=*/*.parquet")}


def _done_shards(out: Path, shards: Path) -> dict[str, resume.DoneShard]:
    """The shards a killed run finished, as the rerun will find them."""
    folders = list((out / resume.RESUME_DIR).glob("*"))
    return resume.done_shards(str(out), str(folders[0]), list_shards(str(shards)).shards) if folders else {}


def _kill_once_a_shard_is_done(shards: Path, out: Path, old: set[str]) -> set[str]:
    """Run `platform data preprocess` as a driver of this session's Ray (as `ray job submit` would) in its
    own process group; SIGKILL the group as soon as the run has written a shard in full (Ray then
    stops the dead driver's tasks and actors). Returns the files it had written by then."""
    import ray

    platform = str(Path(sys.executable).parent / "platform")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([platform, "data", "preprocess", "--input", str(shards), "--output", str(out),
                             "--set", "decode.num_actors=1"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        while not _done_shards(out, shards):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"preprocess ended ({proc.returncode}) before finishing a shard:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return _parquet_files(out) - old


@pytest.mark.chaos
@pytest.mark.slow
def test_killed_preprocess_keeps_the_old_output_and_a_rerun_resumes_to_the_same_dataset(
        ray_local: None, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "processed"
    first = preprocess(load_preprocess_config(None, str(shards), str(out), ["decode.num_actors=1"]))
    committed = (out / manifest_io.MANIFEST_NAME).read_text()
    keys = _keys(out, first)
    assert first["total_read"] == SAMPLES and len(keys) == first["kept"] > 0

    partial = _kill_once_a_shard_is_done(shards, out, _parquet_files(out))
    assert (out / manifest_io.MANIFEST_NAME).read_text() == committed, "the old manifest was touched"
    assert _keys(out, first) == keys, "the old dataset lost rows"
    done = _done_shards(out, shards)
    assert 0 < len(done) < SHARDS, f"the kill must land half way ({len(done)} of {SHARDS} shards done)"
    resumed = {f["path"] for shard in done.values() for part in shard.report.buckets.values() for f in part.files}

    second = preprocess(load_preprocess_config(None, str(shards), str(out), ["decode.num_actors=1"]))
    assert second["resumed_shards"] == len(done)
    assert _content(second) == _content(first)
    assert _keys(out, second) == keys, "samples lost or duplicated"
    named = {f["path"] for b in second["buckets"] for f in b["files"]}
    assert resumed <= named and resumed <= partial, "the finished shards' files are the killed run's, kept"
    assert _parquet_files(out) == named, "the first run's and the killed run's other files must be gone"
    assert not list(out.glob(f"{manifest_io.MANIFEST_NAME}{manifest_io.TMP_SUFFIX}*"))
    assert not (out / resume.RESUME_DIR).exists()


def test_manifest_write_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails before its rename leaves the previous manifest and no temporary file."""
    url = str(tmp_path / manifest_io.MANIFEST_NAME)
    manifest_io.write({"kept": 1}, url)

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        manifest_io.write({"kept": 2}, url)
    assert json.loads(Path(url).read_text()) == {"kept": 1}
    assert [p.name for p in tmp_path.iterdir()] == [manifest_io.MANIFEST_NAME]
