"""CoCa's captioning loss: teacher-forced next-token cross-entropy over caption tokens.

The decoder reads ``[BOS] + caption`` and predicts ``caption + [EOS]``: position t's logits
score token t of the caption, the position after the last real token scores EOS, and
padding beyond it is ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def decoder_inputs(ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """``[BOS] + ids``: [B, L] -> [B, L + 1] (right padding stays behind the real tokens)."""
    return torch.cat([ids.new_full((ids.shape[0], 1), bos_id), ids.long()], dim=1)


def caption_targets(ids: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Targets [B, L + 1]: the caption's tokens, EOS after the last real one, ``IGNORE`` on padding."""
    batch = ids.shape[0]
    targets = torch.full((batch, ids.shape[1] + 1), IGNORE, dtype=torch.long, device=ids.device)
    targets[:, :-1] = torch.where(mask.bool(), ids.long(), IGNORE)
    targets[torch.arange(batch, device=ids.device), mask.sum(dim=1).long()] = eos_id
    return targets


def caption_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, eos_id: int,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [B, L + 1, V] (from ``decoder_inputs(ids)``) over real caption tokens + EOS."""
    targets = caption_targets(ids, mask, eos_id)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           label_smoothing=label_smoothing)
