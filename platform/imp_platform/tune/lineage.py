"""Tune checkpoints that point at Train checkpoints, and where a (re)started trial's Train run begins.

Each report a trial hands Tune carries a Tune checkpoint holding one small JSON file: which
trial and Train run wrote the Train checkpoint of that report, its step and its URI. The model
stays where Ray Train wrote it (copying it into Tune's trial folder at every report would double
the storage). Tune keeps these pointers like any checkpoint, so:
- PBT's exploit hands the exploiting trial its donor's pointer: the trial starts a new Train run
  from the donor's checkpoint (its weights, optimizer and sampler state, at the donor's step) with
  the trial's own perturbed values;
- a sweep resumed after its driver died hands each unfinished trial its own latest pointer: the
  trial continues its own Train run, which Ray Train restores from its latest checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

POINTER = "train_checkpoint.json"


@dataclass(frozen=True)
class TrainPointer:
    trial: str  # the Tune trial whose Train run wrote the checkpoint
    run: str  # that Train run's name
    step: int
    uri: str  # the Train checkpoint (local path or s3:// URI)


@contextmanager
def pointer_checkpoint(pointer: TrainPointer) -> Iterator[Any]:
    """A ``ray.tune.Checkpoint`` holding ``pointer`` (valid inside the block; Tune copies it on report)."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="imp-pointer-") as tmp:
        (Path(tmp) / POINTER).write_text(json.dumps(asdict(pointer)))
        yield tune.Checkpoint.from_directory(tmp)


def read_pointer(checkpoint: Any) -> TrainPointer | None:
    """The pointer in a Tune checkpoint (None for no checkpoint)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory) / POINTER
        if not path.exists():
            raise FileNotFoundError(f"{checkpoint.path}: Tune checkpoint without {POINTER}; not written by this sweep")
        return TrainPointer(**json.loads(path.read_text()))


def train_start(trial_id: str, pointer: TrainPointer | None) -> tuple[str, str | None]:
    """(Train run name, checkpoint URI to start from) for a trial that (re)starts with ``pointer``.

    No pointer: a new trial, run ``trial-<id>``. Its own pointer: continue that run by name (Ray
    Train resumes it from its own latest checkpoint, at or after the pointer). Another trial's
    pointer (PBT exploit): a new run named after the donor and step, started from that checkpoint.
    """
    if pointer is None:
        return f"trial-{trial_id}", None
    if pointer.trial == trial_id:
        return pointer.run, None
    return f"trial-{trial_id}-from-{pointer.trial}-{pointer.step}", pointer.uri
