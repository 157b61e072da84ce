"""What every benchmark shares: timing with warm-up, machine facts, and the JSON writer.

Targets live in the JSON as ratios against a baseline measured in the same run, so the
numbers stay comparable across machines; nothing here asserts a speed.
"""

from __future__ import annotations

import json
import os
import platform as std_platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> dict[str, float]:
    """Median/min/mean wall seconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "mean_s": statistics.fmean(samples)}


@dataclass(frozen=True)
class Throughput:
    """Items/s of a stream, end to end and in steady state (from its first output to its last).

    Start-up (worker processes, imports) is a fixed cost that a short benchmark input
    over-weights; the steady rate is what a long run approaches, the end-to-end one what a
    short run gets. Both are reported.
    """

    items: int
    seconds: float
    first_output_s: float
    first_items: int

    @classmethod
    def measure(cls, counts: Iterable[int]) -> Throughput:
        """Consume ``counts`` (items per output as they arrive) and time it."""
        start = time.perf_counter()
        first_s, first, items = 0.0, 0, 0
        for n in counts:
            if not first:
                first_s, first = time.perf_counter() - start, n
            items += n
        return cls(items, time.perf_counter() - start, first_s, first)

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    @property
    def steady_rate(self) -> float:
        """Items after the first output over the time after it (the end-to-end rate if one output)."""
        after = self.seconds - self.first_output_s
        return (self.items - self.first_items) / after if self.items > self.first_items and after > 0 else self.rate

    def summary(self) -> dict[str, float]:
        return {"samples": self.items, "seconds": round(self.seconds, 3), "first_output_s": round(self.first_output_s, 3),
                "samples_per_s": round(self.rate, 3), "steady_samples_per_s": round(self.steady_rate, 3)}


def machine_info() -> dict[str, Any]:
    """Facts needed to read a result: cores, Python, torch/ray versions, accelerator."""
    info: dict[str, Any] = {
        "host_cpus": os.cpu_count(),
        "python": std_platform.python_version(),
        "machine": std_platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def write_results(out: Path, name: str, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``results`` with the benchmark name, time and machine facts to ``out`` (JSON)."""
    payload = {
        "benchmark": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **results,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=False))
    return payload


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to 3 decimals, or None when either side is missing (a benchmark part that did not run)."""
    return round(a / b, 3) if a is not None and b else None
