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
    assert "ReadTarShards" in manifest["stats"] and "MapBatches(decode_batch)" in manifest["stats"]
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
            assert {json.loads(m)["direction"] for m in batch["meta"]} <= {"left", "right", "up", "down"}
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


def test_dataset_card_and_tokenizer_copy(tmp_path: Path, synth_shards: dict[str, Path]) -> None:
    from imp_platform.data.pipeline import dataset_card, resolve_tokenizer, write_tokenizer

    cfg = load_preprocess_config(None, str(synth_shards["test"]), str(tmp_path / "out"))
    card = dataset_card(cfg)
    assert card["classes"][3] == "three" and len(card["classes"]) == 10 and all("{}" in p for p in card["prompts"])
    tokenizer = resolve_tokenizer(cfg, [str(p) for p in synth_shards["test"].glob("*.tar")])
    write_tokenizer(cfg, cfg.output.path, tokenizer)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (synth_shards["root"] / "tokenizer.json").read_text()


def test_decode_object_store_cap_reaches_ray_data(ray_local: None, synth_shards: dict[str, Path], tmp_path: Path) -> None:
    from imp_platform.data.pipeline import decoded_dataset

    capped = load_preprocess_config(None, str(synth_shards["test"]), str(tmp_path), ["decode.object_store_mb=64"])
    limits = decoded_dataset(capped)[0].context.execution_options.resource_limits
    assert limits.object_store_memory == 64 * 2**20
    default = load_preprocess_config(None, str(synth_shards["test"]), str(tmp_path), ["decode.object_store_mb=null"])
    assert decoded_dataset(default)[0].context.execution_options.resource_limits.object_store_memory == float("inf")


def test_decode_compute_strategy_follows_the_config(ray_local: None, synth_shards: dict[str, Path], tmp_path: Path) -> None:
    """Decode tasks are capped by their concurrency, not a CPU budget (under one Ray Data ran
    one decode task at a time); an actor pool keeps the budget that leaves room for the I/O tasks."""
    from imp_platform.data.pipeline import decoded_dataset

    plans = {}
    for compute in ("tasks", "actors"):
        cfg = load_preprocess_config(None, str(synth_shards["test"]), str(tmp_path), [f"decode.compute={compute}"])
        ds = decoded_dataset(cfg)[0]
        plans[compute] = (type(ds._logical_plan.dag.compute).__name__, ds.context.execution_options.resource_limits.cpu)
    assert plans["tasks"] == ("TaskPoolStrategy", float("inf"))
    assert plans["actors"][0] == "ActorPoolStrategy" and 0 < plans["actors"][1] < float("inf")


def test_auto_compute_starts_an_actor_pool_only_for_a_large_input() -> None:
    from imp_platform.data.pipeline import decode_compute

    decode = load_preprocess_config(None, "in", "out", ["decode.actors_from_mb=256"]).decode
    assert decode.compute == "auto"
    assert decode_compute(decode, 6 * 2**20) == "tasks"  # a 42-sample corpus: the actors' start-up would dominate
    assert decode_compute(decode, 256 * 2**20) == "actors"
    assert decode_compute(decode.model_copy(update={"compute": "tasks"}), 2**40) == "tasks"


def test_shapes_corpus_through_yaml_only(ray_local: None, shapes_corpus: dict[str, Path], tmp_path: Path) -> None:
    """The second corpus (labels by name, caption lists, five containers, soundtrack-only audio) preprocessed
    with its YAML: every sample kept, labels resolved by name, what was decoded is what was drawn, and
    with ``text.max_captions=3`` every caption of a sample (two or three) is stored tokenized."""
    from realworld import CLASSES, PIPELINE_YAML, SAMPLES_PER_SHARD

    from imp_platform.data.dataset import iter_captions, train_tokenizer
    from imp_platform.data.decode import load_tokenizer, tokenize

    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer(iter_captions([str(shapes_corpus["train"])]), vocab_size=200).save(str(tokenizer))
    cfg = load_preprocess_config(PIPELINE_YAML, str(shapes_corpus["train"]), str(tmp_path / "out"),
                                 [f"text.tokenizer={tokenizer}", "text.max_captions=3"])
    manifest = preprocess(cfg)
    assert manifest["skipped"] == {} and manifest["kept"] == 24 == 3 * SAMPLES_PER_SHARD
    dataset = ProcessedDataset.open(str(tmp_path / "out"))
    rows, pitch_bins, per_sample = 0, {name: [] for name in CLASSES}, []
    tok = load_tokenizer(str(tokenizer))
    for info in dataset.buckets:
        for batch in dataset.iter_batches(info.name, batch_size=32):
            for i, meta in enumerate(map(json.loads, batch["meta"])):
                name = CLASSES[batch["label"][i]]
                assert name in batch["caption"][i] and meta["source"] == "shapes-test"
                ids, mask = batch["captions_ids"][i], batch["captions_mask"][i]
                per_sample.append(int(mask.any(-1).sum()))
                assert per_sample[-1] == len(meta["captions"])
                for k, caption in enumerate(meta["captions"]):
                    want = tokenize(caption, tok, ids.shape[-1])
                    assert (ids[k] == want[0]).all() and (mask[k] == want[1]).all()
                assert (batch["text_ids"][i] == ids[0]).all()
                assert dominant_colour(batch["video"][i]) == dominant_colour(batch["image"][i]) == name
                pitch_bins[name].append(int(batch["audio_mel"][i].mean(axis=0).argmax()))
                rows += 1
    assert rows == 24 and sorted(set(per_sample)) == [2, 3]
    lowest, highest = [min(pitch_bins[n]) for n in CLASSES], [max(pitch_bins[n]) for n in CLASSES]
    assert all(h < lo for h, lo in zip(highest, lowest[1:], strict=False)), pitch_bins  # each colour's tone, in pitch order


