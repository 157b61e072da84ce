"""`platform infer`: Ray Data batch inference of a trained checkpoint over raw shards and a processed split.

Raw shards: one row per good sample, a corrupt sample skipped and counted as preprocess counts it,
the same bytes on a second run. Processed split, eval's batch size: the zero-shot predictions are
the held-out eval's, sample for sample. The model step alone and the refusals need no Ray.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from imp_platform.cli import app

CORRUPT_KEY = "corrupt-0000"


def read_parts(out: Path):
    return pq.read_table(sorted(out.glob("part-*.parquet")))


def corrupt_shard(source: Path, path: Path) -> None:
    """A shard holding one sample: the first of ``source`` under a new key, its video replaced by junk."""
    with tarfile.open(source) as tar:
        infos = tar.getmembers()
        key = infos[0].name.split(".", 1)[0]
        members = {i.name.split(".", 1)[1]: tar.extractfile(i).read() for i in infos if i.name.startswith(key + ".")}
    members["mp4"] = bytes(range(256)) * 40
    with tarfile.open(path, "w") as tar:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{CORRUPT_KEY}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_raw_shards_keep_every_good_sample_count_the_corrupt_one_and_repeat_exactly(
        trained_checkpoint, synth_shards, ray_local, tmp_path):
    from imp_platform.infer.batch import infer_config, run_inference

    shards = tmp_path / "shards"
    shards.mkdir()
    good = sorted(synth_shards["test"].glob("*.tar"))[0]
    shutil.copy(good, shards / good.name)  # a copy: the shard listing skips symlinks
    corrupt_shard(good, shards / "zz-corrupt.tar")
    (shards.parent / "tokenizer.json").symlink_to(synth_shards["root"] / "tokenizer.json")
    with tarfile.open(good) as tar:
        good_keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))  # in shard order

    args = ["--checkpoint", trained_checkpoint, "--input", str(shards), "--set", "decode.num_actors=1"]
    result = CliRunner().invoke(app, ["infer", *args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert f"rows written: {len(good_keys)} of {len(good_keys) + 1} read" in result.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["kept"] == summary["rows_written"] == len(good_keys)
    assert summary["skipped"] == {"corrupt_video": 1} and summary["skipped_examples"] == {"corrupt_video": [CORRUPT_KEY]}
    assert summary["total_read"] == len(good_keys) + 1

    table = read_parts(tmp_path / "a")
    assert table.column("key").to_pylist() == good_keys  # one row per good sample, in input order
    for modality in ("video", "audio_mel", "text", "image"):
        assert np.asarray(table.column(f"pooled_{modality}").to_pylist()).shape == (len(good_keys), 96)
        common = np.asarray(table.column(f"common_{modality}").to_pylist())
        assert common.shape == (len(good_keys), 128) and np.allclose(np.linalg.norm(common, axis=1), 1, atol=1e-4)
    for modality in ("video", "audio_mel", "image"):
        assert set(table.column(f"zeroshot_{modality}").to_pylist()) <= set(range(10))
        scores = np.asarray(table.column(f"zeroshot_{modality}_score").to_pylist())
        assert ((scores >= 0.1 - 1e-6) & (scores <= 1)).all()  # the top of 10 softmax probabilities
    assert "zeroshot_text" not in table.column_names and "skip_kind" not in table.column_names

    again = run_inference(infer_config(trained_checkpoint, str(shards), str(tmp_path / "b"),
                                       overrides=["decode.num_actors=1"]))
    assert [f["path"] for f in again["files"]] == [f["path"] for f in summary["files"]]
    for part in summary["files"]:  # same seed, same bytes
        assert (tmp_path / "a" / part["path"]).read_bytes() == (tmp_path / "b" / part["path"]).read_bytes()


@pytest.mark.slow
def test_zero_shot_on_a_processed_split_matches_the_held_out_eval(trained_checkpoint, processed_root, ray_local,
                                                                   tmp_path, s3_server):
    import s3fs
    import torch

    from imp_platform.eval.zeroshot import HeldOut, class_space, encode_prompts, text_space
    from imp_platform.infer.batch import infer_config, run_inference
    from imp_platform.train.checkpoint import load_model, load_run_config

    split = processed_root / "processed" / "test"
    summary = run_inference(infer_config(trained_checkpoint, str(split), str(tmp_path / "out"),
                                         what="zeroshot", batch_size=8))
    table = read_parts(tmp_path / "out")
    assert summary["input_kind"] == "processed" and table.num_rows == summary["kept"] == 40
    assert not any(c.startswith(("pooled_", "common_")) for c in table.column_names)  # embed was not asked for

    cfg = load_run_config(trained_checkpoint)
    cfg.eval.batch_size, cfg.eval.max_samples = 8, None  # the same batches: Expert Choice sees the same batch mates
    held = HeldOut.open(cfg)
    model, _ = load_model(trained_checkpoint)
    feats = held.embed(model)
    with torch.no_grad():
        text = encode_prompts(model, held.prompts, 8, torch.device("cpu"))
        classes = class_space(model, text, held.prompts[2], 10, "video")
        expected = (text_space(model, feats.pooled["video"], "video") @ classes.T).argmax(-1).numpy()
    assert table.column("label").to_pylist() == feats.labels.tolist()  # the eval's order, row for row
    assert table.column("zeroshot_video").to_pylist() == expected.tolist()

    # The same checkpoint on S3 (read with the config's storage_options) predicts the same
    s3fs.S3FileSystem(**s3_server["storage_options"]).put(trained_checkpoint, "imp-test/ckpt", recursive=True)
    remote = run_inference(infer_config("s3://imp-test/ckpt", str(split), str(tmp_path / "s3"), what="zeroshot",
                                        batch_size=8, storage_options=s3_server["storage_options"]))
    assert remote["checkpoint"] == "s3://imp-test/ckpt"
    assert read_parts(tmp_path / "s3").equals(table)
    with pytest.raises(FileNotFoundError, match="s3://imp-test/missing"):
        run_inference(infer_config("s3://imp-test/missing", str(split), str(tmp_path / "none"), what="zeroshot",
                                   storage_options=s3_server["storage_options"]))


def export(folder: Path, **overrides) -> str:
    """A random tiny model exported as model.safetensors + config.json (no run config)."""
    from imp_platform.model import build_model
    from imp_platform.model.io import save_pretrained
    from imp_platform.model.presets import preset

    cfg = preset("tiny", **overrides)
    return str(save_pretrained(build_model(cfg), cfg, folder))


@pytest.fixture
def exported(tmp_path) -> str:
    return export(tmp_path / "exported")


def views(rng: np.random.Generator, key: str, sizes: list[tuple[int, int]]) -> list:
    """One sample's decoded rows as the decode step makes them: one per video size, the rest shared."""
    from imp_platform.data.decode import DecodedSample

    text = {"text_ids": np.arange(2, 7, dtype=np.int32), "text_mask": np.ones(5, dtype=bool)}
    return [DecodedSample(key, f"v{h}x{w}", {}, {"label": 3, "caption": "c", "meta": "{}", **text,
                                                "video": rng.integers(0, 256, (8, h, w, 3), dtype=np.uint8)})
            for h, w in sizes]


