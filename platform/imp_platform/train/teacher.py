"""The frozen teacher of a ``distill`` objective, and the objective's value for one batch.

The teacher is loaded once per worker process (cached by path and device) and kept apart
from the student: it is no submodule of it, so it never reaches the optimizer, the gradient
all-reduce or a checkpoint. It runs in eval mode under ``torch.no_grad`` with
``requires_grad`` off, so its weights cannot change.

Fusion over the teacher's modalities (the egocentric paper's multimodal teacher): the mean of
the logits its classification head gives on each modality's pooled output, or, with
``features: true``, the mean of the L2-normalised pooled features projected towards text (the
common space that zero-shot classification uses). The student learns on its task's first
modality, like a classification task.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imp_platform.config import ConfigError
from imp_platform.config.train import DistillObjective
from imp_platform.train.tasks import encode

COMMON_SPACE = "text"  # features are compared after projection towards this modality

_CACHE: dict[tuple[str, str], Teacher] = {}


class Teacher:
    """A trained model used only for inference: eval mode, no gradients, never optimised."""

    def __init__(self, model: torch.nn.Module, source: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.source = source

    def head(self, modality: str, heads: dict[str, str]) -> str:
        """The classification head for ``modality``: named in ``teacher_heads``, else the teacher's only head."""
        available = sorted(self.model.heads.classifiers)
        name = heads.get(modality) or (available[0] if len(available) == 1 else None)
        if name is None or name not in available:
            raise ConfigError(f"teacher {self.source}: heads {available}; name the one for {modality} in "
                              f"teacher_heads (got {heads.get(modality)!r})")
        return name

    @torch.no_grad()
    def logits(self, batch: dict[str, np.ndarray], modalities: list[str], heads: dict[str, str],
               device: torch.device) -> torch.Tensor:
        """[B, C]: mean over ``modalities`` of the head's logits on each modality's pooled output."""
        return torch.stack([self.model.classify(encode(self.model, m, batch, device).pooled, self.head(m, heads))
                            .float() for m in modalities]).mean(0)

    @torch.no_grad()
    def features(self, batch: dict[str, np.ndarray], modalities: list[str], device: torch.device) -> torch.Tensor:
        """[B, d_common]: mean over ``modalities`` of the normalised common-space features."""
        feats = [torch.nn.functional.normalize(
            self.model.project(encode(self.model, m, batch, device).pooled, m, COMMON_SPACE).float(), dim=-1)
            for m in modalities]
        return torch.stack(feats).mean(0)


def load_teacher(path: str, device: torch.device | str = "cpu") -> Teacher:
    """The teacher at ``path`` (a run checkpoint or an exported model dir, local or s3://), once per process.

    Read as ``model.init_from`` reads its source (a checkpoint must be complete); s3:// with the
    environment's credentials (AWS_* variables, IRSA).
    """
    from imp_platform.model import build_model
    from imp_platform.model.init import read_model

    key = (path, str(device))
    if key not in _CACHE:
        state, model_cfg = read_model(path)
        model = build_model(model_cfg)
        model.load_state_dict(state, strict=True)
        _CACHE[key] = Teacher(model.to(device), path)
    return _CACHE[key]


def distill_value(model: Any, head: str, modality: str, obj: DistillObjective, outs: dict[str, Any],
                  batch: dict[str, np.ndarray], labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The ``distill`` objective of one batch: ``alpha * T^2 * KL + (1 - alpha) * CE`` (or the
    cosine distance of common-space features in place of the KL with ``features: true``); the
    teacher's logits come from its forward, or from the batch's ``teacher_column``."""
    from imp_platform.objectives import distill_loss, feature_distance, kd_loss

    pooled = outs[modality].pooled
    logits = model.classify(pooled, head).float()
    if obj.features:
        student = model.project(pooled, modality, COMMON_SPACE).float()
        target = load_teacher(obj.teacher, device).features(batch, obj.teacher_modalities, device)
        if student.shape != target.shape:
            raise ConfigError(f"teacher {obj.teacher}: common-space width {target.shape[-1]} != the student's "
                              f"{student.shape[-1]} (features: true needs equal d_common)")
        term = feature_distance(student, target)
    else:
        target = (torch.as_tensor(batch[obj.teacher_column], device=device).float() if obj.teacher_column
                  else load_teacher(obj.teacher, device).logits(batch, obj.teacher_modalities, obj.teacher_heads,
                                                                device))
        if target.shape != logits.shape:
            raise ConfigError(f"teacher {obj.teacher}: {target.shape[-1]} classes, the student's head {head!r} "
                              f"has {logits.shape[-1]}")
        term = kd_loss(logits, target, obj.temperature)
    return distill_loss(term, logits, labels, obj.alpha)
