"""Knowledge distillation from a frozen teacher (Hinton et al.; the egocentric multimodal-distillation
paper): a soft-target KL at temperature T, or a feature distance, mixed with the label CE.

``T^2`` keeps the soft-target gradients on the scale of the CE's as T grows. The KL counts every
row (a teacher labels unlabelled clips too); the CE only rows with a label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imp_platform.objectives.classification import classification_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over rows."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return t * t * F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def feature_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance ``1 - cos(student_i, teacher_i)`` between feature rows."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def distill_loss(teacher_term: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
                 alpha: float, ignore_index: int = -1) -> torch.Tensor:
    """``alpha * teacher_term + (1 - alpha) * CE(student_logits, labels)``.

    ``teacher_term`` is ``kd_loss`` or ``feature_distance``; without a labelled row the CE is 0
    (not NaN), so unlabelled batches still learn from the teacher.
    """
    return alpha * teacher_term + (1 - alpha) * classification_loss(student_logits, labels, ignore_index)
