"""Tasks: how one (data, objective) pair turns a batch into a loss, and how big its batches are.

Shared by the training loop (AGD and mixed steps) and the benchmarks, so a task means the
same thing everywhere. A batch is a ``dict[str, np.ndarray]`` of processed columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imp_platform.config.train import PretrainConfig, TaskConfig

# Processed columns each model modality reads.
COLUMNS = {"video": ["video"], "image": ["image"], "audio_mel": ["audio_mel"], "audio_wave": ["audio_wave"],
           "text": ["text_ids", "text_mask"]}


def task_columns(task: TaskConfig) -> list[str]:
    cols = [c for m in task.modalities for c in COLUMNS[m]]
    if any(o.kind == "classification" for o in task.objectives):
        cols.append(task.label)
    return cols


def head_name(task_name: str) -> str:
    """Classification heads are per task (one labelled dataset each, as in IMP)."""
    return task_name


def resolve_model_config(cfg: PretrainConfig):
    """The run's ModelConfig: preset (+moe) with dotted overrides and one head per classification task."""
    from imp_platform.config import validate
    from imp_platform.config.base import apply_overrides
    from imp_platform.config.model import ModelConfig
    from imp_platform.model.presets import preset

    base = preset(cfg.model.preset, moe=cfg.model.moe).model_dump(mode="json")
    overrides = [f"{k}={_yaml_scalar(v)}" for k, v in cfg.model.overrides.items()]
    data = apply_overrides(base, overrides)
    data["heads"] = {**data.get("heads", {}), **{
        head_name(name): num_classes(cfg, name) for name, t in cfg.tasks.items()
        if any(o.kind == "classification" for o in t.objectives)}}
    return validate(ModelConfig, data, source="model (preset + model.overrides)")


def num_classes(cfg: PretrainConfig, name: str) -> int:
    """A classification task's class count: its ``num_classes``, else its split's dataset card's."""
    from imp_platform.config import ConfigError
    from imp_platform.data.dataset import load_card

    task = cfg.tasks[name]
    count = task.num_classes or load_card(cfg, task.split).num_classes
    if not count:
        raise ConfigError(f"tasks.{name}: set num_classes, or declare dataset.classes in the pipeline YAML")
    return count


def _yaml_scalar(value: Any) -> str:
    import json

    return json.dumps(value)


def tokens_per_sample(model: Any, task: TaskConfig, shapes: dict[str, list[int]]) -> int:
    """Encoder tokens one sample of ``task`` costs after DropToken (the budget counts kept tokens)."""
    return sum(int(model.num_tokens(m, tuple(shapes[COLUMNS[m][0]]), task.drop_rate(m))) for m in task.modalities)


@dataclass
class TaskOutput:
    loss: torch.Tensor
    parts: dict[str, float]
    samples: int
    expert_load: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def to_inputs(modality: str, batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, dict]:
    """Processed columns -> (model input, encode kwargs) for one modality."""
    if modality == "text":
        ids = torch.as_tensor(batch["text_ids"], dtype=torch.long, device=device)
        return ids, {"mask": torch.as_tensor(batch["text_mask"], dtype=torch.bool, device=device)}
    x = torch.as_tensor(batch[COLUMNS[modality][0]], device=device)
    if modality in ("video", "image"):
        x = x.float().div_(255.0)
    return x.float(), {}


def encode(model: Any, modality: str, batch: dict[str, np.ndarray], device: torch.device, drop_rate: float = 0.0):
    x, kwargs = to_inputs(modality, batch, device)
    if drop_rate > 0:
        kwargs["drop_rate"] = drop_rate
    return model.encode(modality, x, **kwargs)


def run_task(model: Any, name: str, task: TaskConfig, batch: dict[str, np.ndarray], device: torch.device) -> TaskOutput:
    """Forward one task's batch: weighted sum of its objectives plus the encoders' MoE aux losses."""
    from imp_platform.objectives import classification_loss, mil_nce_loss, nce_loss
    from imp_platform.train.dist import is_distributed

    outs = {m: encode(model, m, batch, device, task.drop_rate(m) if model.training else 0.0) for m in task.modalities}
    loss = sum(o.aux_loss for o in outs.values())
    parts: dict[str, float] = {"aux": float(loss.detach())}
    for obj in task.objectives:
        if obj.kind == "classification":
            modality = task.modalities[0]
            logits = model.classify(outs[modality].pooled, head_name(name))
            labels = torch.as_tensor(batch[task.label], dtype=torch.long, device=device)
            value = classification_loss(logits.float(), labels)
        else:
            a, b = task.modalities
            za = model.project(outs[a].pooled, a, b).float()
            zb = model.project(outs[b].pooled, b, a).float()
            temperature, gather = model.temperature(a, b), is_distributed()  # negatives from every rank
            value = (nce_loss(za, zb, temperature, gather=gather) if obj.kind == "nce"
                     else mil_nce_loss(za, zb[:, None], temperature, gather=gather))
        parts[obj.kind] = float(value.detach())
        loss = loss + obj.weight * value
    load = {m: {str(layer): v.detach().float().cpu().tolist() for layer, v in o.expert_load.items()}
            for m, o in outs.items() if o.expert_load}
    for m, o in outs.items():  # Expert Choice balances load by construction; coverage is what varies
        if o.moe:
            parts[f"coverage_{m}"] = float(sum(float(s.coverage) for s in o.moe.values()) / len(o.moe))
    return TaskOutput(loss=loss, parts=parts, samples=len(next(iter(batch.values()))), expert_load=load)
