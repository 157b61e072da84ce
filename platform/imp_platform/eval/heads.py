"""Held-out scores of the classification heads (classification and distill tasks): top-1 and calibration.

A head belongs to one task and reads that task's first modality; zero-shot needs text-trained
projections, a head only labels, so a student trained on labels (or distilled) is scored here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imp_platform.eval.calibration import Reliability, reliability


def score_heads(model: Any, heads: dict[str, str], pooled: dict[str, torch.Tensor],
                labels: np.ndarray) -> tuple[dict[str, float], dict[str, Reliability]]:
    """``head_<name>_top1`` / ``_ece`` metrics and reliability bins for each head in ``heads``
    (head -> modality) whose modality has ``pooled`` features [N, d]; rows labelled outside the
    head's classes (or -1) are left out."""
    metrics: dict[str, float] = {}
    bins: dict[str, Reliability] = {}
    for head, modality in heads.items():
        if modality not in pooled or head not in model.heads.classifiers:
            continue
        logits = model.classify(pooled[modality], head).float()
        keep = (labels >= 0) & (labels < logits.shape[1])
        if not keep.any():
            continue
        truth = torch.as_tensor(labels[keep], dtype=torch.long)
        probs = logits[torch.as_tensor(keep, device=logits.device)].softmax(-1).cpu()
        metrics[f"head_{head}_top1"] = float((probs.argmax(-1) == truth).float().mean())
        bins[f"head_{head}"] = reliability(probs, truth)
        metrics[f"head_{head}_ece"] = bins[f"head_{head}"].ece
    return metrics, bins
