"""Zero-shot and retrieval metrics, checked against answers worked out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from imp_platform.data.dataset import DatasetCard
from imp_platform.data.decode import tokenize
from imp_platform.eval.zeroshot import HeldOut, prompt_tokens, recall_at_k, zero_shot_scores


def test_zero_shot_scores_top_k_and_confusion():
    scores = torch.tensor([[0.9, 0.1, 0.0],   # true 0, predicted 0
                           [0.2, 0.7, 0.1],   # true 1, predicted 1
                           [0.5, 0.4, 0.3],   # true 2, predicted 0, second guess 1: a top-2 miss
                           [0.1, 0.6, 0.5]])  # true 2, predicted 1, second guess 2
    accuracy, confusion = zero_shot_scores(scores, np.array([0, 1, 2, 2]), ks=(1, 2))
    assert accuracy == {1: 0.5, 2: 0.75}
    assert confusion.tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 0]]


def test_recall_counts_the_pair_or_its_group_in_both_directions():
    # Rows: queries a, columns: items b. a0 and a1 share a caption (group 0), a2 is alone.
    sim = torch.tensor([[0.1, 0.9, 0.0],
                        [0.8, 0.2, 0.0],
                        [0.0, 0.3, 0.7]])
    # R@1: a->b hits only row 2 (1/3); b->a (columns): b0 -> a1, b1 -> a0, b2 -> a2: 1/3.
    # R@2: a->b hits all three; b->a misses b1 (top two a0, a2): (1 + 2/3) / 2.
    assert recall_at_k(sim, (1, 2)) == pytest.approx({1: 1 / 3, 2: 5 / 6})
    # semantic: a0 -> b1 and a1 -> b0 are the same caption, so every top-1 is a hit.
    assert recall_at_k(sim, (1,), np.array([0, 0, 1])) == {1: 1.0}
    # groups that separate everything are instance recall.
    assert recall_at_k(sim, (1,), np.arange(3)) == recall_at_k(sim, (1,))


def _word_level_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


class BagOfWords(torch.nn.Module):
    """A hand-built 'model': text -> word counts, video -> its stored vector; projections are identity.

    With class words only in the class prompts, a video stored as one class word's one-hot is
    zero-shot classified as that class, so the right answer is known.
    """

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def encode(self, modality, x, mask=None, drop_rate=0.0):
        if modality == "text":
            counts = torch.nn.functional.one_hot(x, self.vocab).float() * mask[..., None]
            return SimpleNamespace(pooled=counts[:, :, 2:].sum(1))  # no [PAD]/[UNK] dimensions
        return SimpleNamespace(pooled=x.reshape(len(x), -1))

    def project(self, pooled, source, target):
        return pooled

    def temperature(self, source, target):
        return torch.tensor(1.0)


class InMemory:
    """One bucket of rows with the ProcessedDataset interface HeldOut reads."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows
        shape = {c: list(v.shape[1:]) for c, v in rows.items() if c in ("video", "text_ids")}
        self.buckets = [SimpleNamespace(name="b", shape=shape, columns={c: {} for c in rows})]

    def iter_batches(self, info, batch_size, columns):
        n = len(self.rows["label"])
        for start in range(0, n, batch_size):
            yield {c: self.rows[c][start:start + batch_size] for c in columns}


def test_held_out_scores_a_hand_built_model():
    classes = ("red", "green", "blue")
    words = [*classes, "a", "photo", "of", "things"]
    tokenizer = _word_level_tokenizer(words)
    card = DatasetCard(classes, ("a photo of {}", "{} things"))
    shown = np.array([0, 1, 2, 1])  # the class word each video "shows"
    labels = np.array([0, 1, 2, 2])  # the last video is labelled 2 but shows 1
    captions = np.array([classes[c] for c in shown], dtype=object)
    pairs = [tokenize(c, tokenizer, 3) for c in captions]
    rows = {
        "video": (np.eye(len(words))[shown] * 255).astype(np.uint8),
        "text_ids": np.stack([p[0] for p in pairs]), "text_mask": np.stack([p[1] for p in pairs]),
        "label": labels, "caption": captions,
    }
    held = HeldOut(InMemory(rows), card, prompt_tokens(card, tokenizer, 4), batch_size=3, max_samples=None,
                   device=torch.device("cpu"))
    result = held.run(BagOfWords(len(words) + 2))
    m = result.metrics
    assert m["zeroshot_video_top1"] == 0.75 and m["zeroshot_video_top5"] == 1.0 and m["num_classes"] == 3
    assert result.confusion["video"].tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert result.as_json()["zeroshot_video_confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    # Each video equals its caption's words: every top-1 has the same caption, ties or not.
    assert m["retrieval_video_text_r1_semantic"] == 1.0 and m["retrieval_video_text_r5"] == 1.0
    assert "zeroshot_audio_top1" not in m and "retrieval_video_audio_r1" not in m
    assert all(isinstance(v, float) for v in held.evaluate(BagOfWords(len(words) + 2)).values())


def test_moving_digits_prompts_are_the_synth_captions():
    """The YAML's plain {} templates cover exactly the captions the synth writer can produce per digit."""
    from imp_platform.config.pipeline import load_pipeline
    from imp_platform.data import synth

    card = DatasetCard.from_config(load_pipeline().dataset)
    texts, owner = card.prompt_texts()
    assert card.classes == synth.DIGIT_WORDS
    for label in range(10):
        assert sorted(t for t, c in zip(texts, owner) if c == label) == sorted(synth.class_prompts(label))
