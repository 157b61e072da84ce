"""``platform bench distill``: a video+audio teacher distilled into a video-only student, against the
same student trained on labels alone at equal steps (the egocentric multimodal-distillation
result, at small scale on moving digits): held-out top-1 and ECE of the student's head.

One CoMD round (``train.comd``) on the embedded config: the teacher trains video and audio
classification on every label (one head each; its fused logits average the two), the student
video classification with the ``distill`` objective; then the same student task without the
teacher, same seed and steps. The student sees the labels of only ``STUDENT_LABELLED`` of the
clips (the same clips in both runs): the teacher, trained with more labels and a modality the
student lacks, is what carries the rest. (With every label, the fused teacher is a near one-hot
copy of it, since the DTMF tone names the digit, and adds nothing.) The share is 30%: with 10%
the student alone stays near chance with near-uniform probabilities, trivially calibrated, so its
ECE says nothing; with 30% it is a real classifier fitted to few labels, the over-confident case
whose calibration a teacher's soft targets are meant to improve. T = 2, the CoMD default.
Ratios are distilled over alone, measured in the same run.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from imp_platform.bench.common import ratio, write_results
from imp_platform.config.distill import DistillConfig, DistillRole

log = logging.getLogger(__name__)

TEACHER_TASKS: dict[str, Any] = {
    "video_cls": {"modalities": ["video"], "objectives": [{"kind": "classification"}], "token_budget": 2048},
    "audio_cls": {"modalities": ["audio_mel"], "objectives": [{"kind": "classification"}], "token_budget": 1024},
}
STUDENT_LABELLED = 0.3  # share of the training clips whose label the student sees
TEMPERATURE = 2.0  # of the soft targets


def bench_config(storage: str, teacher_steps: int, student_steps: int, extra: list[str],
                 labelled: float = STUDENT_LABELLED, temperature: float = TEMPERATURE) -> DistillConfig:
    """One unidirectional round: teacher on video + audio, student on video with ``labelled`` of the labels."""
    student_tasks = {"video_cls": {**TEACHER_TASKS["video_cls"], "labelled_fraction": labelled}}
    return DistillConfig(
        name="bench-distill", base_overrides=[f"run.storage_path={storage}", "run.tensorboard=false", *extra],
        rounds=1, teacher_steps=teacher_steps, steps_per_round=student_steps, temperature=temperature,
        teacher=DistillRole(tasks=TEACHER_TASKS), student=DistillRole(tasks=student_tasks))


def fused_teacher_scores(cfg: Any, checkpoint: str, heads: dict[str, str]) -> dict[str, float]:
    """Held-out top-1 and ECE of the teacher's fused prediction, exactly as the students are taught
    (``Teacher.logits``: the mean of its heads' logits, one head per modality), on the whole split."""
    import numpy as np
    import torch

    from imp_platform.data import modalities as registry
    from imp_platform.data.stream import ProcessedDataset
    from imp_platform.eval.calibration import reliability
    from imp_platform.train.teacher import load_teacher

    teacher = load_teacher(checkpoint)
    dataset = ProcessedDataset.open(cfg.data.processed_path(cfg.data.eval_split), cfg.data.storage_options)
    columns = [c for m in heads for c in registry.modality(m).columns] + ["label"]
    logits, labels = [], []
    for info in dataset.views(columns):
        for batch in dataset.iter_batches(info, cfg.eval.batch_size, columns):
            logits.append(teacher.logits(batch, list(heads), heads, torch.device("cpu")))
            labels.append(batch["label"])
    truth = torch.as_tensor(np.concatenate(labels), dtype=torch.long)
    keep = truth >= 0
    probs = torch.cat(logits)[keep].softmax(-1)
    return {"teacher_top1_fused": float((probs.argmax(-1) == truth[keep]).float().mean()),
            "teacher_ece_fused": reliability(probs, truth[keep]).ece}


def run(quick: bool, out: Path, teacher_steps: int | None = None, student_steps: int | None = None,
        labelled: float = STUDENT_LABELLED, temperature: float = TEMPERATURE) -> dict[str, Any]:
    """Train the teacher, then the student with and without it at equal steps; write the JSON and print a table."""
    from imp_platform.train.comd import base_config, head_scores, role_tasks, run_comd, run_config, train

    teacher_steps = teacher_steps or (300 if quick else 800)
    student_steps = student_steps or (150 if quick else 400)
    extra = ["run.num_workers=1", "eval.max_samples=150"] if quick else []
    with tempfile.TemporaryDirectory(prefix="imp-bench-distill-") as storage:
        dc = bench_config(storage, teacher_steps, student_steps, extra, labelled, temperature)
        rounds = run_comd(dc, Path(storage) / "comd")
        teacher_row, student_row = rounds["rows"]
        base = base_config(dc)
        alone = train(run_config(base, "bench-distill-alone", role_tasks(dc.student, dc), student_steps))
        teacher = {"steps": teacher_steps, "wall_s": teacher_row["wall_s"],
                   "teacher_top1_video": teacher_row.get("head_video_cls_top1"),
                   "teacher_top1_audio": teacher_row.get("head_audio_cls_top1"),
                   **fused_teacher_scores(base, rounds["teacher"], dc.teacher.heads())}
    students = {"distilled": {"steps": student_steps, "wall_s": student_row["wall_s"],
                              "top1": student_row.get("head_video_cls_top1"),
                              "ece": student_row.get("head_video_cls_ece")},
                "alone": {"steps": student_steps, "wall_s": round(alone.wall_s, 1),
                          "top1": head_scores(alone.metrics).get("head_video_cls_top1"),
                          "ece": head_scores(alone.metrics).get("head_video_cls_ece")}}
    summary = {
        "student_top1_distilled": students["distilled"]["top1"], "student_top1_alone": students["alone"]["top1"],
        "student_ece_distilled": students["distilled"]["ece"], "student_ece_alone": students["alone"]["ece"],
        "top1_distilled_over_alone": ratio(students["distilled"]["top1"], students["alone"]["top1"]),
        "ece_distilled_over_alone": ratio(students["distilled"]["ece"], students["alone"]["ece"]),
        "wall_distilled_over_alone": ratio(students["distilled"]["wall_s"], students["alone"]["wall_s"]),
        "student_labelled_fraction": labelled,
    }
    summary["distillation_wins"] = wins(summary)
    summary["temperature"] = dc.temperature
    print(table(teacher, students))
    print(f"student labels: {labelled:.0%} of the clips; distillation wins (higher top-1, lower ECE): "
          f"{summary['distillation_wins']}")
    return write_results(out, "distill", {"quick": quick, **summary, "teacher": teacher, "students": students})


def wins(summary: dict[str, Any]) -> bool:
    """The demonstration's claim: the distilled student has the higher top-1 and the lower ECE."""
    keys = ("student_top1_distilled", "student_top1_alone", "student_ece_distilled", "student_ece_alone")
    if any(summary.get(k) is None for k in keys):
        return False
    return (summary["student_top1_distilled"] > summary["student_top1_alone"]
            and summary["student_ece_distilled"] < summary["student_ece_alone"])



def table(teacher: dict[str, Any], students: dict[str, dict[str, Any]]) -> str:
    lines = [f"teacher ({teacher['steps']} steps): video head {teacher['teacher_top1_video']}, audio head "
             f"{teacher['teacher_top1_audio']}, fused {teacher['teacher_top1_fused']:.3f} "
             f"(ECE {teacher['teacher_ece_fused']:.3f})",
             f"{'student':<10} {'steps':>5} {'wall s':>7} {'top-1':>6} {'ECE':>6}"]
    for name, s in students.items():
        cells = [f"{s[k]:.3f}" if s.get(k) is not None else "  -  " for k in ("top1", "ece")]
        lines.append(f"{name:<10} {s['steps']:>5} {s['wall_s']:>7.1f} {cells[0]:>6} {cells[1]:>6}")
    return "\n".join(lines)
