"""Softmax cross-entropy for per-dataset classification heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy; rows labelled ``ignore_index`` (-1: no label, as the data contract) are skipped.

    A batch without any labelled row gives 0 (not NaN) with a graph, so semi-supervised tasks step on.
    """
    if not bool((labels != ignore_index).any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index)
