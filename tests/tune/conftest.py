"""Tune test helpers: sweep YAML files over the embedded pretrain config.

Trials train on the shared ``processed_root`` / ``tiny_overrides`` fixtures of tests/conftest.py,
exactly like the train tests do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "jobs" / "configs" / "pretrain.yaml"


@pytest.fixture
def make_sweep(tmp_path: Path) -> Callable[..., Path]:
    """``make_sweep(space, **fields)`` writes a sweep YAML (4-step budget, storage in tmp) and returns its path."""

    def write(space: dict, **fields) -> Path:
        doc = {"name": "t", "base": str(BASE), "steps": 4, "storage_path": str(tmp_path / "tune"),
               "space": space, **fields}
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write
