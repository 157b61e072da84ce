"""Tasks: how one (data, objective) pair turns a batch into a loss, and how big its batches are.

Shared by the training loop (AGD and mixed steps) and the benchmarks, so a task means the
same thing everywhere. A batch is a ``dict[str, np.ndarray]`` of processed columns.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imp_platform.config.train import PretrainConfig, TaskConfig
from imp_platform.data import modalities as registry
from imp_platform.data.captions import IDS as CAPTIONS_IDS
from imp_platform.data.captions import flatten_captions

def task_columns(task: TaskConfig) -> list[str]:
    """The processed columns a task's batches carry: its modalities', a distill teacher's inputs
    (or its stored outputs), the label."""
    distill = [o for o in task.objectives if o.kind == "distill"]
    teacher = [m for o in distill if not o.teacher_column for m in o.teacher_modalities]
    cols = list(dict.fromkeys([*(c for m in [*task.modalities, *teacher] for c in registry.modality(m).columns),
                               *(o.teacher_column for o in distill if o.teacher_column)]))
    if any(o.uses_labels for o in task.objectives):
        cols.append(task.label)
        if task.labelled_fraction < 1:
            cols.append("key")
    return cols


def task_labels(task: TaskConfig, batch: dict[str, np.ndarray], device: torch.device) -> torch.Tensor:
    """The batch's class ids as the task sees them: with ``labelled_fraction`` < 1, the labels of
    samples outside the fraction (by a hash of their key, so fixed across steps and runs) are -1."""
    labels = np.asarray(batch[task.label], dtype=np.int64)
    if task.labelled_fraction < 1:
        shown = np.array([zlib.crc32(str(k).encode()) / 2**32 < task.labelled_fraction for k in batch["key"]])
        labels = np.where(shown, labels, -1)
    return torch.as_tensor(labels, dtype=torch.long, device=device)


def head_name(task_name: str) -> str:
    """Classification heads are per task (one labelled dataset each, as in IMP)."""
    return task_name


def head_modalities(cfg: PretrainConfig) -> dict[str, str]:
    """Classification head -> the modality it reads: one head per task with labels (its first modality)."""
    return {head_name(name): task.modalities[0] for name, task in cfg.tasks.items()
            if any(o.uses_labels for o in task.objectives)}


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
        if any(o.uses_labels for o in t.objectives)}}
    if any(o.kind == "caption" for t in cfg.tasks.values() for o in t.objectives):
        data["decoder"] = {**data.get("decoder", {}), "enabled": True}
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
    """Encoder tokens one sample of ``task`` costs after DropToken (the budget counts kept tokens;
    MIL-NCE over several captions counts all K of them)."""
    texts = shapes[CAPTIONS_IDS][0] if several_captions(task, shapes) else 1
    return sum(int(model.num_tokens(m, tuple(shapes[registry.modality(m).column]), task.drop_rate(m))) * (texts if m == "text" else 1)
               for m in task.modalities)


def several_captions(task: TaskConfig, batch: Mapping[str, Any]) -> bool:
    """Whether the task's text is every stored caption of a row: MIL-NCE on a bucket with several (``data.captions``)."""
    return CAPTIONS_IDS in batch and "text" in task.modalities and any(o.kind == "mil_nce" for o in task.objectives)


@dataclass
class TaskOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # detached scalars: the step never waits on the device for metrics
    samples: int
    expert_load: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def to_inputs(modality: str, batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, dict]:
    """Processed columns -> (model input, encode kwargs) for one modality."""
    spec = registry.modality(modality)
    if spec.mask_column is not None:
        ids = torch.as_tensor(batch[spec.column], dtype=torch.long, device=device)
        return ids, {"mask": torch.as_tensor(batch[spec.mask_column], dtype=torch.bool, device=device)}
    x = torch.as_tensor(batch[spec.column], device=device)
    if spec.dtype == "uint8":  # pixels -> [0, 1]
        x = x.float().div_(255.0)
    return x.float(), {}


def encode(model: Any, modality: str, batch: dict[str, np.ndarray], device: torch.device, drop_rate: float = 0.0):
    x, kwargs = to_inputs(modality, batch, device)
    if drop_rate > 0:
        kwargs["drop_rate"] = drop_rate
    return model.encode(modality, x, **kwargs)


def captions_only(task: TaskConfig) -> bool:
    """Whether the task's text is only caption targets (no contrastive objective), so the encoder skips it."""
    kinds = {o.kind for o in task.objectives}
    return "caption" in kinds and not kinds & {"nce", "mil_nce"}


def run_task(model: Any, name: str, task: TaskConfig, batch: dict[str, np.ndarray], device: torch.device) -> TaskOutput:
    """Forward one task's batch: weighted sum of its objectives plus the encoders' MoE aux losses."""
    from imp_platform.objectives import caption_loss, classification_loss, mil_nce_loss, nce_loss
    from imp_platform.train.dist import is_distributed

    multi = several_captions(task, batch)  # then text is encoded as the rows' real captions, flattened
    positives, text_batch = flatten_captions(batch) if multi else (None, batch)
    outs = {m: encode(model, m, text_batch if m == "text" else batch, device, task.drop_rate(m) if model.training else 0.0)
            for m in task.modalities if m != "text" or not captions_only(task)}
    loss = sum(o.aux_loss for o in outs.values())
    parts: dict[str, torch.Tensor] = {"aux": loss.detach()}
    for obj in task.objectives:
        if obj.kind == "classification":
            modality = task.modalities[0]
            logits = model.classify(outs[modality].pooled, head_name(name))
            value = classification_loss(logits.float(), task_labels(task, batch, device))
        elif obj.kind == "distill":
            from imp_platform.train.teacher import distill_value

            value = distill_value(model, head_name(name), task.modalities[0], obj, outs, batch,
                                  task_labels(task, batch, device), device)
        elif obj.kind == "caption":  # CoCa: the decoder reads the same encoder forward as the other objectives
            ids, text = to_inputs("text", batch, device)
            logits = model.caption_logits(outs[task.modalities[0]], ids)
            value = caption_loss(logits, ids, text["mask"], model.decoder.eos_id, obj.label_smoothing or 0.0)
        else:
            a, b = task.modalities
            za = model.project(outs[a].pooled, a, b).float()
            zb = model.project(outs[b].pooled, b, a).float()
            temperature, gather = model.temperature(a, b), is_distributed()  # negatives from every rank
            if multi:  # the captions side as [B, K, D] (symmetric loss: text may be either modality)
                mask = torch.as_tensor(positives, device=device)
                za, zb = (zb, za) if a == "text" else (za, zb)
                zb = zb.new_zeros(*mask.shape, zb.shape[-1]).index_put((mask,), zb)
            value = (nce_loss(za, zb[:, 0] if multi else zb, temperature, gather=gather) if obj.kind == "nce"
                     else mil_nce_loss(za, zb if multi else zb[:, None], temperature, mask=mask if multi else None,
                                       gather=gather))
        parts[obj.kind] = value.detach()
        loss = loss + obj.weight * value
    load = {m: {str(layer): v.detach().float() for layer, v in o.expert_load.items()}
            for m, o in outs.items() if o.expert_load}
    for m, o in outs.items():  # Expert Choice balances load by construction; coverage is what varies
        if o.moe:
            parts[f"coverage_{m}"] = torch.stack([s.coverage.float() for s in o.moe.values()]).mean()
    return TaskOutput(loss=loss, parts=parts, samples=len(next(iter(batch.values()))), expert_load=load)
