"""Wall time of a job's phases (set-up, synth, preprocess, training, eval/report), measured in the driver.

The demo's target is end-to-end time, and a total alone does not say which phase to work on;
each run prints its breakdown and writes it with its metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


class PhaseTimer:
    """Seconds per named phase, in the order first entered; a phase entered twice adds up.

    ``since_process_start``: the first phase (``setup``) starts when the process did, so it also
    counts the interpreter's start and every import before it, and the total is the process's
    own wall time.
    """

    def __init__(self, since_process_start: bool = False) -> None:
        self._done: dict[str, float] = {}
        self._running: tuple[str, float] | None = None
        self._process_start = psutil.Process().create_time() if since_process_start else None  # epoch seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        if self._process_start is not None:
            began -= time.time() - self._process_start
            self._process_start = None
        self._running = (name, began)
        try:
            yield
        finally:
            self._done = self.seconds
            self._running = None

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far, the running phase's included up to now (for a report written inside it)."""
        out = dict(self._done)
        if self._running is not None:
            name, began = self._running
            out[name] = out.get(name, 0.0) + time.perf_counter() - began
        return out

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def metrics(self) -> dict[str, float]:
        """``time_<phase>_s`` and ``time_total_s``, rounded to 0.1 s (the metrics JSON's keys)."""
        seconds = self.seconds
        return {**{f"time_{k}_s": round(v, 1) for k, v in seconds.items()},
                "time_total_s": round(sum(seconds.values()), 1)}

    def table(self) -> str:
        """One line per phase with its share of the total, then the total."""
        seconds = self.seconds
        total = sum(seconds.values())
        lines = [f"  {name:<12} {s:7.1f} s  {100 * s / max(total, 1e-9):4.0f}%" for name, s in seconds.items()]
        return "\n".join([*lines, f"  {'total':<12} {total:7.1f} s"])
