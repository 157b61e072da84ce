"""Which shards a killed preprocess finished, from its write tasks' records (data/resume.py), without Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imp_platform.data import resume
from imp_platform.data.manifest import BucketPart, TaskReport
from imp_platform.data.tars import END_OF_SHARD, RawSample, with_end_marker


def _written(root: Path, run_task: str, shard: str, keys: list[str], skipped: int = 0) -> TaskReport:
    """What a write task wrote of one shard: its kept ``keys`` in a file of their own, ``skipped`` bad samples."""
    rel = f"bucket=b/part-{run_task}-{resume.shard_id(shard)}.parquet"
    (root / "bucket=b").mkdir(exist_ok=True)
    pq.write_table(pa.table({"key": keys}), root / rel)
    return TaskReport(read=len(keys) + skipped, kept=len(keys),
                      buckets={"b": BucketPart(count=len(keys), files=[{"path": rel, "row_groups": [len(keys)]}])},
                      skipped={"corrupt_video": [f"{shard}-bad{i}" for i in range(skipped)]})


def _record(root: Path, run_task: str, shards: dict[str, tuple[list[str], int, int | None]]) -> None:
    """A write task's record: per shard (kept keys, skipped samples, total from the end marker or None)."""
    progress = {shard: resume.ShardProgress(_written(root, run_task, shard, keys, skipped), total)
                for shard, (keys, skipped, total) in shards.items()}
    resume.write_record(str(root / resume.RESUME_DIR / "fp"), run_task, progress)


def test_a_shard_is_done_when_one_runs_records_account_for_all_its_samples(tmp_path: Path) -> None:
    folder = str(tmp_path / resume.RESUME_DIR / "fp")
    # Run A: shard s1 split over two tasks (the end marker went through the first), s2 half written.
    _record(tmp_path, "runa-00000", {"s1": (["k1", "k2"], 1, 4)})
    _record(tmp_path, "runa-00001", {"s1": (["k3"], 0, None), "s2": (["k5"], 0, None)})
    # Run B: the rest of s2 (its first half was run A's): not done, rows of two runs never add up.
    # And s3, finished but no longer listed.
    _record(tmp_path, "runb-00000", {"s2": (["k6"], 0, 2), "s3": (["k7"], 0, 1)})

    done = resume.done_shards(str(tmp_path), folder, ["s1", "s2"])
    assert sorted(done) == ["s1"]
    assert sorted(done["s1"].keys) == ["k1", "k2", "k3"]
    assert (done["s1"].report.read, done["s1"].report.kept, done["s1"].report.buckets["b"].count) == (4, 3, 3)
    assert len(done["s1"].report.buckets["b"].files) == 2

    # A finished shard whose file was cut short is read again.
    path = tmp_path / done["s1"].report.buckets["b"].files[0]["path"]
    path.write_bytes(path.read_bytes()[:20])
    assert resume.done_shards(str(tmp_path), folder, ["s1", "s2"]) == {}
    assert resume.done_shards(str(tmp_path), str(tmp_path / "nothing"), ["s1"]) == {}


def test_end_marker_counts_every_sample_record_of_the_shard() -> None:
    samples = [RawSample("a"), RawSample("b", skip="truncated_shard")]
    marked = list(with_end_marker(iter(samples), "s.tar"))
    assert marked[:2] == samples
    assert (marked[2].skip, marked[2].detail) == (END_OF_SHARD, "2")
    assert list(with_end_marker(iter([]), "e.tar"))[0].detail == "0"


def test_fingerprint_changes_with_what_decides_the_rows_only() -> None:
    from imp_platform.data.pipeline import load_preprocess_config

    base = load_preprocess_config(None, "in", "out")
    same = load_preprocess_config(None, "elsewhere", "out2", ["decode.num_actors=1"])
    other = load_preprocess_config(None, "in", "out", ["limits.max_side=128"])
    assert resume.fingerprint(base, "tok") == resume.fingerprint(same, "tok")
    assert resume.fingerprint(base, "tok") != resume.fingerprint(other, "tok")
    assert resume.fingerprint(base, "tok") != resume.fingerprint(base, "other tokenizer")
