"""``labelled_fraction``: a task sees the labels of a fixed, key-chosen share of the clips; the rest
train as unlabelled (the semi-supervised student of ``platform bench distill``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imp_platform.config import ConfigError, validate
from imp_platform.config.train import TaskConfig
from imp_platform.objectives import classification_loss
from imp_platform.train.tasks import task_columns, task_labels

CPU = torch.device("cpu")


def _task(fraction: float) -> TaskConfig:
    return validate(TaskConfig, {"modalities": ["video"], "objectives": [{"kind": "classification"}],
                                 "labelled_fraction": fraction})


def _batch(keys: list[str]) -> dict[str, np.ndarray]:
    return {"key": np.array(keys, dtype=object), "label": np.arange(len(keys)) % 10}


def test_fraction_hides_the_same_keys_whatever_the_batching() -> None:
    keys = [f"train-{i:06d}" for i in range(2000)]
    task = _task(0.1)
    assert task_columns(task) == ["video", "label", "key"]
    whole = task_labels(task, _batch(keys), CPU)
    shown = whole >= 0
    assert 150 < int(shown.sum()) < 250  # ~10% of 2000
    assert torch.equal(whole[shown], torch.as_tensor(np.arange(2000) % 10)[shown])
    # Another batching, another order: each key keeps its fate (fixed across steps, runs, worker counts).
    order = np.random.default_rng(0).permutation(2000)
    parts = [task_labels(task, {c: v[chunk] for c, v in _batch(keys).items()}, CPU)
             for chunk in np.array_split(order, 7)]
    assert torch.equal(torch.cat(parts), whole[torch.as_tensor(order)])


def test_full_fraction_reads_no_key_and_keeps_every_label() -> None:
    task = _task(1.0)
    assert task_columns(task) == ["video", "label"]
    labels = np.array([3, -1, 7])
    assert task_labels(task, {"label": labels}, CPU).tolist() == [3, -1, 7]


def test_a_batch_without_labels_gives_zero_loss_with_a_graph() -> None:
    logits = torch.randn(4, 10, requires_grad=True)
    loss = classification_loss(logits, torch.full((4,), -1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros(4, 10))


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_fraction_out_of_range_names_the_field(fraction: float) -> None:
    with pytest.raises(ConfigError, match="labelled_fraction"):
        _task(fraction)


def test_bench_student_sees_the_same_few_labels_with_and_without_the_teacher() -> None:
    from imp_platform.bench.distill import STUDENT_LABELLED, bench_config, wins
    from imp_platform.train.comd import role_tasks

    dc = bench_config("/tmp/unused", 2, 2, [])
    alone, distilled = role_tasks(dc.student, dc), role_tasks(dc.student, dc, "/ckpt/teacher", dc.teacher)
    fractions = {run["video_cls"]["labelled_fraction"] for run in (alone, distilled)}
    assert fractions == {STUDENT_LABELLED} and STUDENT_LABELLED < 1
    assert {t["labelled_fraction"] for t in role_tasks(dc.teacher, dc).values()} == {1.0}
    other = bench_config("/tmp/unused", 2, 2, [], labelled=0.5, temperature=1.0)
    (objective,) = role_tasks(other.student, other, "/ckpt/teacher", other.teacher)["video_cls"]["objectives"]
    assert objective["temperature"] == 1.0 and other.student.tasks["video_cls"].labelled_fraction == 0.5
    scores = {"student_top1_distilled": 0.8, "student_top1_alone": 0.6, "student_ece_distilled": 0.05,
              "student_ece_alone": 0.2}
    assert wins(scores) and not wins({**scores, "student_ece_distilled": 0.3})
    assert not wins({**scores, "student_top1_alone": None})