def dominant_colour(pixels: np.ndarray) -> str:
    """The class colour nearest the mean of the saturated pixels (the shape; the background is grey)."""
    from realworld import COLOURS

    flat = pixels.reshape(-1, 3).astype(float)
    shape = flat[flat.max(axis=1) - flat.min(axis=1) > 60].mean(axis=0)
    return min(COLOURS, key=lambda c: np.linalg.norm(shape - np.array(COLOURS[c])))



def _buckets_by_key(out: Path, column: str = "video") -> dict[str, list[list[int]]]:
    """Each key's stored ``column`` shapes, one per row it has in any bucket."""
    dataset = ProcessedDataset.open(str(out))
    shapes: dict[str, list[list[int]]] = {}
    for info in dataset.buckets:
        for batch in dataset.iter_batches(info.name, 64, ["key"]):
            for key in batch["key"]:
                shapes.setdefault(str(key), []).append(info.shape[column])
    return shapes


def test_all_fitting_writes_each_sample_at_several_resolutions(ray_local: None, synth_shards: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """``video.resolutions: all_fitting``: every sample lands in each bucket its native shape allows
    (checked against the header of its mp4), and the manifest counts samples and rows apart."""
    from imp_platform.data.buckets import pick_video_buckets
    from imp_platform.data.decode import probe_video

    cfg = load_preprocess_config(None, str(synth_shards["test"]), str(tmp_path / "out"), [
        "video.buckets=[[8,32,32],[8,48,48],[4,32,32],[8,32,56],[8,56,32]]", "video.resolutions=all_fitting"])
    expected: dict[str, list[list[int]]] = {}
    for shard in synth_shards["test"].glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in (m for m in tar.getmembers() if m.name.endswith(".mp4")):
                info = probe_video(tar.extractfile(member).read())
                sizes = pick_video_buckets(info.height, info.width, info.duration_s, cfg.video.buckets,
                                           info.fps, cfg.bucket_policy.duration, cfg.video.resolutions)
                expected[member.name.split(".", 1)[0]] = sorted([t, h, w, 3] for t, h, w in sizes)
    manifest = preprocess(cfg)
    stored = {key: sorted(shapes) for key, shapes in _buckets_by_key(tmp_path / "out").items()}
    assert stored == expected
    assert max(len(v) for v in stored.values()) >= 3  # square clips: 48x48, 32x32 and 4-frame 32x32
    assert manifest["skipped"] == {} and manifest["total_read"] == manifest["kept"] == len(expected) == 40
    rows = sum(len(v) for v in expected.values())
    assert manifest["rows_written"] == sum(b["count"] for b in manifest["buckets"]) == rows > manifest["kept"]


def test_image_all_fitting_writes_each_image_at_several_resolutions(ray_local: None, shapes_corpus: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """``image.resolutions: all_fitting`` (image-only, shapes corpus): every image lands in each bucket
    its native size allows, the same picture at each, and the manifest counts samples and rows apart."""
    from realworld import IMAGE_EXTS, PIPELINE_YAML

    from imp_platform.data.buckets import pick_image_buckets
    from imp_platform.data.decode import probe_image

    cfg = load_preprocess_config(PIPELINE_YAML, str(shapes_corpus["test"]), str(tmp_path / "out"), [
        "modalities.enabled=[image]", "modalities.required=[image]", "image.resolutions=all_fitting",
        "image.buckets=[[16,16],[32,32],[48,48],[32,56],[56,32]]"])
    expected: dict[str, list[list[int]]] = {}
    for shard in shapes_corpus["test"].glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in (m for m in tar.getmembers() if m.name.rsplit(".", 1)[-1] in IMAGE_EXTS):
                size = probe_image(tar.extractfile(member).read())
                sizes = pick_image_buckets(*size, cfg.image.buckets, cfg.image.resolutions)
                expected[member.name.split(".", 1)[0]] = sorted([h, w, 3] for h, w in sizes)
    manifest = preprocess(cfg)
    stored = {key: sorted(shapes) for key, shapes in _buckets_by_key(tmp_path / "out", "image").items()}
    assert stored == expected
    assert max(len(v) for v in stored.values()) == 3  # 48x48 images: 48, 32 and 16 square
    assert manifest["skipped"] == {} and manifest["kept"] == len(expected) == 16
    assert manifest["rows_written"] == sum(len(v) for v in expected.values()) > manifest["kept"]
    dataset, colours = ProcessedDataset.open(str(tmp_path / "out")), {}
    for info in dataset.buckets:
        for batch in dataset.iter_batches(info.name, 64, ["key", "image"]):
            for key, pixels in zip(batch["key"], batch["image"], strict=True):
                colours.setdefault(str(key), set()).add(dominant_colour(pixels))
    assert all(len(c) == 1 for c in colours.values())  # one picture at every resolution
