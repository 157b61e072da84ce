"""Fixtures of the data tests: the coloured-shapes corpus (tests/data/realworld.py), written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from realworld import write_shapes_corpus


@pytest.fixture(scope="session")
def shapes_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shapes shards: ``train`` (24 samples, 3 shards) and ``test`` (16 samples, 2 shards) under ``root``."""
    root = tmp_path_factory.mktemp("shapes")
    return {"root": root, "train": write_shapes_corpus(root, "train", 24, seed=0),
            "test": write_shapes_corpus(root, "test", 16, seed=0)}
