"""Training-side access: uniform batches, disjoint ranks, exact resume, eval passes, raw streaming."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from imp_platform.config import ConfigError
from imp_platform.data.pipeline import load_preprocess_config
from imp_platform.data.stream import BucketInfo, ProcessedDataset, raw_bucket_dataset


@pytest.fixture
def dataset(ray_local: None, processed_root: Path) -> ProcessedDataset:
    """The test split (40 samples) as the session's shared preprocess wrote it."""
    return ProcessedDataset.open(str(processed_root / "processed" / "test"))


def biggest(dataset: ProcessedDataset) -> BucketInfo:
    return max(dataset.buckets, key=lambda b: b.count)


def test_stream_batches_are_uniform_and_endless(dataset: ProcessedDataset) -> None:
    assert sum(b.count for b in dataset.buckets) == 40
    for info in dataset.buckets:
        stream = dataset.stream(info.name, batch_size=3, columns=["key", "video", "audio_mel", "text_ids"], seed=0)
        for _ in range(2 * info.count):  # well past one epoch: the stream never ends
            batch = next(stream)
            assert set(batch) == {"key", "video", "audio_mel", "text_ids"}
            for column in ("video", "audio_mel", "text_ids"):
                assert batch[column].shape == (3, *info.shape[column])
        stream.close()


def epoch_keys(dataset: ProcessedDataset, info: BucketInfo, rank: int, world: int, seed: int) -> list[str]:
    """Exactly one epoch of one rank's rows, one row per batch."""
    rows = (rank + 1) * info.count // world - rank * info.count // world
    stream = dataset.stream(info.name, batch_size=1, columns=["key"], rank=rank, world_size=world, seed=seed)
    keys = [str(next(stream)["key"][0]) for _ in range(rows)]
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["offset"] == 0
    return keys


def test_ranks_read_disjoint_rows_that_cover_the_bucket(dataset: ProcessedDataset) -> None:
    info = biggest(dataset)
    all_keys = {str(k) for b in dataset.iter_batches(info.name, 64, ["key"]) for k in b["key"]}
    ranks = [epoch_keys(dataset, info, rank, 2, seed=5) for rank in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert set(ranks[0]) | set(ranks[1]) == all_keys and len(ranks[0]) + len(ranks[1]) == info.count
    # another seed reshuffles, the same seed repeats
    assert epoch_keys(dataset, info, 0, 1, seed=5) == epoch_keys(dataset, info, 0, 1, seed=5)
    assert epoch_keys(dataset, info, 0, 1, seed=5) != epoch_keys(dataset, info, 0, 1, seed=6)


def test_resume_from_state_dict_continues_exactly(dataset: ProcessedDataset) -> None:
    info = biggest(dataset)
    first = dataset.stream(info.name, batch_size=2, rank=1, world_size=2, seed=3, shuffle_window=4)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    expected = [next(first) for _ in range(info.count)]  # crosses epoch boundaries
    resumed = dataset.stream(info.name, batch_size=2, rank=1, world_size=2, seed=3, shuffle_window=4)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert list(got["key"]) == list(want["key"])
        np.testing.assert_array_equal(got["video"], want["video"])
    other = dataset.stream(info.name, batch_size=2, rank=0, world_size=2, seed=3, shuffle_window=4)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)


def _json(state: dict) -> dict:
    return json.loads(json.dumps(state))  # what a checkpoint stores


def _rest_of_epoch(stream) -> list[str]:
    """Keys the stream yields until it enters the next epoch."""
    epoch, keys = stream.state_dict()["epoch"], []
    while stream.state_dict()["epoch"] == epoch:
        keys.append(str(next(stream)["key"][0]))
    return keys


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_reads_no_row_twice_in_the_epoch(
        dataset: ProcessedDataset, old_world: int, new_world: int) -> None:
    info = biggest(dataset)
    every = sorted(str(k) for b in dataset.iter_batches(info.name, 64, ["key"]) for k in b["key"])

    def open_(rank: int, world: int):
        return dataset.stream(info.name, batch_size=1, columns=["key"], rank=rank, world_size=world, seed=4,
                              shuffle_window=2)

    old = [open_(r, old_world) for r in range(old_world)]
    reads = info.count // (2 * old_world)  # half of each old rank's epoch, mid-window
    seen = [str(next(s)["key"][0]) for s in old for _ in range(reads)]
    states = [_json(s.state_dict()) for s in old]
    new = [open_(r, new_world) for r in range(new_world)]
    for stream in new:
        stream.resume(states)
    rests = [_rest_of_epoch(stream) for stream in new]
    assert sorted(seen + [k for rest in rests for k in rest]) == every  # none twice, none lost
    # Saved one row into the inherited epoch and reloaded, a stream continues exactly...
    rank = max(range(new_world), key=lambda r: len(rests[r]))
    moved = open_(rank, new_world)
    moved.resume(states)
    next(moved)
    reloaded = open_(rank, new_world)
    reloaded.load_state_dict(_json(moved.state_dict()))
    assert _rest_of_epoch(reloaded) == rests[rank][1:]
    # ...and the next epoch follows the new world size's own plan.
    fresh = open_(rank, new_world)
    fresh.load_state_dict({**_json(fresh.state_dict()), "epoch": 1})
    assert list(next(reloaded)["key"]) == list(next(fresh)["key"])


