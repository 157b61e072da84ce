"""The same pipeline reads shards from and writes output to s3:// (moto server, through s3fs)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import s3fs

from imp_platform.data.pipeline import load_preprocess_config, preprocess
from imp_platform.data.stream import ProcessedDataset


def test_preprocess_reads_and_writes_s3(ray_local: None, s3_server: dict, synth_shards: dict[str, Path]) -> None:
    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    bucket = s3_server["bucket"]
    shard = sorted(synth_shards["test"].glob("*.tar"))[0]  # one shard keeps the test fast
    fs.put(str(shard), f"{bucket}/raw/test/{shard.name}")
    with tarfile.open(shard) as tar:
        samples = len({name.split(".", 1)[0] for name in tar.getnames()})
    fs.put(str(synth_shards["root"] / "tokenizer.json"), f"{bucket}/raw/tokenizer.json")

    cfg = load_preprocess_config(None, f"s3://{bucket}/raw/test", f"s3://{bucket}/processed/test", ["decode.num_actors=1"])
    cfg.source.storage_options = options
    cfg.output.storage_options = options
    manifest = preprocess(cfg)

    assert manifest["total_read"] == manifest["kept"] == samples and manifest["skipped"] == {}
    written = fs.ls(f"{bucket}/processed/test")
    assert f"{bucket}/processed/test/manifest.json" in written
    assert {p.rsplit("/", 1)[-1] for p in written} >= {f"bucket={b['name']}" for b in manifest["buckets"]}

    dataset = ProcessedDataset.open(f"s3://{bucket}/processed/test", storage_options=options)
    assert sum(b.count for b in dataset.buckets) == samples
    info = max(dataset.buckets, key=lambda b: b.count)
    batch = next(dataset.stream(info.name, batch_size=2, columns=["key", "video"], seed=0))
    assert batch["video"].shape == (2, *info.shape["video"])
    assert dataset.ray_dataset(info.name).count() == info.count
