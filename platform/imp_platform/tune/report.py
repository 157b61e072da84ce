"""What each trial hands Tune: the Train report, the held-out score, the model's cost and a checkpoint.

The score is computed from the eval path's held-out metrics (``HeldOut.evaluate`` on the eval
split), never from a training batch: the mean of every zero-shot top-1 accuracy and every
retrieval R@1 the eval reports, so one number ranks trials over all modalities at once.
The parameter counts ride along with every report so that the results table can show
accuracy against cost (an expert-count sweep changes the total, a router or capacity sweep
the per-token count).

Ray's ``TuneReportCallback`` forwards metrics only (its reports reach Tune without a checkpoint,
so PBT has nothing to clone and a resumed sweep nothing to resume from). Here the Train run's
callback queues each report with its Train checkpoint's path, and the trial's own thread hands
them to Tune with ``tune.report`` and a pointer checkpoint (``tune/lineage.py``).
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable
from typing import Any

from ray.train import UserCallback

from imp_platform.tune.lineage import TrainPointer, pointer_checkpoint

SCORE = "heldout_score"
SCORE_PARTS = re.compile(r"zeroshot_.+_top1|retrieval_.+_r1")


def heldout_score(metrics: dict[str, Any]) -> float | None:
    """Mean of the held-out zero-shot top-1 and retrieval R@1 metrics; None when the report has none."""
    parts = [float(value) for key, value in metrics.items() if SCORE_PARTS.fullmatch(key)]
    return sum(parts) / len(parts) if parts else None


class SweepReportCallback(UserCallback):
    """Queues each Train report (rank 0's metrics + ``heldout_score`` + constant columns) with its checkpoint path.

    Runs in the Train controller; the queue (a small Ray actor, as ``TuneReportCallback`` uses)
    holds one report at a time, so training waits while Tune has not taken the previous one.
    """

    def __init__(self, constants: dict[str, float]):
        from ray.util.queue import Queue

        self.constants = dict(constants)
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = {**metrics[0], **self.constants}
        score = heldout_score(row)
        if score is not None:
            row[SCORE] = score
        self.queue.put((row, checkpoint.path if checkpoint else None))


def fit_and_report(trainer: Any, callback: SweepReportCallback, pointer: Callable[[dict, str], TrainPointer]) -> None:
    """Run ``trainer.fit()`` beside this Tune trial thread, which reports each queued Train report to Tune.

    ``pointer(metrics, checkpoint_path)`` names the Train checkpoint a report's Tune checkpoint points at.
    A failed fit raises here, so Tune marks the trial errored; a trial Tune stops ends in
    ``tune.report`` and its actor (with the Train run it owns) is then torn down.
    """
    from ray import tune

    failure: list[BaseException] = []
    done = threading.Event()

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the trial thread below
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=fit, name="train-fit", daemon=True).start()
    while True:
        try:
            metrics, path = callback.queue.get(timeout=1.0)
        except queue.Empty:  # ray.util.queue.Empty is one
            if done.is_set() and callback.queue.empty():
                break
            continue
        if path is None:
            tune.report(metrics)
            continue
        with pointer_checkpoint(pointer(metrics, path)) as checkpoint:
            tune.report(metrics, checkpoint=checkpoint)
    if failure:
        raise failure[0]
