"""Training-state checkpoints: one directory that is both resumable and evaluable, and holds nothing executable.

Layout (rank 0 writes all but the rank files; Ray Train V2 merges every rank's files into one
checkpoint directory in ``storage_path``):
- ``model.safetensors`` + ``config.json``: ``imp_platform.model.io`` format (eval loads just these),
- ``train_state.pt``: optimizer, lr schedule, AGD sampler, step, skip counters: tensors and plain
  numbers only, loaded with ``weights_only=True`` (a planted pickle is refused, never run),
- ``pretrain.yaml``: the run config with credentials redacted (eval finds the held-out data through it),
- ``history.json``: the logged metric rows,
- ``rank-<r>-of-<w>.json``: that rank's data stream positions and RNG states (JSON),
- sharded (FSDP) runs: ``dcp/`` (``torch.distributed.checkpoint``: every rank's shards of the model
  and optimizer, ``.metadata`` from rank 0) and ``config.json`` in place of ``model.safetensors``
  and the optimizer in ``train_state.pt``. DCP reshards on load, so a run saved on N workers
  resumes on M; ``load_model`` consolidates the shards in one process for eval and export.
  Each rank file records the sizes of that rank's shard files. Shards may be written in the
  background (``start_checkpoint`` with an ``async_group``): the rank file and the marker follow
  once they are,
- either layout resumes in either (``load_training_state``): weights and AdamW state are matched
  by parameter name and laid out as the resuming run's model is,
- ``COMPLETE.json``: written last by rank 0: the size of each of its files and the names of every
  rank's file. A directory without it, or whose files disagree with it (an upload cut short), is
  refused: a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from concurrent import futures
from concurrent.futures import Future
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
SHARDS = "dcp"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or holds something other than plain data; the message names the file."""


class CheckpointClock:
    """When a checkpoint is due besides evals: every ``steps`` steps, or once ``seconds`` of wall clock
    have passed since the last one (``run.checkpoint_every`` as 200 or "10m").

    Clocks of different ranks disagree, so ``time_up`` is one rank's view: the loop all-reduces it
    and every rank checkpoints at the same step if any rank's time is up.
    """

    def __init__(self, steps: int | None, seconds: float | None, clock: Any = time.monotonic) -> None:
        self.steps, self.seconds, self._clock = steps, seconds, clock
        self._last = clock()

    def step_due(self, done: int) -> bool:
        return self.steps is not None and done % self.steps == 0

    def time_up(self) -> bool:
        return self.seconds is not None and self._clock() - self._last >= self.seconds

    def restart(self) -> None:
        """A checkpoint was just taken: the wall-clock interval counts from now."""
        self._last = self._clock()


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:03d}-of-{world_size:03d}.json"


