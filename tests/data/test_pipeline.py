"""synth -> preprocess on a real local Ray: manifest counts, uniform shapes per bucket, readable parquet.

The CLI's summary table and a relative output path are covered by tests/data/test_bad_input.py.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from imp_platform.cli import app
from imp_platform.data.buckets import tokens_per_sample
from imp_platform.data.pipeline import bucket_layouts, load_preprocess_config, preprocess
from imp_platform.data.stream import ProcessedDataset


def shard_keys(folder: Path) -> set[str]:
    keys = set()
    for shard in folder.glob("*.tar"):
        with tarfile.open(shard) as tar:
            keys |= {name.split(".", 1)[0] for name in tar.getnames()}
    return keys


@pytest.fixture
def out_dir(processed_root: Path) -> Path:
    """The train split (96 samples) as the session's shared preprocess wrote it."""
    return processed_root / "processed" / "train"


@pytest.fixture
def manifest(out_dir: Path) -> dict:
    return json.loads((out_dir / "manifest.json").read_text())


def test_manifest_counts_every_sample(manifest: dict, synth_shards: dict[str, Path]) -> None:
    assert manifest["total_read"] == 96
    assert manifest["skipped"] == {} and manifest["skipped_examples"] == {}
    assert sum(b["count"] for b in manifest["buckets"]) == manifest["kept"] == 96
    # three native aspect ratios (square, landscape, portrait) give at least three buckets
    assert len(manifest["buckets"]) >= 3
    assert "ReadTarShards" in manifest["stats"] and "DecodeBatches" in manifest["stats"]
    assert manifest["timing"]["seconds"] > 0


def test_buckets_are_uniform_and_readable(manifest: dict, out_dir: Path, synth_shards: dict[str, Path]) -> None:
    cfg = load_preprocess_config(None, str(synth_shards["train"]), str(out_dir))
    dataset = ProcessedDataset.open(str(out_dir))
    layouts = bucket_layouts(cfg)  # what the streaming path expects of each bucket
    seen: list[str] = []
    for entry in manifest["buckets"]:
        files = sorted((out_dir / f"bucket={entry['name']}").glob("*.parquet"))
        assert files and sum(pq.read_metadata(f).num_rows for f in files) == entry["count"]
        assert entry["tokens_per_sample"] == tokens_per_sample(entry["shape"], cfg.patches)
        assert {c: shape for c, (_, shape) in layouts[entry["name"]].items()} == entry["shape"]
        assert set(entry["shape"]) >= {"video", "image", "audio_mel", "text_ids", "text_mask"}
        for batch in dataset.iter_batches(entry["name"], batch_size=7):
            n = len(batch["key"])
            for column, shape in entry["shape"].items():
                assert batch[column].shape == (n, *shape), (entry["name"], column)
            assert batch["video"].dtype == np.uint8 and batch["audio_mel"].dtype == np.float32
            assert batch["text_ids"].dtype == np.int32 and batch["text_mask"].dtype == bool
            assert np.isfinite(batch["audio_mel"]).all()
            assert ((batch["label"] >= 0) & (batch["label"] <= 9)).all()
            assert ((batch["direction"] >= 0) & (batch["direction"] <= 3)).all()
            assert all(batch["text_mask"].sum(axis=1) > 0)
            seen += list(batch["key"])
    assert len(seen) == len(set(seen)) == 96
    assert set(seen) == shard_keys(synth_shards["train"])


def test_missing_source_fails_at_once_with_a_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="source path not found.*no-such-folder"):
        preprocess(load_preprocess_config(None, str(missing), str(tmp_path / "out")))
    result = CliRunner().invoke(app, ["data", "preprocess", "--input", str(missing), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "source path not found" in result.output


def test_prepare_data_leaves_processed_splits_alone(processed_cfg) -> None:
    """A second run finds every split's manifest and preprocesses nothing (and says so)."""
    from imp_platform.train.trainer import prepare_data

    manifest = Path(processed_cfg.data.processed_path(processed_cfg.data.train_split)) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert prepare_data(processed_cfg) is False
    assert manifest.stat().st_mtime_ns == before


def test_decode_object_store_cap_reaches_ray_data(ray_local: None, synth_shards: dict[str, Path], tmp_path: Path) -> None:
    from imp_platform.data.pipeline import decoded_dataset

    capped = load_preprocess_config(None, str(synth_shards["test"]), str(tmp_path), ["decode.object_store_mb=64"])
    limits = decoded_dataset(capped)[0].context.execution_options.resource_limits
    assert limits.object_store_memory == 64 * 2**20 and limits.cpu > 0
    default = load_preprocess_config(None, str(synth_shards["test"]), str(tmp_path), ["decode.object_store_mb=null"])
    assert decoded_dataset(default)[0].context.execution_options.resource_limits.object_store_memory == float("inf")
