"""Weights export: ``model.safetensors`` + ``config.json`` (the ModelConfig), loadable from those alone.

Tensor names are the module's ``state_dict`` keys. Expert layout, per sparse layer ``i``:
``encoder.blocks.{i}.ffn.w1`` [E, d_model, mlp_dim] and ``encoder.blocks.{i}.ffn.w2``
[E, mlp_dim, d_model] (expert ``e`` computes ``gelu(x @ w1[e]) @ w2[e]``, no biases);
``encoder.blocks.{i}.ffn.router`` [E, d_model] float32 (logits = x @ router.T, nn.Linear's layout).
Dense layers hold ``encoder.blocks.{i}.ffn.fc1/fc2`` (``nn.Linear``, weight [out, in]).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from imp_platform.config.base import validate
from imp_platform.config.model import ModelConfig
from imp_platform.model.imp import IMPModel, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(model: IMPModel, cfg: ModelConfig, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt", "preset": cfg.preset or ""})
    (directory / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return directory


def load_pretrained(directory: str | Path, device: str = "cpu") -> tuple[IMPModel, ModelConfig]:
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} not found (expected {CONFIG} and {WEIGHTS})")
    cfg = validate(ModelConfig, json.loads((directory / CONFIG).read_text()), source=str(directory / CONFIG))
    model = build_model(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS), device=device), strict=True)
    return model.to(device), cfg
