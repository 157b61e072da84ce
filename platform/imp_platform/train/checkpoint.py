"""Training-state checkpoints: one directory that is both resumable and evaluable, and holds nothing executable.

Layout (rank 0 writes all but the rank files; Ray Train V2 merges every rank's files into one
checkpoint directory in ``storage_path``):
- ``model.safetensors`` + ``config.json``: ``imp_platform.model.io`` format (eval loads just these),
- ``train_state.pt``: optimizer, lr schedule, AGD sampler, step, skip counters: tensors and plain
  numbers only, loaded with ``weights_only=True`` (a planted pickle is refused, never run),
- ``pretrain.yaml``: the run config with credentials redacted (eval finds the held-out data through it),
- ``history.json``: the logged metric rows,
- ``rank-<r>-of-<w>.json``: that rank's data stream positions and RNG states (JSON),
- ``COMPLETE.json``: written last by rank 0: the size of each of its files and the names of every
  rank's file. A directory without it, or whose files disagree with it (an upload cut short), is
  refused: a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imp_platform.config import dump_yaml
from imp_platform.config.train import PretrainConfig, load_pretrain_config

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "pretrain.yaml"
HISTORY = "history.json"
COMPLETE = "COMPLETE.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or holds something other than plain data; the message names the file."""


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:03d}-of-{world_size:03d}.json"


def save_checkpoint(directory: str | Path, *, rank: int, world_size: int, rank_state: dict[str, Any],
                    model: torch.nn.Module | None = None, model_cfg: Any = None, cfg: PretrainConfig | None = None,
                    train_state: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None) -> Path:
    """Write this rank's share of a checkpoint into ``directory`` (rank 0 passes the model and state).

    ``rank_state`` is JSON (stream cursors, RNG states); ``train_state`` holds tensors and numbers.
    """
    from imp_platform.model.io import save_pretrained

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / rank_file(rank, world_size)).write_text(json.dumps(rank_state))
    if rank == 0:
        save_pretrained(model, model_cfg, directory)
        torch.save(train_state, directory / TRAIN_STATE)
        dump_yaml(cfg, directory / RUN_CONFIG)
        (directory / HISTORY).write_text(json.dumps(history or []))
        _write_marker(directory, world_size)
    return directory


def _write_marker(directory: Path, world_size: int) -> None:
    """``COMPLETE.json`` last: rank 0's files with their sizes, and every rank's file by name."""
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
             if p.is_file() and not p.name.startswith("rank-") and p.name != COMPLETE}
    marker = {"files": sizes, "ranks": [rank_file(r, world_size) for r in range(world_size)]}
    (directory / COMPLETE).write_text(json.dumps(marker))


def verify_complete(directory: str | Path) -> None:
    """Raise ``CheckpointError`` unless every file the marker names is there at its recorded size."""
    directory = Path(directory)
    marker_path = directory / COMPLETE
    if not marker_path.exists():
        raise CheckpointError(f"{directory}: no {COMPLETE}: the checkpoint was not completely written; refusing it")
    marker = json.loads(marker_path.read_text())
    problems = [f"{name} missing" for name in marker["ranks"] if not (directory / name).exists()]
    for name, size in marker["files"].items():
        path = directory / name
        if not path.exists():
            problems.append(f"{name} missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} written")
    if problems:
        raise CheckpointError(f"{directory}: incomplete checkpoint ({'; '.join(problems)}); refusing it")


def load_train_state(directory: str | Path) -> dict[str, Any]:
    """The optimizer/scheduler/sampler state, loaded with ``weights_only=True``: no code runs on load."""
    path = Path(directory) / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (or a RuntimeError wrapping it) for foreign objects
        raise CheckpointError(f"{path}: refusing to load: it holds more than tensors and plain numbers "
                              f"(weights_only load failed: {str(exc).splitlines()[0]})") from None


def load_rank_states(directory: str | Path) -> list[dict[str, Any]]:
    """Every rank's saved JSON state (cursors and RNG), in rank order, whatever world size wrote them."""
    names = json.loads((Path(directory) / COMPLETE).read_text())["ranks"]
    return [json.loads((Path(directory) / name).read_text()) for name in names]


def open_for_resume(directory: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(train state, every rank's JSON state) of a complete checkpoint; ``CheckpointError`` otherwise."""
    verify_complete(directory)
    return load_train_state(directory), load_rank_states(directory)


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


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states as JSON-safe lists.

    Saved per rank so a resumed run draws the same DropToken masks (and anything else random)
    as an uninterrupted one would have.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