def test_views_merge_buckets_by_the_shapes_of_the_columns_read(dataset: ProcessedDataset) -> None:
    by_video = dataset.views(["key", "video"])
    video_shapes = {tuple(b.shape["video"]) for b in dataset.buckets}
    assert sorted(tuple(v.shape["video"]) for v in by_video) == sorted(video_shapes)  # one view per video shape
    assert sum(v.count for v in by_video) == 40 and len(by_video) < len(dataset.buckets)
    view = max(by_video, key=lambda v: v.count)
    parts = [b for b in dataset.buckets if b.shape["video"] == view.shape["video"]]
    assert len(parts) > 1 and view.count == sum(b.count for b in parts)
    # one epoch of the view's stream is exactly its parts' rows, at one video shape
    stream = dataset.stream(view, batch_size=1, columns=["key", "video"], seed=0)
    keys = []
    for _ in range(view.count):
        batch = next(stream)
        assert batch["video"].shape == (1, *view.shape["video"])
        keys.append(str(batch["key"][0]))
    want = {str(k) for b in parts for batch in dataset.iter_batches(b, 64, ["key"]) for k in batch["key"]}
    assert sorted(keys) == sorted(want)
    with pytest.raises(KeyError, match="audio_mel"):
        dataset.stream(view, batch_size=1, columns=["audio_mel"])  # a view holds only its columns

    by_text = dataset.views(["video", "text_ids", "text_mask"])
    for v in by_text:  # text of one length per view: no batch pads a caption
        batch = next(dataset.stream(v, batch_size=1, columns=["text_mask"]))
        assert batch["text_mask"].all() and v.name.endswith(f"_t{v.shape['text_ids'][0]}")
    assert dataset.views(["key"], buckets=[view.name]) == []  # filtered by stored bucket names
    assert len(dataset.views(["key"], buckets=[parts[0].name])) == 1


def test_iter_batches_is_one_finite_pass(dataset: ProcessedDataset) -> None:
    info = biggest(dataset)
    batches = list(dataset.iter_batches(info.name, batch_size=4, columns=["key", "image"]))
    assert [len(b["key"]) for b in batches[:-1]] == [4] * (len(batches) - 1)
    assert sum(len(b["key"]) for b in batches) == info.count
    assert all(b["image"].shape[1:] == tuple(info.shape["image"]) for b in batches)


def test_ray_dataset_and_raw_streaming_match_the_offline_rows(
    dataset: ProcessedDataset, synth_shards: dict[str, Path], tmp_path: Path
) -> None:
    info = biggest(dataset)
    offline = {str(k): v for b in dataset.iter_batches(info.name, 64, ["key", "video"]) for k, v in zip(b["key"], b["video"])}
    ray_batch = dataset.ray_dataset(info.name).take_batch(info.count, batch_format="numpy")
    assert ray_batch["video"].shape == (info.count, *info.shape["video"])
    assert set(map(str, ray_batch["key"])) == set(offline)

    shard = sorted(synth_shards["test"].glob("*.tar"))[0]  # one shard and one actor keep it quick
    with tarfile.open(shard) as tar:
        in_shard = {name.split(".", 1)[0] for name in tar.getnames()} & set(offline)
    cfg = load_preprocess_config(None, str(shard), str(tmp_path), ["decode.num_actors=1"])
    raw = raw_bucket_dataset(cfg, info.name).take_all()
    assert in_shard and {row["key"] for row in raw} == in_shard
    for row in raw:
        np.testing.assert_array_equal(row["video"], offline[row["key"]])


def test_raw_streaming_refuses_an_unknown_bucket(synth_shards: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_preprocess_config(None, str(synth_shards["test"]), str(tmp_path))
    with pytest.raises(ConfigError, match="no bucket 'v1x2x3'"):
        raw_bucket_dataset(cfg, "v1x2x3")
