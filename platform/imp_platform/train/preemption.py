"""A checkpoint on SIGTERM (preemption) before the worker goes.

KubeRay, a spot reclaim or ``kubectl delete`` send SIGTERM, then SIGKILL after the grace period.
Ray Train V2 runs the training function in a thread of the worker actor, while Python runs signal
handlers only in the main thread, where Ray's worker installs one that exits at once (the steps
since the last checkpoint are lost). ``worker_callback`` gives Ray Train a worker callback whose
``after_init_train_context`` runs in the actor's main thread (a plain actor runs its methods
there) and replaces that handler: while the loop runs (``arm``), SIGTERM only sets a flag. The
loop all-reduces the flag with its per-step checks, so every rank sees the request at the same
step, checkpoints it, and ``leave`` raises ``Preempted`` once Ray has taken the checkpoint: Ray
Train restarts the workers from it (one of ``run.max_failures``). A SIGTERM outside the loop, or a
second one, gets Ray's own handler.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, NoReturn

log = logging.getLogger(__name__)

_requested = threading.Event()  # a SIGTERM arrived while armed
_armed = threading.Event()  # the loop is running and will checkpoint on a request
_previous: Any = signal.SIG_DFL  # the handler ours replaced (Ray's)


class Preempted(RuntimeError):
    """The worker got SIGTERM; the checkpoint of the step named in the message was taken first."""


def install() -> None:
    """Put ``_on_sigterm`` in place of the current SIGTERM handler (must run in the main thread)."""
    global _previous
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    if previous is not _on_sigterm:
        _previous = previous


def _on_sigterm(signum: int, frame: Any) -> None:
    if _armed.is_set() and not _requested.is_set():
        _requested.set()
        log.warning("SIGTERM: checkpointing at the next step boundary, then stopping this run attempt")
        return
    signal.signal(signum, _previous)  # not training, or asked twice: what would have happened without us
    if callable(_previous):
        _previous(signum, frame)
    else:
        os.kill(os.getpid(), signum)


def arm() -> None:
    """From now on a SIGTERM asks for a checkpoint instead of ending the process."""
    _requested.clear()
    _armed.set()


def disarm() -> None:
    _armed.clear()


def requested() -> bool:
    """Whether this process got SIGTERM while armed (the loop all-reduces it over the ranks)."""
    return _requested.is_set()


def leave(step: int) -> NoReturn:
    """After the step's checkpoint was reported: wait until Ray Train has collected it, then raise ``Preempted``.

    Ray registers a checkpoint only once every rank's report reached the controller; raising
    earlier could end the attempt with this one unregistered (resumed from the one before).
    """
    from ray.train.v2._internal.execution.context import get_train_context  # no public way to wait for this

    get_train_context().get_result_queue().join()
    raise Preempted(f"SIGTERM: stopped after the checkpoint of step {step}; Ray Train resumes from it")


def worker_callback() -> Any:
    """The Ray Train worker callback that installs the handler in each worker's main thread."""
    from ray.train.v2._internal.execution.callback import WorkerCallback

    class InstallSigtermHandler(WorkerCallback):
        def after_init_train_context(self) -> None:
            if threading.current_thread() is threading.main_thread():
                install()
            else:
                log.warning("SIGTERM handler not installed: Ray Train initialised this worker off its main thread")

    return InstallSigtermHandler()
