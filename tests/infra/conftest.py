"""Fixtures of the infra tests: the strict KubeRay CRD schemas, found beside or inside the checkout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from infra_manifests import REPO

SCHEMA_FILES = {"RayCluster": "raycluster-v1.json", "RayJob": "rayjob-v1.json"}


def schema_dir() -> Path | None:
    """shared/ sits beside the repository in CI (a fresh clone) and may sit inside a checkout."""
    for root in (REPO.parent / "shared", REPO / "shared"):
        if all((root / "schemas" / "kuberay" / name).is_file() for name in SCHEMA_FILES.values()):
            return root / "schemas" / "kuberay"
    return None


@pytest.fixture(scope="session")
def kuberay_validators() -> dict[str, Any]:
    """kind -> a jsonschema validator for the strict ray.io/v1 CRD schema of that kind."""
    directory = schema_dir()
    if directory is None:
        pytest.skip(f"KubeRay CRD schemas not found in {REPO.parent / 'shared'} or {REPO / 'shared'} "
                    "(schemas/kuberay/raycluster-v1.json, rayjob-v1.json)")
    validators = {}
    for kind, name in SCHEMA_FILES.items():
        schema = json.loads((directory / name).read_text())
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        validators[kind] = cls(schema)
    return validators