def save_checkpoint(directory: str | Path, *, rank: int, world_size: int, rank_state: dict[str, Any],
                    model: torch.nn.Module | None = None, model_cfg: Any = None, cfg: PretrainConfig | None = None,
                    train_state: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write this rank's share of a checkpoint into ``directory`` (``start_checkpoint``, waited for)."""
    return start_checkpoint(directory, rank=rank, world_size=world_size, rank_state=rank_state, model=model,
                            model_cfg=model_cfg, cfg=cfg, train_state=train_state, history=history,
                            optimizer=optimizer).finish()


class PendingCheckpoint:
    """A checkpoint whose DCP shards may still be being written (``parallel.async_checkpoint``).

    ``finish`` waits for them, then writes this rank's file (with the sizes of its shard files)
    and, on rank 0, ``COMPLETE.json``: until then the directory is not a checkpoint.
    """

    def __init__(self, directory: Path, rank: int, world_size: int, rank_state: dict[str, Any], sharded: bool,
                 writing: Future | None = None) -> None:
        self.directory, self.rank, self.world_size = directory, rank, world_size
        self._rank_state, self._sharded, self._writing = rank_state, sharded, writing

    def wait(self) -> None:
        """Block until the shard write is over, whether it succeeded or not."""
        if self._writing is not None:
            futures.wait([self._writing])

    def finish(self) -> Path:
        files = {}
        if self._writing is not None:
            self._writing.result()
        if self._sharded:
            path = self.directory / SHARDS
            files = {f"{SHARDS}/{p.name}": p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
        (self.directory / rank_file(self.rank, self.world_size)).write_text(json.dumps({**self._rank_state,
                                                                                       "files": files}))
        if self.rank == 0:
            _write_marker(self.directory, self.world_size)
        return self.directory


def start_checkpoint(directory: str | Path, *, rank: int, world_size: int, rank_state: dict[str, Any],
                     model: torch.nn.Module | None = None, model_cfg: Any = None, cfg: PretrainConfig | None = None,
                     train_state: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
                     optimizer: torch.optim.Optimizer | None = None, async_group: Any = None) -> PendingCheckpoint:
    """Start writing this rank's share of a checkpoint into ``directory`` (rank 0 passes the model and state).

    ``rank_state`` is JSON (stream cursors, RNG states); ``train_state`` holds tensors and numbers.
    ``optimizer`` given: a sharded run, where every rank passes its model and optimizer and writes
    its shards (``save_sharded``, a collective), in the background over ``async_group`` if given.
    Everything is captured now; later training steps do not change what is written.
    """
    from imp_platform.model.io import CONFIG, save_pretrained

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writing = save_sharded(directory, model, optimizer, async_group) if optimizer is not None else None
    if rank == 0:
        if optimizer is None:
            save_pretrained(model, model_cfg, directory)
        else:
            (directory / CONFIG).write_text(json.dumps(model_cfg.model_dump(mode="json"), indent=2))
        torch.save(train_state, directory / TRAIN_STATE)
        dump_yaml(cfg, directory / RUN_CONFIG)
        (directory / HISTORY).write_text(json.dumps(history or []))
    return PendingCheckpoint(directory, rank, world_size, rank_state, optimizer is not None, writing)


def async_checkpoint_group() -> Any:
    """The process group for background DCP writes (every rank calls it once, together): a gloo
    group of its own, because the write's collectives run in another thread than training's, which
    must not share a group with them; gloo because ``async_save`` needs a CPU backend."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None


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
    sizes = dict(marker["files"])
    for name in marker["ranks"]:
        if (directory / name).exists():
            try:
                sizes.update(json.loads((directory / name).read_text()).get("files", {}))
            except json.JSONDecodeError:
                problems.append(f"{name} is not complete JSON")
    for name, size in sizes.items():
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


def ray_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A ``ray.train.Checkpoint`` of a checkpoint URI (local path or s3://, with the run's storage options)."""
    from ray.train import Checkpoint

    from imp_platform.train.trainer import arrow_storage

    path, filesystem = arrow_storage(uri, storage_options)
    return Checkpoint(path, filesystem=filesystem)


def load_history(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / HISTORY
    return json.loads(path.read_text()) if path.exists() else []


def load_run_config(directory: str | Path) -> PretrainConfig:
    return load_pretrain_config(Path(directory) / RUN_CONFIG)


def verify_model_dir(directory: str | Path) -> Path:
    """``directory`` as a Path once it is known to hold a whole model: an exported model dir
    (``config.json`` + ``model.safetensors``, no training state) or a complete run checkpoint.

    Anything else is taken for a run checkpoint and must pass ``verify_complete``: eval, inference
    and ``model.init_from`` never read a half-uploaded one, whichever of its files the interrupted
    upload had copied. ``FileNotFoundError`` when there is no such directory.
    """
    from imp_platform.model.io import CONFIG, WEIGHTS

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {directory} (a run checkpoint or an exported model directory)")
    files = {p.name for p in directory.iterdir()}
    if COMPLETE in files or TRAIN_STATE in files or not {CONFIG, WEIGHTS} <= files:
        verify_complete(directory)
    return directory


def load_model(directory: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, ModelConfig) from a checkpoint directory (``verify_model_dir``), on CPU in eval mode
    (a sharded one consolidated)."""
    from imp_platform.model.io import load_pretrained

    verify_model_dir(directory)
    if is_sharded(directory):
        model, model_cfg = _consolidate(Path(directory))
    else:
        model, model_cfg = load_pretrained(directory)
    return model.eval(), model_cfg


def is_sharded(directory: str | Path) -> bool:
    """Whether the checkpoint holds DCP shards (an FSDP run) rather than ``model.safetensors``."""
    return (Path(directory) / SHARDS).is_dir()


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 async_group: Any = None) -> Future | None:
    """This rank's DCP shards of the model and optimizer in ``directory/dcp`` (every rank calls it
    together). Keys are the model's own parameter names, so any world size (or one process) can
    read them back. With ``async_group``: the state is copied now and written in a background
    thread whose collectives use that group; the write's future."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state, path = {"model": model_state, "optimizer": optim_state}, directory / SHARDS
    if async_group is None:
        dcp.save(state, checkpoint_id=path)
        return None
    return dcp.async_save(state, checkpoint_id=path, process_group=async_group)


def load_training_state(directory: str | Path, train_state: Mapping[str, Any], model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> None:
    """The model weights and optimizer state of a checkpoint of either layout into ``model`` and
    ``optimizer`` laid out in either (replicated, FSDP, expert-parallel; every rank calls it
    together): a run may resume with other ``parallel:`` settings than it was saved with."""
    if is_sharded(directory):
        load_sharded(directory, model, optimizer)
    else:
        load_replicated(directory, train_state["optimizer"], model, optimizer)


def load_sharded(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load DCP shards saved by any world size into ``model`` and ``optimizer``: this rank's shards
    of a sharded model, the whole state of a replicated one.

    Every model weight must be there. Optimizer state may lack parameters: AdamW creates a
    parameter's state at its first gradient, and AGD steps had not reached every task's layers
    when the checkpoint was taken; those get no state, as in the run that saved it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(directory) / SHARDS
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state}, checkpoint_id=path)
    optim = {"optimizer": optim_state}
    dcp.load(optim, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim["optimizer"])
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    _forget_unsaved(model, optimizer, {name for name, _ in model.named_parameters()
                                       if f"optimizer.state.{name}.step" in saved})


def load_replicated(directory: str | Path, optim_state: Mapping[str, Any], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """``model.safetensors`` and the optimizer state of a replicated checkpoint into ``model`` and
    ``optimizer`` of any layout: both turned into full, name-keyed state that ``set_state_dict``
    shards the way ``model`` is laid out (FSDP, expert shards) or copies whole (replicated)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from imp_platform.model.io import WEIGHTS

    by_name = _optimizer_state_by_name(optim_state, model, optimizer, Path(directory) / TRAIN_STATE)
    weights = load_file(str(Path(directory) / WEIGHTS))
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    # not strict: parameters without state (see ``load_sharded``) are allowed
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True, strict=False))
    _forget_unsaved(model, optimizer, set(by_name["state"]))


def _optimizer_state_by_name(optim_state: Mapping[str, Any], model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer, source: Path) -> dict[str, Any]:
    """``torch.optim`` state (keyed by position in the param groups) keyed by parameter name instead:
    positions follow ``build_optimizer``'s groups, the same in every layout."""
    saved_groups, own_groups = optim_state["param_groups"], optimizer.param_groups
    saved_sizes, own_sizes = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in own_groups]
    if saved_sizes != own_sizes:
        raise CheckpointError(f"{source}: optimizer param groups of sizes {saved_sizes}, this model has {own_sizes}: "
                              "not a checkpoint of this model")
    names = {id(p): n for n, p in model.named_parameters()}
    name_of = {i: names[id(p)] for saved, own in zip(saved_groups, own_groups)
               for i, p in zip(saved["params"], own["params"])}
    return {"state": {name_of[i]: state for i, state in optim_state["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in saved_groups]}


def _forget_unsaved(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: set[str]) -> None:
    """Drop the optimizer state of parameters the checkpoint had none for. ``set_state_dict`` first
    gives every parameter a state (a zero-gradient step: step 1, zero moments); kept, a parameter's
    first real update would use step 2's bias correction instead of a fresh state's step 1."""
    for name, param in model.named_parameters():
        if name not in saved:
            optimizer.state.pop(param, None)


def _consolidate(directory: Path) -> tuple[torch.nn.Module, Any]:
    """The full model from a sharded checkpoint, read in this one process (no process group needed)."""
    import torch.distributed.checkpoint as dcp

    from imp_platform.config.base import validate
    from imp_platform.config.model import ModelConfig
    from imp_platform.model import build_model
    from imp_platform.model.io import CONFIG

    path = directory / CONFIG
    model_cfg = validate(ModelConfig, json.loads(path.read_text()), source=str(path))
    model = build_model(model_cfg)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=directory / SHARDS, no_dist=True)
    model.load_state_dict(state["model"])
    return model, model_cfg


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
