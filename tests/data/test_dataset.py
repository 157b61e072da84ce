"""The declared dataset: cards, training a tokenizer from shard captions, inspecting a processed corpus."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imp_platform.cli import app
from imp_platform.config.pipeline import DatasetConfig, load_pipeline
from imp_platform.data.dataset import DatasetCard, iter_captions, train_tokenizer
from imp_platform.data.decode import load_tokenizer, tokenize


def _shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


CAPTIONS = {
    "a": {"json": json.dumps({"caption": ["A Red Kite soars", "a bird of prey"], "label": "kite"}).encode()},
    "b": {"txt": b"Waves crash on the ROCKS"},
    "c": {"json": b"{not json"},  # no caption: counted, not fatal
    "d": {"json": json.dumps({"caption": "a kite over rocks"}).encode(), "mp4": b"\x00" * 8},
}


def test_captions_come_from_json_lists_and_txt(tmp_path):
    from imp_platform.data.dataset import CaptionStats

    _shard(tmp_path / "s" / "000.tar", CAPTIONS)
    stats = CaptionStats()
    captions = list(iter_captions([str(tmp_path / "s")], stats=stats))
    assert captions == ["A Red Kite soars", "a bird of prey", "Waves crash on the ROCKS", "a kite over rocks"]
    assert (stats.shards, stats.captions, stats.samples_without_caption) == (1, 4, 1)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_tokenizer_round_trip_pads_with_zero(kind):
    captions = ["a red kite soars over the rocks", "waves crash on the rocks", "a kite and a bird"] * 20
    tokenizer = train_tokenizer(captions, vocab_size=200, kind=kind)
    assert tokenizer.token_to_id("[PAD]") == 0 and tokenizer.token_to_id("[UNK]") == 1
    assert tokenizer.get_vocab_size() <= 200
    ids, mask = tokenize("A RED Kite soars", tokenizer, 12)
    assert ids.dtype.name == "int32" and mask.sum() >= 4 and (ids[~mask] == 0).all() and (ids[mask] > 1).all()
    assert tokenizer.decode(ids[mask].tolist()) == "a red kite soars"  # lower-cased, words whole again


def test_tokenizer_command_writes_a_tokenizer_the_pipeline_loads(tmp_path):
    _shard(tmp_path / "one" / "000.tar", CAPTIONS)
    _shard(tmp_path / "two" / "000.tar", {"e": {"txt": b"a seagull over the waves"}})
    out = tmp_path / "tok" / "tokenizer.json"
    result = CliRunner().invoke(app, ["data", "tokenizer", "--input", str(tmp_path / "one"), "--input",
                                      str(tmp_path / "two"), "--out", str(out), "--vocab-size", "300"])
    assert result.exit_code == 0, result.output
    assert "from 5 captions in 2 shards (1 samples without a caption)" in result.output
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.encode("seagull").tokens == ["seagull"]  # the second input was read too
    missing = CliRunner().invoke(app, ["data", "tokenizer", "--input", str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_tokenizer_reads_s3_shards(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.put_file(str(_shard(tmp_path / "000.tar", CAPTIONS)), "imp-test/tokshards/000.tar")
    from imp_platform.data.dataset import build_tokenizer

    out = "s3://imp-test/tok/tokenizer.json"
    stats = build_tokenizer(["s3://imp-test/tokshards"], out, vocab_size=100, storage_options=s3_server["storage_options"])
    assert stats.captions == 4
    assert load_tokenizer(fs.cat_file("imp-test/tok/tokenizer.json").decode()).token_to_id("[PAD]") == 0


def test_card_reads_a_classes_file_relative_to_the_yaml(tmp_path):
    (tmp_path / "names.txt").write_text("kite\nseagull\n\nrocks\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("source: {paths: [x]}\noutput: {path: y}\nmodalities: {enabled: [text]}\n"
                        "dataset: {classes: names.txt, prompts: ['a photo of a {}']}\n")
    card = DatasetCard.from_config(load_pipeline(pipeline).dataset)  # no base_dir: load_pipeline resolved it
    assert card.classes == ("kite", "seagull", "rocks") and card.num_classes == 3
    texts, owner = card.prompt_texts()
    assert texts[1] == "a photo of a seagull" and owner.tolist() == [0, 1, 2]
    assert DatasetCard.from_manifest({"dataset": {"classes": None, "prompts": ["{}"]}}).num_classes is None
    assert DatasetCard.from_manifest({}) is None
    with pytest.raises(ValueError, match="exactly one"):
        DatasetConfig(prompts=["no placeholder"])


def test_classification_heads_take_the_class_count_from_the_dataset(tmp_path):
    from imp_platform.config import ConfigError
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train.tasks import resolve_model_config

    repo = Path(__file__).resolve().parents[2]
    cfg = load_pretrain_config(None, [f"data.root={tmp_path}", "data.synth=null",
                                      f"data.pipeline={repo / 'pipelines/moving_digits.yaml'}"])
    assert resolve_model_config(cfg).heads == {"image_cls": 10, "video_cls": 10, "audio_cls": 10}  # the YAML's
    train = tmp_path / "processed" / "train"
    train.mkdir(parents=True)
    manifest = train / "manifest.json"
    manifest.write_text(json.dumps({"dataset": {"classes": ["kite", "gull", "heron"], "prompts": ["{}"]}}))
    assert resolve_model_config(cfg).heads["video_cls"] == 3  # the processed split's card wins
    cfg.tasks["video_cls"].num_classes = 4  # an explicit count wins over both
    assert resolve_model_config(cfg).heads == {"image_cls": 3, "video_cls": 4, "audio_cls": 3}
    manifest.write_text(json.dumps({"dataset": {"classes": None, "prompts": ["{}"]}}))
    with pytest.raises(ConfigError, match="tasks.image_cls: set num_classes"):
        resolve_model_config(cfg)


def test_inspect_prints_the_manifest_counts_and_draws_a_contact_sheet(processed_root, tmp_path):
    from imp_platform.data.inspection import inspect

    cards, sheets = inspect(str(processed_root / "processed"), tmp_path / "out", per_bucket=1)
    manifests = {s: json.loads((processed_root / "processed" / s / "manifest.json").read_text()) for s in ("test", "train")}
    assert [c.split for c in cards] == ["test", "train"]
    for card in cards:
        manifest = manifests[card.split]
        assert card.per_bucket == {b["name"]: b["count"] for b in manifest["buckets"]}
        assert sum(card.per_class.values()) == card.kept == manifest["kept"]
        assert card.processed_bytes > 0
    result = CliRunner().invoke(app, ["data", "inspect", str(processed_root / "processed" / "test"),
                                      "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "split test" in result.output and f"{manifests['test']['kept']} samples kept" in result.output
    for bucket in manifests["test"]["buckets"]:
        assert f"{bucket['name']}  {bucket['count']}" in result.output
    assert all(p.stat().st_size > 10_000 for p in sheets) and (tmp_path / "cli" / "contact_sheet_test.png").exists()


@pytest.mark.parametrize(("name", "classes"), [("audio", 50), ("image_text", None), ("video_text", None)])
def test_templates_declare_their_dataset(name, classes):
    repo = Path(__file__).resolve().parents[2]
    card = DatasetCard.from_config(load_pipeline(repo / "pipelines" / "templates" / f"{name}.yaml").dataset)
    assert card.num_classes == classes and card.prompts


def test_readme_own_corpus_section_yaml_validates_and_commands_exist():
    """The YAML a user copies from "Train on your own corpus" is valid, and each command it runs exists."""
    import re

    import yaml

    from imp_platform.config import validate
    from imp_platform.config.base import parse_override
    from imp_platform.config.pipeline import PipelineConfig
    from imp_platform.config.train import PretrainConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Train on your own corpus", 1)[1].split("\n## ", 1)[0]
    pipeline_yaml, run_yaml = (yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S))
    pipeline = validate(PipelineConfig, pipeline_yaml, "README pipeline")
    assert pipeline.dataset.class_names() == ["kite", "seagull", "heron"]
    cfg = validate(PretrainConfig, run_yaml, "README run config")
    assert cfg.tasks["video_cls"].num_classes is None and cfg.data.synth is None
    commands = re.findall(r"^platform (.+?)(?: \\)?$", re.findall(r"```bash\n(.*?)```", section, re.S)[0], re.M)
    assert len(commands) == 6
    for command in commands:
        words = command.split()
        sub = words[:2] if words[0] == "data" else words[:1]
        result = CliRunner().invoke(app, [*sub, "--help"])
        assert result.exit_code == 0, (command, result.output)
        for option in (w for w in words if w.startswith("--")):
            assert option in result.output, (command, option)
    assert parse_override("source.paths=[data/birds/train]") == (["source", "paths"], ["data/birds/train"])


def test_a_run_finds_card_and_tokenizer_in_the_processed_split_first(tmp_path):
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.data.dataset import load_card, read_tokenizer

    repo = Path(__file__).resolve().parents[2]
    cfg = load_pretrain_config(None, [f"data.root={tmp_path}", "data.synth=null",
                                      f"data.pipeline={repo / 'pipelines/moving_digits.yaml'}"])
    assert load_card(cfg, "test").num_classes == 10  # nothing processed yet: the pipeline YAML's card
    split = tmp_path / "processed" / "test"
    split.mkdir(parents=True)
    (split / "manifest.json").write_text(json.dumps({"dataset": {"classes": ["x", "y"], "prompts": ["{} here"]}}))
    assert load_card(cfg, "test") == DatasetCard(("x", "y"), ("{} here",))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "tokenizer.json").write_text("raw")
    assert read_tokenizer(cfg, "test") == "raw"
    (split / "tokenizer.json").write_text("processed copy")
    assert read_tokenizer(cfg, "test") == "processed copy"
