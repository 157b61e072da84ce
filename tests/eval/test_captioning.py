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
    assert 0 < metrics["caption_cider"] < 10


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


def test_cider_d_matches_a_hand_computation() -> None:
    import math

    from imp_platform.eval.captioning import cider_d, cider_d_scores

    # two clips: every n-gram of a reference has document frequency 1 (an unseen one counts as 1),
    # so every TF-IDF weight is log(2) and cancels in the cosines
    pairs = [("a b", ["a b"]), ("c e", ["c d"])]
    # clip 0: unigram and bigram cosines 1, no 3/4-grams -> (1 + 1 + 0 + 0) / 4 x 10
    # clip 1: unigrams share "c" -> 1/2, bigrams none -> 0.5 / 4 x 10
    assert cider_d_scores(pairs) == pytest.approx([5.0, 1.25])
    assert cider_d(pairs) == pytest.approx(3.125)
    # clipping and the length penalty: "a b a" against "a b" (counts a:2 clipped to 1; one word longer)
    unigram = (1 * 1 + 1 * 1) / (math.sqrt(5) * math.sqrt(2))  # [2, 1] . clipped [1, 1] over the norms
    bigram = 1 / (math.sqrt(2) * 1)  # {a b, b a} against {a b}
    expected = 10 * (unigram + bigram) / 4 * math.exp(-1 / (2 * 6**2))
    assert cider_d_scores([("a b a", ["a b"]), ("c e", ["c d"])])[0] == pytest.approx(expected)
    # several references: the mean over them
    two = cider_d_scores([("a b", ["a b", "a x"]), ("c e", ["c d"])])[0]
    assert two == pytest.approx((5.0 + 10 * (1 / math.sqrt(2) * 1 / math.sqrt(2)) / 4) / 2)
    assert cider_d([]) == 0.0


def test_cider_d_properties() -> None:
    import random

    from imp_platform.eval.captioning import cider_d, cider_d_scores

    refs = ["the digit seven moves left", "a two going up", "a handwritten one moving down",
            "the digit four moves right", "a seven going down"]
    others = ["the digit seven moves right", "a seven moves left", "the digit seven", "left moves seven digit the",
              "the digit seven moves left and left again"]
    for i, ref in enumerate(refs):
        corpus = [(r, [r]) for r in refs]
        best = cider_d_scores(corpus)[i]
        for other in others:
            corpus[i] = (other, [ref])
            assert cider_d_scores(corpus)[i] < best
    pairs = [(o, [r]) for o, r in zip(others, refs)]
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    assert cider_d(shuffled) == pytest.approx(cider_d(pairs))
    assert sorted(cider_d_scores(shuffled)) == pytest.approx(sorted(cider_d_scores(pairs)))


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
    metrics, examples = HeldOutCaptions(tokenizer.to_str(), examples=3).evaluate(
        model, InMemory(rows), None, batch_size=4, max_samples=None, device=torch.device("cpu"))
    assert metrics["caption_samples"] == 6 and 0 <= metrics["caption_token_accuracy"] <= 1
    # the first clips, each with its first frame, both captions and the generated one as iter_captions gives it
    assert [e["key"] for e in examples] == ["k0", "k1", "k2"]
    assert [e["reference"] for e in examples] == captions[:3]
    assert [e["generated"] for e in examples] == [r.generated for r in got[:3]]
    assert np.array_equal(np.array(examples[1]["frame"], dtype=np.uint8), rows["video"][1, 0])


def test_caption_examples_go_to_jsonl_and_the_report(tmp_path: Path) -> None:
    import numpy as np

    from imp_platform.eval.captioning import EXAMPLES_KEY, thumbnail
    from imp_platform.eval.run import write_outputs

    big = np.arange(4 * 200 * 150 * 3, dtype=np.int64).reshape(4, 200, 150, 3).astype(np.uint8)
    assert thumbnail(big, "video").shape == (67, 50, 3)  # stride 3 keeps it <= 96 px
    assert np.array_equal(thumbnail(big[0], "image"), big[0, ::3, ::3]) and thumbnail(big, "audio_mel") is None
    examples = [{"key": f"k{i}", "reference": "a two going up", "generated": "a two going down", "label": 2,
                 "frame": thumbnail(big, "video").tolist() if i else None} for i in range(3)]
    metrics = {"step": 4, "caption_bleu4": 0.5, EXAMPLES_KEY: examples}
    metrics_path, report = write_outputs(metrics, [{"step": 4, "loss/cap": 1.0}], tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert lines == [{k: v for k, v in e.items() if k != "frame"} for e in examples]
    assert EXAMPLES_KEY not in json.loads(metrics_path.read_text())  # scalars stay readable; the frames are bulky
    assert report.stat().st_size > 0


@pytest.mark.slow
def test_caption_command_writes_one_line_per_clip(processed_root: Path, tmp_path: Path, s3_server) -> None:
    """A random CoCa model exported like any model: the command captions every held-out clip, the
    same from a copy of the model on S3."""
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

    import s3fs

    s3fs.S3FileSystem(**s3_server["storage_options"]).put(str(tmp_path / "model"), "imp-test/coca", recursive=True)
    remote = tmp_path / "remote.jsonl"
    args[args.index(str(out))], args[args.index(str(tmp_path / "model"))] = str(remote), "s3://imp-test/coca"
    options = [f"--storage-option={k}={v}" for k, v in s3_server["storage_options"].items()]
    result = CliRunner().invoke(app, [*args, *options, "--tokenizer", str(processed_root / "raw/tokenizer.json")])
    assert result.exit_code == 0, result.output
    assert remote.read_text() == out.read_text()
