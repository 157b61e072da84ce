"""Distillation: the loss against its formula, a frozen teacher that never changes, stored teacher
outputs that give the online loss, and the config checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from imp_platform.config import ConfigError, dump_yaml, validate
from imp_platform.config.train import TaskConfig, load_pretrain_config
from imp_platform.data.stream import ProcessedDataset
from imp_platform.model import build_model
from imp_platform.model.io import save_pretrained
from imp_platform.model.presets import preset
from imp_platform.objectives import classification_loss, distill_loss, feature_distance, kd_loss
from imp_platform.train.tasks import run_task, task_columns
from imp_platform.train.teacher import load_teacher
from imp_platform.train.teacher_outputs import store_teacher_logits

CLASSES = 3


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def hand_kd(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = softmax([v / t for v in t_row])
        q = softmax([v / t for v in s_row])
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return t * t * total / len(student)


def hand_ce(logits: torch.Tensor, labels: list[int]) -> float:
    rows = [(row, y) for row, y in zip(logits.tolist(), labels) if y >= 0]
    return sum(-math.log(softmax(row)[y]) for row, y in rows) / len(rows)


def test_distill_loss_matches_formula() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5) * 2, torch.randn(4, 5) * 3
    labels = [1, -1, 4, 0]  # one unlabelled row: in the KL, not in the CE
    want = 0.3 * hand_kd(student, teacher, 2.0) + 0.7 * hand_ce(student, labels)
    got = distill_loss(kd_loss(student, teacher, 2.0), student, torch.tensor(labels), 0.3)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_alpha_zero_is_plain_ce_and_unlabelled_batches_are_finite() -> None:
    torch.manual_seed(1)
    student, teacher, labels = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    got = distill_loss(kd_loss(student, teacher, 4.0), student, labels, 0.0)
    assert torch.equal(got, classification_loss(student, labels))
    unlabelled = distill_loss(kd_loss(student, teacher, 4.0), student, torch.full((6,), -1), 0.5)
    assert unlabelled.item() == pytest.approx(0.5 * hand_kd(student, teacher, 4.0), rel=1e-5)


def test_feature_distance_is_cosine_distance() -> None:
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    assert feature_distance(a, b).item() == pytest.approx((0.0 + 1.0) / 2)


def _spec(teacher: str, **extra) -> TaskConfig:
    objective = {"kind": "distill", "teacher": teacher, "teacher_modalities": ["video", "audio_mel"], **extra}
    return validate(TaskConfig, {"modalities": ["video"], "objectives": [objective]})


def _batch(rows: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"video": rng.integers(0, 255, (rows, 4, 32, 32, 3), dtype=np.uint8),
            "audio_mel": rng.standard_normal((rows, 32, 128)).astype(np.float32),
            "label": np.array([0, 2, 1][:rows])}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny", heads={"av": CLASSES}, depth=1)
    return save_pretrained(build_model(cfg), cfg, tmp_path_factory.mktemp("teacher"))


def _student() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model(preset("tiny", heads={"s": CLASSES}, depth=1))


def test_task_batch_carries_teacher_columns(teacher_dir: Path) -> None:
    assert task_columns(_spec(str(teacher_dir))) == ["video", "audio_mel", "label"]


def test_run_task_loss_is_the_fused_teacher_formula(teacher_dir: Path) -> None:
    task, batch, student = _spec(str(teacher_dir), temperature=3.0, alpha=0.25), _batch(), _student().eval()
    teacher = load_teacher(str(teacher_dir)).model
    with torch.no_grad():
        fused = (teacher.classify(teacher.encode("video", torch.as_tensor(batch["video"]).float() / 255).pooled, "av")
                 + teacher.classify(teacher.encode("audio_mel", torch.as_tensor(batch["audio_mel"])).pooled, "av")) / 2
        logits = student.classify(student.encode("video", torch.as_tensor(batch["video"]).float() / 255).pooled, "s")
        out = run_task(student, "s", task, batch, torch.device("cpu"))
    want = 0.25 * hand_kd(logits, fused, 3.0) + 0.75 * hand_ce(logits, batch["label"].tolist())
    assert float(out.parts["distill"]) == pytest.approx(want, rel=1e-4)


def test_teacher_is_frozen_bit_for_bit_while_the_student_learns(teacher_dir: Path) -> None:
    task, batch, student = _spec(str(teacher_dir)), _batch(), _student().train()
    teacher = load_teacher(str(teacher_dir)).model
    assert load_teacher(str(teacher_dir)).model is teacher  # loaded once per process
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in student.parameters()]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        run_task(student, "s", task, batch, torch.device("cpu")).loss.backward()
        optimizer.step()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))


def test_features_mode_and_class_mismatch(teacher_dir: Path) -> None:
    batch, student = _batch(), _student().eval()
    out = run_task(student, "s", _spec(str(teacher_dir), features=True), batch, torch.device("cpu"))
    assert math.isfinite(float(out.parts["distill"]))
    wide = build_model(preset("tiny", heads={"s": CLASSES + 2}, depth=1)).eval()
    with pytest.raises(ConfigError, match="3 classes"):
        run_task(wide, "s", _spec(str(teacher_dir)), batch, torch.device("cpu"))


@pytest.mark.parametrize("field,value", [("teacher", "x"), ("alpha", 0.5), ("temperature", 2.0),
                                         ("features", True), ("teacher_modalities", ["video"]),
                                         ("teacher_column", "t")])
def test_config_refuses_distill_fields_on_other_kinds(field: str, value) -> None:
    with pytest.raises(ConfigError, match=f"{field}: only a distill objective"):
        validate(TaskConfig, {"modalities": ["video"], "objectives": [{"kind": "classification", field: value}]})


def test_config_distill_defaults_and_required_teacher() -> None:
    obj = _spec("some/dir").objectives[0]
    assert (obj.temperature, obj.alpha, obj.features, obj.teacher_heads) == (2.0, 0.5, False, {})
    with pytest.raises(ConfigError, match="distill.teacher: Field required"):
        validate(TaskConfig, {"modalities": ["video"],
                              "objectives": [{"kind": "distill", "teacher_modalities": ["video"]}]})
    with pytest.raises(ConfigError, match="alpha"):
        _spec("d", alpha=1.5)
    with pytest.raises(ConfigError, match="teacher_column: stored teacher outputs are logits"):
        _spec("d", features=True, teacher_column="t")


def _write_split(root: Path, batch: dict[str, np.ndarray]) -> str:
    """A one-bucket processed split of ``batch`` in two row groups (2 + 1 rows), as preprocess lays it out."""
    columns = {c: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for c, v in batch.items()}
    table = pa.table({c: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), int(np.prod(v.shape[1:])))
                      if v.ndim > 1 else pa.array(v) for c, v in batch.items()})
    (root / "bucket=b").mkdir(parents=True)
    with pq.ParquetWriter(root / "bucket=b" / "part-0.parquet", table.schema) as writer:
        writer.write_table(table.slice(0, 2))
        writer.write_table(table.slice(2, 1))
    manifest = {"buckets": [{"name": "b", "count": 3, "shape": {c: s["shape"] for c, s in columns.items()},
                             "files": [{"path": "bucket=b/part-0.parquet", "row_groups": [2, 1]}],
                             "columns": columns}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def test_stored_teacher_logits_give_the_online_loss(teacher_dir: Path, tmp_path: Path) -> None:
    split = _write_split(tmp_path / "train", _batch())
    assert store_teacher_logits(split, str(teacher_dir), ["video", "audio_mel"], {}, "teacher_logits") == 3
    stored = ProcessedDataset.open(split)
    assert stored.manifest["teacher_outputs"]["teacher_logits"]["teacher"] == str(teacher_dir)
    assert not (tmp_path / "train" / "bucket=b" / "part-0.parquet").exists()  # replaced, manifest first
    precomputed = _spec(str(teacher_dir), teacher_column="teacher_logits")
    assert task_columns(precomputed) == ["video", "teacher_logits", "label"]
    (batch,) = stored.iter_batches(stored.buckets[0], 3, task_columns(precomputed))
    assert batch["teacher_logits"].shape == (3, CLASSES)
    student = _student().eval()
    online = run_task(student, "s", _spec(str(teacher_dir)), {**_batch(), **batch}, torch.device("cpu"))
    offline = run_task(student, "s", precomputed, batch, torch.device("cpu"))
    assert float(offline.parts["distill"]) == pytest.approx(float(online.parts["distill"]), rel=1e-5)


def test_config_with_distill_round_trips_through_the_checkpoint_yaml(tmp_path: Path) -> None:
    cfg = load_pretrain_config(None, ["tasks.video_cls.objectives=[{kind: distill, teacher: t, "
                                      "teacher_modalities: [video, audio_mel], alpha: 0.7}]"])
    again = load_pretrain_config(dump_yaml(cfg, tmp_path / "pretrain.yaml"))
    assert again.tasks == cfg.tasks and again.tasks["video_cls"].objectives[0].alpha == 0.7
    assert not hasattr(again.tasks["video_text"].objectives[0], "temperature")
