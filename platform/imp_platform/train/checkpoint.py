"""Training-state checkpoints: one directory that is both resumable and evaluable.

Layout (rank 0 writes all but the cursors; Ray Train V2 merges every rank's files into one
checkpoint directory in ``storage_path``):
- ``model.safetensors`` + ``config.json``: ``imp_platform.model.io`` format (eval loads just these),
- ``train_state.pt``: optimizer, lr schedule, AGD sampler, step, metrics history,
- ``pretrain.yaml``: the full run config (eval finds the held-out data through it),
- ``cursor-rank-<r>-of-<w>.pt``: that rank's data stream positions (each rank reads its own shard).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from imp_platform.config import dump_yaml
from imp_platform.config.train import PretrainConfig, load_pretrain_config

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "pretrain.yaml"
HISTORY = "history.json"


def cursor_name(rank: int, world_size: int) -> str:
    return f"cursor-rank-{rank:03d}-of-{world_size:03d}.pt"


def save_checkpoint(directory: str | Path, *, rank: int, world_size: int, cursors: dict[str, Any],
                    model: torch.nn.Module | None = None, model_cfg: Any = None, cfg: PretrainConfig | None = None,
                    train_state: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None) -> Path:
    """Write this rank's share of a checkpoint into ``directory`` (rank 0 passes the model and state)."""
    from imp_platform.model.io import save_pretrained

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(cursors, directory / cursor_name(rank, world_size))
    if rank == 0:
        save_pretrained(model, model_cfg, directory)
        torch.save(train_state, directory / TRAIN_STATE)
        dump_yaml(cfg, directory / RUN_CONFIG)
        (directory / HISTORY).write_text(json.dumps(history or []))
    return directory


def load_train_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=False)


def load_cursors(directory: str | Path, rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's stream cursors, or None if the checkpoint was written by a different world size."""
    path = Path(directory) / cursor_name(rank, world_size)
    if not path.exists():
        log.warning("no data cursor for rank %d of %d in %s: streams restart from their seeds", rank, world_size, directory)
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def load_history(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / HISTORY
    return json.loads(path.read_text()) if path.exists() else []


def load_run_config(directory: str | Path) -> PretrainConfig:
    return load_pretrain_config(Path(directory) / RUN_CONFIG)


def load_model(directory: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, ModelConfig) from a checkpoint directory, on CPU in eval mode."""
    from imp_platform.model.io import load_pretrained

    model, model_cfg = load_pretrained(directory)
    return model.eval(), model_cfg
