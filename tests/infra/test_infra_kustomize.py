"""The pure-Python render (infra_kustomize) equals real kustomize, and refuses what it cannot do."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from infra_kustomize import RenderError, render
from infra_manifests import rendered, variants


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _by_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}


@pytest.mark.parametrize("variant", list(variants()))
def test_render_matches_kustomize(variant):
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl on PATH: the pure-Python render is not cross-checked here")
    out = subprocess.run([*command, str(variants()[variant])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert _by_name(rendered(variant)) == _by_name([d for d in yaml.safe_load_all(out.stdout) if d])


def _kustomization(tmp_path: Path, body: str) -> Path:
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\n" + body)
    return tmp_path


def test_failed_test_op_stops_the_render(tmp_path):
    body = ("patches:\n- target: {kind: ConfigMap, name: a}\n  patch: |\n"
            "    - {op: test, path: /data/k, value: other}\n    - {op: replace, path: /data/k, value: x}\n")
    with pytest.raises(RenderError, match="test failed"):
        render(_kustomization(tmp_path, body))


def test_unsupported_kustomize_features_are_refused(tmp_path):
    with pytest.raises(RenderError, match="unsupported keys"):
        render(_kustomization(tmp_path, "commonLabels: {a: b}\n"))
    strategic = "patches:\n- target: {kind: ConfigMap}\n  patch: |\n    data: {k: x}\n"
    with pytest.raises(RenderError, match="strategic merge"):
        render(_kustomization(tmp_path, strategic))
