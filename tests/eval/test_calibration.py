"""Expected calibration error against a hand computation; heads scored for accuracy and calibration."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from imp_platform.eval.calibration import expected_calibration_error, reliability
from imp_platform.eval.heads import score_heads
from imp_platform.eval.report import write_report


def _two_class(rows: list[tuple[float, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 confidence of class 0, label) -> probs [N, 2] and labels [N]."""
    probs = torch.tensor([[c, 1 - c] for c, _ in rows])
    return probs, torch.tensor([label for _, label in rows])


def test_ece_matches_hand_computation() -> None:
    # class-0 confidences and labels: bins (width 1/15) 13: {.9 right}, 9: {.62 wrong, .64 right},
    # 10: {.71 right}, 8: {.56 right}
    probs, labels = _two_class([(0.9, 0), (0.62, 1), (0.64, 0), (0.71, 0), (0.56, 0)])
    want = (abs(1 - 0.9) + 2 * abs(0.5 - 0.63) + abs(1 - 0.71) + abs(1 - 0.56)) / 5
    assert expected_calibration_error(probs, labels) == pytest.approx(want, abs=1e-6)
    bins = reliability(probs, labels)
    assert bins.count[9] == 2 and bins.accuracy[9] == 0.5 and bins.confidence[9] == pytest.approx(0.63)
    assert sum(bins.count) == 5 and len(bins.count) == 15


def test_ece_is_zero_when_each_bin_is_calibrated() -> None:
    # 3 of 4 right at confidence 0.75; every one right at confidence 1
    probs, labels = _two_class([(0.75, 0), (0.75, 0), (0.75, 0), (0.75, 1), (1.0, 0), (1.0, 0)])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-7)


def test_overconfident_wrong_predictions_give_large_ece() -> None:
    probs = torch.tensor([[0.99, 0.01, 0.0]] * 4)
    assert expected_calibration_error(probs, torch.tensor([1, 2, 1, 2])) == pytest.approx(0.99, abs=1e-6)


def test_heads_are_scored_for_top1_and_ece() -> None:
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2) * 10)  # confident: class = the larger feature
    model = SimpleNamespace(heads=SimpleNamespace(classifiers={"cls": head}), classify=lambda x, name: head(x))
    pooled = {"video": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])}
    labels = np.array([0, 1, 1, -1])  # one wrong, one unlabelled
    metrics, bins = score_heads(model, {"cls": "video", "other": "audio_mel"}, pooled, labels)
    assert metrics["head_cls_top1"] == pytest.approx(2 / 3)
    assert metrics["head_cls_ece"] == pytest.approx(abs(2 / 3 - torch.tensor([10.0, 0.0]).softmax(0)[0].item()))
    assert set(bins) == {"head_cls"} and "head_other_top1" not in metrics


def test_report_draws_the_reliability_diagram(tmp_path) -> None:
    probs, labels = _two_class([(0.9, 0), (0.62, 1), (0.64, 0), (0.71, 0), (0.56, 0)])
    row = {"step": 1, "loss/vt": 1.0}
    plain = write_report([row], tmp_path / "plain.png")
    drawn = write_report([{**row, "head_cls_reliability": reliability(probs, labels).as_json()}], tmp_path / "rel.png")
    assert Image.open(plain).size == Image.open(drawn).size
    assert Image.open(plain).tobytes() != Image.open(drawn).tobytes()
