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
from collections.abc import Callable
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