@pytest.mark.parametrize(("what", "message"), [
    ("classify", "needs a run checkpoint"),
    ("caption", "has no text decoder"),
    ("embed,colour", "what.1"),
])
def test_what_the_model_cannot_give_is_refused_before_any_work(exported, tmp_path, what, message):
    result = CliRunner().invoke(app, ["infer", "--checkpoint", exported, "--input", str(tmp_path / "none"),
                                      "--out", str(tmp_path / "out"), "--what", what])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_missing_checkpoint_is_named(tmp_path):
    result = CliRunner().invoke(app, ["infer", "--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"checkpoint not found: {tmp_path / 'nope'}" in result.output


def test_the_model_step_keeps_one_row_per_sample_and_leaves_a_skipped_one_empty(exported):
    """Packed decode rows as the preprocess decode step makes them: a sample written at two video
    resolutions, a skip record, another sample. No Ray: the actor's callable on one batch."""
    import torch

    from imp_platform.data.pipeline import Skipped, _pack
    from imp_platform.infer.predictor import Predictor, PredictorSpec
    from imp_platform.train.checkpoint import load_model
    from imp_platform.train.tasks import encode

    rng = np.random.default_rng(0)
    first = views(rng, "a", [(32, 32), (32, 56)])
    batch = _pack([first, Skipped("b", "corrupt_video", "junk bytes"), views(rng, "c", [(32, 56)])])
    spec = PredictorSpec(checkpoint=exported, what=("embed",), modalities=("video", "text"), batch_size=4, seed=0)
    table = Predictor(spec)(batch)
    assert table.column("key").to_pylist() == ["a", "b", "c"]
    assert table.column("skip_kind").to_pylist() == ["", "corrupt_video", ""]
    assert table.column("skip_detail").to_pylist() == ["", "junk bytes", ""]
    assert table.column("bucket").to_pylist() == ["v32x32", None, "v32x56"]
    assert table.column("label").to_pylist() == [3, -1, 3]
    video = table.column("pooled_video").to_pylist()
    assert video[1] is None and table.column("pooled_text").to_pylist()[1] is None
    model, _ = load_model(exported)
    with torch.no_grad():  # the first view, alone in its shape group: exactly its own forward
        alone = encode(model, "video", {"video": first[0].row["video"][None]}, torch.device("cpu")).pooled
    np.testing.assert_allclose(video[0], alone[0].numpy(), rtol=1e-5, atol=1e-6)


def test_captions_come_from_the_decoder_for_every_good_sample(tmp_path):
    import torch

    from imp_platform.data.dataset import train_tokenizer
    from imp_platform.data.pipeline import Skipped, _pack
    from imp_platform.infer.predictor import Predictor, PredictorSpec
    from imp_platform.model.generate import generate, ids_to_text
    from imp_platform.train.checkpoint import load_model

    torch.manual_seed(0)
    checkpoint = export(tmp_path / "coca", decoder={"enabled": True})
    tokenizer = train_tokenizer(["the digit one moves left", "a handwritten two moving up"], vocab_size=64)
    rng = np.random.default_rng(1)
    first, second = views(rng, "a", [(32, 32)]), views(rng, "c", [(32, 32)])
    batch = _pack([first, Skipped("b", "corrupt_video", "junk"), second])
    spec = PredictorSpec(checkpoint=checkpoint, what=("caption",), modalities=("video", "text"), batch_size=4,
                         seed=0, tokenizer_json=tokenizer.to_str(), caption_max_len=6)
    table = Predictor(spec)(batch)
    assert table.column_names == ["key", "bucket", "label", "skip_kind", "skip_detail", "generated_caption"]
    captions = table.column("generated_caption").to_pylist()
    model, _ = load_model(checkpoint)
    clips = torch.as_tensor(np.stack([first[0].row["video"], second[0].row["video"]])).float() / 255
    expected = ids_to_text(generate(model, "video", clips, max_len=6), tokenizer)
    assert captions == [expected[0], None, expected[1]]
