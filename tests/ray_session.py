"""Tests that start a Ray of their own in a subprocess (`ray start`, `platform data preprocess`) give it
its own ``RAY_TMPDIR``: a plain ``ray.init()`` would otherwise join any cluster `ray start` left on this
machine (it looks in /tmp/ray), and the processes of that session can be found and stopped afterwards
without `ray stop`, which stops every Ray of the user."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil


@contextmanager
def ray_tmpdir() -> Iterator[Path]:
    """A short temporary RAY_TMPDIR (Ray's socket paths must fit 107 bytes); on exit every process
    that inherited it is SIGKILLed and the folder removed."""
    # A process that outlives the kill by a moment may still write its session logs: no error then.
    with tempfile.TemporaryDirectory(prefix="rt-", ignore_cleanup_errors=True) as root:
        try:
            yield Path(root)
        finally:
            kill_session(Path(root))


def kill_session(ray_tmp: Path) -> None:
    """SIGKILL the processes whose environment has ``RAY_TMPDIR=ray_tmp`` (all a session started)."""
    killed = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_TMPDIR") == str(ray_tmp):
                proc.kill()
                killed.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    psutil.wait_procs(killed, timeout=10)


def driver_pid(script: str, marker: str) -> int:
    """The pid of a submitted job's driver: the python process running ``script`` (e.g. jobs/tune.py)
    with ``marker`` in one of its arguments (a test's own path, so no other job matches)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if len(argv) > 2 and argv[1].endswith(script) and any(marker in arg for arg in argv):
            return int(proc.name)
    raise AssertionError(f"no {script} driver with {marker} in its arguments")


def lines(path: Path) -> list[str]:
    """A debug file's lines (none if the file is not there yet)."""
    return path.read_text().split("\n")[:-1] if path.exists() else []
