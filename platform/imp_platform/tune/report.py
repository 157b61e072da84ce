"""What each trial hands Tune: the Train report plus the held-out score and the model's cost.

The score is computed from the eval path's held-out metrics (``HeldOut.evaluate`` on the eval
split), never from a training batch: the mean of every zero-shot top-1 accuracy and every
retrieval R@1 the eval reports, so one number ranks trials over all modalities at once.
The parameter counts ride along with every report so that the results table can show
accuracy against cost (an expert-count sweep changes the total, a router or capacity sweep
the per-token count).
"""

from __future__ import annotations

import re
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

SCORE = "heldout_score"
SCORE_PARTS = re.compile(r"zeroshot_.+_top1|retrieval_.+_r1")


def heldout_score(metrics: dict[str, Any]) -> float | None:
    """Mean of the held-out zero-shot top-1 and retrieval R@1 metrics; None when the report has none."""
    parts = [float(value) for key, value in metrics.items() if SCORE_PARTS.fullmatch(key)]
    return sum(parts) / len(parts) if parts else None


class SweepReportCallback(TuneReportCallback):
    """``TuneReportCallback`` that adds ``heldout_score`` and constant per-trial columns to each report."""

    def __init__(self, constants: dict[str, float]):
        super().__init__()
        self.constants = dict(constants)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = {**metrics[0], **self.constants}
        score = heldout_score(first)
        if score is not None:
            first[SCORE] = score
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)
