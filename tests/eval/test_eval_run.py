"""Eval on real processed data: a corpus without classes, the held-out prompts, a checkpoint's outputs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch


def test_no_classes_skips_zero_shot_but_reports_retrieval(processed_root, processed_cfg, tmp_path, caplog):
    from imp_platform.eval.zeroshot import HeldOut
    from imp_platform.model import build_model
    from imp_platform.model.presets import preset

    split = tmp_path / "processed" / "test"
    shutil.copytree(processed_root / "processed" / "test", split)
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["dataset"] = {"classes": None, "prompts": ["{}"]}
    (split / "manifest.json").write_text(json.dumps(manifest))
    cfg = processed_cfg.model_copy(deep=True)
    cfg.data.root = str(tmp_path)
    with caplog.at_level(logging.INFO, logger="imp_platform.eval.zeroshot"):
        held = HeldOut.open(cfg)
    assert held.prompts is None
    assert any("zero-shot skipped" in r.getMessage() for r in caplog.records)
    torch.manual_seed(0)
    result = held.run(build_model(preset("tiny", moe=False)).eval())
    assert not any(k.startswith("zeroshot_") for k in result.metrics) and not result.confusion
    for pair in ("video_text", "audio_text", "video_audio"):
        for suffix in ("r1", "r5", "r1_semantic", "r5_semantic"):
            assert 0.0 <= result.metrics[f"retrieval_{pair}_{suffix}"] <= 1.0, (pair, suffix)
        # a pair is always in its own group, so semantic recall can only be higher
        assert result.metrics[f"retrieval_{pair}_r1_semantic"] >= result.metrics[f"retrieval_{pair}_r1"]


def test_held_out_prompts_fit_the_longest_stored_caption_length(processed_cfg):
    from imp_platform.eval.zeroshot import HeldOut

    held = HeldOut.open(processed_cfg)
    lengths = {b.shape["text_ids"][0] for b in held.dataset.buckets if "text_ids" in b.shape}
    assert len(lengths) > 1  # captions of several lengths: prompts must not take the first bucket's
    ids, mask, classes = held.prompts
    assert ids.shape == (10 * 20, max(lengths)) and sorted(set(classes.tolist())) == list(range(10))
    assert mask.sum(axis=1).max() == max(lengths)  # the longest prompts are kept whole, not truncated
    assert (ids[mask] > 1).all()  # no [PAD]/[UNK] inside a prompt: the caption vocabulary covers it


def test_eval_of_a_checkpoint_keeps_the_confusion_and_semantic_recall(trained_checkpoint, tmp_path):
    from imp_platform.eval.run import evaluate_checkpoint

    out = evaluate_checkpoint(trained_checkpoint, tmp_path / "eval", max_samples=24)
    metrics = json.loads(Path(out.metrics_path).read_text())
    confusion = metrics["zeroshot_video_confusion"]
    assert len(confusion) == 10 and all(len(row) == 10 for row in confusion)
    assert sum(map(sum, confusion)) == 24  # every held-out clip is labelled
    diagonal = sum(confusion[i][i] for i in range(10))
    assert abs(diagonal / 24 - metrics["zeroshot_video_top1"]) < 1e-6
    assert metrics["num_classes"] == 10
    assert metrics["retrieval_video_text_r1_semantic"] >= metrics["retrieval_video_text_r1"]
    assert out.report_path.stat().st_size > 10_000
