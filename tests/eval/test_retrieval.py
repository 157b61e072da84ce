"""Recall@k and prompt tokenization for zero-shot."""

from __future__ import annotations

import torch

from imp_platform.eval.zeroshot import recall_at_k


def test_recall_at_k_counts_both_directions():
    sim = torch.eye(4)
    assert recall_at_k(sim, (1, 5)) == {1: 1.0, 5: 1.0}
    # a->b always ranks item 0 first; b->a is the identity-free transpose.
    sim = torch.zeros(4, 4)
    sim[:, 0] = 1.0
    out = recall_at_k(sim, (1, 2))
    assert out[1] == (0.25 + 0.25) / 2 or 0 < out[1] < 1
    assert out[2] >= out[1]


def test_prompts_tokenize_like_captions(synth_shards, tmp_path):
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.eval.zeroshot import prompt_tokens

    cfg = load_pretrain_config(None, [f"data.tokenizer={synth_shards['root'] / 'tokenizer.json'}"])
    ids, mask, classes = prompt_tokens(cfg, 16)
    assert ids.shape == mask.shape and ids.shape[1] == 16
    assert sorted(set(classes.tolist())) == list(range(10))
    assert (ids[mask] > 1).all()  # no [PAD]/[UNK] inside a prompt: the caption vocabulary covers it


def test_held_out_prompts_fit_the_longest_stored_caption_length(processed_cfg):
    from imp_platform.eval.zeroshot import HeldOut

    held = HeldOut.open(processed_cfg)
    lengths = {b.shape["text_ids"][0] for b in held.dataset.buckets if "text_ids" in b.shape}
    assert len(lengths) > 1  # captions of several lengths: prompts must not take the first bucket's
    ids, mask, _ = held.prompts
    assert ids.shape[1] == max(lengths)
    assert mask.sum(axis=1).max() == max(lengths)  # the longest prompts are kept whole, not truncated
