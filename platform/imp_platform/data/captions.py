"""Several captions per sample: how they are stored, and how a training batch draws from them.

With ``text.max_captions`` K > 1 a processed row keeps its captions as ``captions_ids`` /
``captions_mask`` [K, L] (first = ``text_ids``; rows past the sample's own count are all-False).
A training stream that reads ``text_ids`` from such a bucket also gets these columns, for
MIL-NCE (every caption a positive, as in IMP/VATT), and its ``text_ids`` / ``text_mask`` become
one of the row's captions drawn at random per step: NCE and captioning see every caption over
the epochs. The draw is seeded by the stream's position, so a resumed run draws the same.
Eval reads stored ``text_ids`` without these columns: the first caption, deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

IDS, MASK = "captions_ids", "captions_mask"
CAPTION_COLUMNS = (IDS, MASK)


def with_caption_columns(columns: Sequence[str], stored: Mapping[str, object]) -> list[str]:
    """``columns`` plus the caption columns when they ask for ``text_ids`` and ``stored`` has them."""
    if "text_ids" in columns and all(c in stored for c in CAPTION_COLUMNS):
        return [*columns, *(c for c in CAPTION_COLUMNS if c not in columns)]
    return list(columns)


def pack_captions(token_rows: Sequence[tuple[np.ndarray, np.ndarray]], count: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenized captions (ids, mask), each of one length L -> (ids [count, L], mask [count, L]); extras dropped."""
    length = len(token_rows[0][0])
    ids = np.zeros((count, length), dtype=np.int32)
    mask = np.zeros((count, length), dtype=bool)
    for k, (row_ids, row_mask) in enumerate(token_rows[:count]):
        ids[k], mask[k] = row_ids, row_mask
    return ids, mask


def draw_captions(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``batch`` with ``text_ids`` / ``text_mask`` replaced, per row, by one of its real captions drawn uniformly."""
    real = batch[MASK].any(axis=-1)  # [B, K]
    counts = real.sum(axis=1)
    if (counts == 0).any():
        raise ValueError("a row has no caption in captions_mask; the pipeline writes at least the first")
    pick = (rng.random(len(counts)) * counts).astype(np.int64)  # index among the row's real captions
    slot = np.argmax(np.cumsum(real, axis=1) > pick[:, None], axis=1)  # real captions come first; robust anyway
    rows = np.arange(len(counts))
    return {**batch, "text_ids": batch[IDS][rows, slot], "text_mask": batch[MASK][rows, slot]}


def flatten_captions(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(real [B, K]: which captions exist, ``text_ids`` / ``text_mask`` [N, L] of those N captions in row order):
    MIL-NCE encodes only real captions (an all-padding text has nothing to attend to)."""
    real = batch[MASK].any(axis=-1)
    return real, {"text_ids": batch[IDS][real], "text_mask": batch[MASK][real]}
