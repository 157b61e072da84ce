"""The self-training pieces without Ray: the keep filter, kept shards, round configs, the config's checks."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from imp_platform.config import ConfigError
from imp_platform.config.selftrain import KeepFilter, SelfTrainConfig, load_selftrain_config
from imp_platform.selftrain.keep import Kept, keep_mask, select

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["zero", "one", "two"]


def predictions(weak: list[int], captions: list[str | None], predicted: list[int | None],
                scores: list[float | None]) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(len(weak))], "label": pa.array(weak, pa.int64()),
                     "generated_caption": pa.array(captions, pa.string()),
                     "head_cls": pa.array(predicted, pa.int64()), "head_cls_score": pa.array(scores, pa.float32())})


def test_each_check_and_their_combinations():
    weak = np.array([1, 1, 2, -1])
    captions = ["the digit one moves up", "someone moves", "a two", "a one"]
    predicted, scores = np.array([1, 0, 2, 1]), np.array([0.9, 0.9, 0.3, 0.95])

    def mask(**rule):
        return keep_mask(KeepFilter(**rule), weak, captions, predicted, scores, CLASSES).tolist()

    # whole words only ("someone" does not name "one"); no weak label fails the label checks
    assert mask() == [True, False, True, False]
    assert mask(caption_names_label=False, class_agrees=True) == [True, False, True, False]
    assert mask(caption_names_label=False, min_score=0.5) == [True, True, False, True]
    assert mask(min_score=0.5) == [True, False, False, False]
    assert mask(min_score=0.5, combine="any") == [True, True, True, True]
    with pytest.raises(ValueError, match="at least one check"):
        KeepFilter(caption_names_label=False)


def test_select_keeps_the_model_label_and_scores_it_against_known_labels():
    table = predictions([1, 2, -1, 0, 1], ["a one", "a two", "a one", None, "one"], [1, 0, 1, 0, None],
                        [0.9, 0.8, 0.9, 0.9, 0.9])
    kept = select(table, KeepFilter(caption_names_label=False, min_score=0.5), "head_cls", CLASSES)
    # rows without a caption or a prediction are never kept; the label written is the model's
    assert kept.keys == ["k0", "k1", "k2"] and kept.labels == [1, 0, 1]
    assert kept.captions == ["a one", "a two", "a one"]
    assert kept.total == 5 and kept.kept_frac == pytest.approx(0.6)
    assert kept.kept_label_accuracy == pytest.approx(0.5)  # k0 right, k1 wrong, k2 unknown
    assert select(table, KeepFilter(min_score=0.99), "head_cls", CLASSES).kept_label_accuracy is None
    with pytest.raises(KeyError, match="zeroshot_video"):
        select(table, KeepFilter(), "zeroshot_video", CLASSES)


def test_kept_shards_hold_the_media_and_only_the_model_text(synth_shards, tmp_path):
    from imp_platform.config.pipeline import load_pipeline
    from imp_platform.data.tars import read_samples
    from imp_platform.selftrain.shards import write_kept

    with open(synth_shards["test"] / "test-00000.tar", "rb") as fh:
        originals = {s.key: s.members for s in read_samples(fh, "test-00000.tar")}
    keys = sorted(originals)[3:6]
    kept = Kept(keys=keys, captions=["a one", "a two", "a six"], labels=[1, 2, 6], total=40, kept_label_accuracy=None)
    shards = write_kept(str(synth_shards["test"]), kept, load_pipeline(None), tmp_path / "kept", "{}",
                        samples_per_shard=2)
    assert [p.name for p in shards] == ["kept-00000.tar", "kept-00001.tar"]
    assert (tmp_path / "kept" / "tokenizer.json").read_text() == "{}"
    written = {}
    for shard in shards:
        with open(shard, "rb") as fh:
            written.update({s.key: s.members for s in read_samples(fh, str(shard))})
    assert sorted(written) == keys
    for key, caption, label in zip(keys, kept.captions, kept.labels):
        assert json.loads(written[key].pop("json")) == {"caption": caption, "label": label}
        assert written[key] == {ext: data for ext, data in originals[key].items() if ext != "json"}
    with pytest.raises(ValueError, match="not found"):
        write_kept(str(synth_shards["test"]), Kept(["nope"], ["x"], [0], 1, None), load_pipeline(None),
                   tmp_path / "other", "{}", 4)
    with tarfile.open(shards[0]) as tar:  # deterministic members: fixed mtime and mode
        assert {(m.mtime, m.mode) for m in tar} == {(0, 0o644)}


def test_round_configs_train_every_task_on_the_round_split():
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.selftrain.rounds import round_config

    sc = load_selftrain_config(REPO / "jobs/configs/selftrain.yaml")
    base = load_pretrain_config(None, sc.base_overrides)
    r0 = round_config(base, sc, "seed", 0, 7, None)
    r2 = round_config(base, sc, "selftrain-digits-r2", 2, 5, "/ckpt/r1")
    assert sorted(r0.tasks) == sorted(sc.tasks) and {t.split for t in r0.tasks.values()} == {"seed"}
    assert r0.data.train_split == "seed" and r0.run.steps == 7 and r0.model.init_from is None
    assert [s.start for s in r0.agd.curriculum] == [0, 100] and r0.model.moe is False
    assert {t.split for t in r2.tasks.values()} == {"selftrain-digits-r2"} and r2.data.train_split == r2.tasks[
        "video_cls"].split
    assert r2.model.init_from == "/ckpt/r1" and r2.agd.curriculum == [] and r2.run.name == "selftrain-digits-r2"
    assert r2.data.eval_split == "test"


@pytest.mark.parametrize("change, message", [
    ({"predict": "zeroshot_smell"}, "predict"),
    ({"unlabeled_split": "seed"}, "both"),
    ({"predict": "head_nope"}, "names no task"),
    ({"tasks": {"v": {"modalities": ["video"], "objectives": [{"kind": "classification"}]}}}, "caption objective"),
    ({"round0_curriculum": [{"start": 0, "weights": {"nope": 1.0}}]}, "unknown tasks"),
])
def test_config_refuses_what_cannot_run(change, message):
    from imp_platform.config.base import read_yaml

    data = {**read_yaml(REPO / "jobs/configs/selftrain.yaml"), **change}
    with pytest.raises(Exception, match=message):
        SelfTrainConfig.model_validate(data)
    with pytest.raises(ConfigError, match="not found"):
        load_selftrain_config(REPO / "jobs/configs/nope.yaml")


def test_command_and_job_name_a_bad_config(tmp_path):
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    from imp_platform.cli import app

    result = CliRunner().invoke(app, ["selftrain", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "selftrain config not found" in result.output
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "jobs/selftrain.py", "--set", "keep.min_score=2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "keep.min_score" in proc.stderr, proc.stderr[-2000:]
