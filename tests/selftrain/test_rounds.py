"""One real self-training round of the shipped jobs/configs/selftrain.yaml on tiny sizes.

Round 0 trains on a 32-clip seed shard, infers on a 32-clip unlabelled shard (Ray Data), keeps,
writes shards, preprocesses seed + kept and fine-tunes round 1 from round 0's checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def selftrain_root(synth_shards: dict[str, Path], processed_root: Path, root: Path) -> Path:
    """``root/raw/{seed,unlabeled}``: one train shard each (copies: symlinked shards are not listed);
    the held-out split is the session's processed test split."""
    for split, shard in (("seed", "train-00000.tar"), ("unlabeled", "train-00001.tar")):
        (root / "raw" / split).mkdir(parents=True)
        shutil.copy(synth_shards["train"] / shard, root / "raw" / split / shard)
    shutil.copy(synth_shards["root"] / "tokenizer.json", root / "raw" / "tokenizer.json")
    (root / "processed").mkdir()
    (root / "processed" / "test").symlink_to(processed_root / "processed" / "test", target_is_directory=True)
    return root


def test_one_round_keeps_writes_preprocesses_and_fine_tunes(synth_shards, processed_root, tiny_overrides, ray_local,
                                                             tmp_path):
    from imp_platform.config.selftrain import load_selftrain_config
    from imp_platform.data.manifest import read
    from imp_platform.selftrain.rounds import PLOT_NAME, RESULT_NAME, run_selftrain
    from imp_platform.train.checkpoint import load_run_config

    root = selftrain_root(synth_shards, processed_root, tmp_path / "data")
    base = [s for s in tiny_overrides if not s.startswith("tasks.")]
    sc = load_selftrain_config(REPO / "jobs/configs/selftrain.yaml", [
        f"base_overrides={json.dumps([*base, f'data.root={root}', 'data.eval_split=test', 'run.num_workers=1'])}",
        "rounds=1", "round0_steps=4", "steps_per_round=2", "round0_curriculum=[]", "infer_batch_size=16",
        "caption_max_len=4", "samples_per_shard=5",
        "tasks.video_caption.token_budget=768", "tasks.video_cls.token_budget=384",
        # a 4-step model names no digit yet: keep the clips whose predicted class is their weak label
        "keep.caption_names_label=false", "keep.class_agrees=true", "keep.min_score=null",
    ])
    result = run_selftrain(sc, tmp_path / "out")

    r0, r1 = result["rounds"]
    assert r0["inferred"] == r1["inferred"] == 32
    parts = [pq.read_table(f) for f in sorted((tmp_path / "out" / "round-0" / "predictions").glob("part-*"))]
    agree = [int(predicted == weak) for t in parts
             for predicted, weak in zip(t.column("head_video_cls").to_pylist(), t.column("label").to_pylist())]
    assert len(agree) == 32 and 0 < r0["kept"] == sum(agree) < 32, r0
    assert r0["kept_label_accuracy"] == 1.0  # kept labels agree with the weak labels, which are the truth here
    # The kept clips as shards: exactly the kept count, the model's caption and label in place of the truth.
    written = []
    for shard in r0["kept_shards"]:
        with tarfile.open(shard) as tar:
            written += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert len(written) == r0["kept"] and len(r0["kept_shards"]) == -(-r0["kept"] // 5)
    assert all(set(meta) == {"caption", "label"} for meta in written)
    # Round 1 trained on seed + kept, preprocessed by the pipeline, from round 0's checkpoint.
    manifest = read(str(root / "processed" / f"{sc.name}-r1" / "manifest.json"))
    assert manifest["kept"] == r1["train_samples"] == 32 + r0["kept"]
    assert load_run_config(r1["checkpoint"]).model.init_from == r0["checkpoint"]
    assert r1["kept_shards"] == []  # the last round only measures
    for row in (r0, r1):
        assert 0.0 <= row["heldout_top1"] <= 1.0 and "caption_token_accuracy" in row
    saved = json.loads((tmp_path / "out" / RESULT_NAME).read_text())
    assert [sorted({"kept_frac", "kept_label_accuracy", "heldout_top1"} & set(r)) for r in saved["rounds"]] == [
        ["heldout_top1", "kept_frac", "kept_label_accuracy"]] * 2
    assert (tmp_path / "out" / PLOT_NAME).stat().st_size > 10_000
