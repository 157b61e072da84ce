"""Tune test helpers: sweep YAML files over the embedded pretrain config, and the train tests' data.

``processed_root`` (the session's synth shards preprocessed once) and ``tiny_overrides`` (a
tiny, fast pretraining config on it) are the train stream's fixtures, re-exported here rather
than copied, so trials in the sweep test train exactly like the train tests do.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "jobs" / "configs" / "pretrain.yaml"

_spec = importlib.util.spec_from_file_location("train_test_fixtures", REPO / "tests" / "train" / "conftest.py")
_train_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train_fixtures)
processed_root = _train_fixtures.processed_root
tiny_overrides = _train_fixtures.tiny_overrides


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
