"""Which inferred samples a round keeps, and how good their labels are.

Works on the prediction rows ``platform infer`` writes (key, label, generated_caption,
``<predict>`` and ``<predict>_score``): the split's ``label`` column is the weak label the
filter may use and, where the split has true labels, the truth the kept labels are scored
against. The kept label is always the model's predicted class, the kept caption its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imp_platform.config.selftrain import KeepFilter
from imp_platform.eval.captioning import names_class


@dataclass(frozen=True)
class Kept:
    """The kept samples (in input order) and the round's filter figures."""

    keys: list[str]
    captions: list[str]
    labels: list[int]  # the model's predicted classes
    total: int  # samples inferred
    kept_label_accuracy: float | None  # kept labels equal to the split's label; None when none is known

    @property
    def kept_frac(self) -> float:
        return len(self.keys) / self.total if self.total else 0.0


def keep_mask(rule: KeepFilter, weak: np.ndarray, captions: list[str], predicted: np.ndarray, scores: np.ndarray,
              classes: list[str]) -> np.ndarray:
    """Per row, whether ``rule`` keeps it (``weak`` -1: no weak label, failing the checks that need one)."""
    known = (weak >= 0) & (weak < len(classes))
    checks = []
    if rule.caption_names_label:
        checks.append(np.array([bool(k) and names_class(c, classes[w]) for k, c, w in zip(known, captions, weak)],
                               dtype=bool))
    if rule.class_agrees:
        checks.append(known & (predicted == weak))
    if rule.min_score is not None:
        checks.append(scores >= rule.min_score)
    stacked = np.stack(checks) if checks else np.ones((1, len(weak)), dtype=bool)
    return stacked.all(axis=0) if rule.combine == "all" else stacked.any(axis=0)


def select(table: Any, rule: KeepFilter, predict: str, classes: list[str]) -> Kept:
    """The kept rows of one prediction table (pyarrow); rows without a caption or prediction are never kept."""
    for column in ("key", "label", "generated_caption", predict, f"{predict}_score"):
        if column not in table.column_names:
            raise KeyError(f"predictions have no column {column!r} (columns: {table.column_names})")
    captions = table.column("generated_caption").to_pylist()
    predicted_raw = table.column(predict).to_pylist()
    valid = np.array([c is not None and p is not None for c, p in zip(captions, predicted_raw)], dtype=bool)
    weak = np.asarray(table.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    predicted = np.array([-1 if p is None else p for p in predicted_raw], dtype=np.int64)
    scores = np.array([0.0 if s is None else s for s in table.column(f"{predict}_score").to_pylist()])
    mask = valid & keep_mask(rule, weak, [c or "" for c in captions], predicted, scores, classes)
    rows = np.flatnonzero(mask)
    truth = weak[rows]
    known = truth >= 0
    keys = table.column("key").to_pylist()
    return Kept(keys=[keys[i] for i in rows], captions=[captions[i] for i in rows],
                labels=[int(predicted[i]) for i in rows], total=len(keys),
                kept_label_accuracy=float(np.mean(predicted[rows][known] == truth[known])) if known.any() else None)
