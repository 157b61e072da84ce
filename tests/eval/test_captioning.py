"""Captioning metrics by hand; ``platform caption`` over a processed split end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from imp_platform.eval.captioning import CaptionRow, caption_metrics


def test_caption_metrics_match_hand_counts() -> None:
    rows = [
        CaptionRow("a", "the digit seven moves left", "The digit seven  moves left", 7, 5, 6),
        CaptionRow("b", "a handwritten three moving up", "a handwritten eight moving up", 8, 4, 6),
        CaptionRow("c", "a two going down", "a video of a two going down", -1, 6, 8),
    ]
    metrics = caption_metrics(rows, classes=[str(i) for i in range(7)] + ["seven", "eight"])
    assert metrics["caption_samples"] == 3
    assert metrics["caption_token_accuracy"] == pytest.approx(15 / 20)
    assert metrics["caption_exact_match"] == pytest.approx(1 / 3)  # case and spacing ignored
    assert metrics["caption_label_word_accuracy"] == pytest.approx(1 / 2)  # unlabelled row c not counted
    assert "caption_label_word_accuracy" not in caption_metrics(rows, classes=None)
    assert 0 < metrics["caption_bleu4"] < 1


def test_bleu4_matches_a_hand_computation() -> None:
    import math

    from imp_platform.eval.captioning import bleu4

    # 1-4-gram hits / counts 4/5, 3/4, 2/3, 1/2; equal lengths, so no brevity penalty
    expected = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu4([("the digit one moves left", "the digit one moves up")]) == pytest.approx(expected)
    # corpus level: counts summed over both pairs (7/8, 5/6, 3/4, 1/2); 8 generated words against 10
    pairs = [("the digit one moves left", "the digit one moves up"), ("The digit one", "the digit one moves up")]
    assert bleu4(pairs) == pytest.approx(math.exp(1 - 10 / 8) * (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25)
    assert bleu4([("a b c d", "a b c d")]) == pytest.approx(1.0)
    assert bleu4([("one two three", "one two three")]) == 0.0  # no 4-gram at all: no smoothing
    assert bleu4([]) == 0.0


class InMemory:
    """One bucket of rows with the ``ProcessedDataset`` interface captioning reads."""

    def __init__(self, rows: dict) -> None:
        self.rows = rows
        self.buckets = [SimpleNamespace(name="b", count=len(rows["key"]), columns={c: {} for c in rows})]

    def iter_batches(self, info, batch_size, columns):
        for start in range(0, len(self.rows["key"]), batch_size):
            yield {c: self.rows[c][start:start + batch_size] for c in columns}


def test_held_out_captions_cover_each_clip_once_up_to_the_cap() -> None:
    import numpy as np
    import torch

    from imp_platform.config.model import ModelConfig
    from imp_platform.data.decode import tokenize
    from imp_platform.data.synth import build_tokenizer
    from imp_platform.eval.captioning import HeldOutCaptions, iter_captions
    from imp_platform.model import build_model, preset

    tokenizer = build_tokenizer()
    captions = ["the digit seven moves left", "a two going up", "a handwritten one moving down"] * 2
    pairs = [tokenize(c, tokenizer, 6) for c in captions]
    rows = {"key": np.array([f"k{i}" for i in range(6)], dtype=object), "label": np.array([7, 2, 1, 7, 2, 1]),
            "caption": np.array(captions, dtype=object),
            "video": np.random.default_rng(0).integers(0, 255, (6, 4, 16, 16, 3), dtype=np.uint8),
            "text_ids": np.stack([p[0] for p in pairs]), "text_mask": np.stack([p[1] for p in pairs])}
    data = preset("tiny").model_dump()
    data["decoder"] = {"enabled": True}
    torch.manual_seed(0)
    model = build_model(ModelConfig(**data)).eval()
    got = list(iter_captions(model, InMemory(rows), tokenizer, batch_size=4, max_len=5, max_samples=5))
    assert [r.key for r in got] == ["k0", "k1", "k2", "k3", "k4"]
    assert [r.tokens_total for r in got] == [int(rows["text_mask"][i].sum()) + 1 for i in range(5)]  # + EOS
    assert all(0 <= r.tokens_correct <= r.tokens_total and r.reference == captions[i] for i, r in enumerate(got))
    metrics = HeldOutCaptions(tokenizer.to_str()).metrics(model, InMemory(rows), None, batch_size=4, max_samples=None,
                                                         device=torch.device("cpu"))
    assert metrics["caption_samples"] == 6 and 0 <= metrics["caption_token_accuracy"] <= 1


@pytest.mark.slow
def test_caption_command_writes_one_line_per_clip(processed_root: Path, tmp_path: Path) -> None:
    """A random CoCa model exported like any model: the command captions every held-out clip."""
    import torch
    from typer.testing import CliRunner

    from imp_platform.cli import app
    from imp_platform.config.model import ModelConfig
    from imp_platform.model import build_model, preset, save_pretrained

    data = preset("tiny").model_dump()
    data["decoder"] = {"enabled": True}
    torch.manual_seed(0)
    save_pretrained(build_model(ModelConfig(**data)), ModelConfig(**data), tmp_path / "model")
    out = tmp_path / "captions.jsonl"
    args = ["caption", "--checkpoint", str(tmp_path / "model"), "--input", str(processed_root / "processed/test"),
            "--out", str(out), "--max-len", "4", "--max-samples", "10", "--batch-size", "8"]
    result = CliRunner().invoke(app, [*args, "--tokenizer", str(processed_root / "raw/tokenizer.json")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 10 and len({x["key"] for x in lines}) == 10
    assert all(isinstance(x["caption"], str) and x["reference"] and x["label"] in range(10) for x in lines)
    assert '"caption_token_accuracy"' in result.output
    # Without a run config the tokenizer must be named: a clear error, exit code 2.
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "--tokenizer" in missing.output
