"""Calibration: expected calibration error and reliability-diagram bins (Guo et al. 2017).

The egocentric distillation paper reports that a distilled student is better calibrated, so
every held-out classification (zero-shot and heads) is scored for it. Bins are equal-width
confidence intervals ((m-1)/M, m/M]; ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BINS = 15


@dataclass
class Reliability:
    """Per confidence bin: mean confidence, accuracy and sample count (empty bins: 0, 0, 0)."""

    confidence: list[float]
    accuracy: list[float]
    count: list[int]

    @property
    def ece(self) -> float:
        total = sum(self.count)
        gaps = (n / total * abs(a - c) for a, c, n in zip(self.accuracy, self.confidence, self.count))
        return sum(gaps) if total else 0.0

    def as_json(self) -> dict[str, list]:
        return {"confidence": self.confidence, "accuracy": self.accuracy, "count": self.count}


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> Reliability:
    """Bins of the top-1 confidence of ``probs`` [N, C] (rows sum to 1) against ``labels`` [N]."""
    confidence, predicted = probs.float().max(dim=-1)
    correct = (predicted == labels.to(predicted.device)).float()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins)
    denominator = count.clamp_min(1).float()
    mean_conf = torch.zeros(bins).index_add_(0, index.cpu(), confidence.cpu()) / denominator.cpu()
    mean_acc = torch.zeros(bins).index_add_(0, index.cpu(), correct.cpu()) / denominator.cpu()
    return Reliability(mean_conf.tolist(), mean_acc.tolist(), count.cpu().tolist())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """ECE of ``probs`` [N, C] against ``labels`` [N] over ``bins`` equal-width confidence bins."""
    return reliability(probs, labels, bins).ece
