"""What the infra tests read: rendered kustomize variants, the cluster specs and pod templates in them,
RayJob entrypoints as argv, and the versions pyproject.toml and uv.lock pin."""

from __future__ import annotations

import copy
import functools
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

from infra_kustomize import render
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "infra" / "kuberay"
DOCKERFILE = REPO / "infra" / "Dockerfile"
GPU = "nvidia.com/gpu"


def variants() -> dict[str, Path]:
    """``base`` and every overlay, by name."""
    overlays = sorted(p.parent for p in (KUBERAY / "overlays").glob("*/kustomization.yaml"))
    return {"base": KUBERAY / "base", **{p.name: p for p in overlays}}


@functools.cache
def _rendered(name: str) -> list[dict[str, Any]]:
    return render(variants()[name])


def rendered(name: str) -> list[dict[str, Any]]:
    """The objects of one variant (a fresh copy: tests may not leak edits into each other)."""
    return copy.deepcopy(_rendered(name))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def the_cluster(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (cluster,) = of_kind(objects, "RayCluster")
    return cluster


def cluster_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(label, spec) of the RayCluster and of every RayJob's embedded cluster."""
    specs = [(f"RayCluster/{o['metadata']['name']}", o["spec"]) for o in of_kind(objects, "RayCluster")]
    specs += [(f"RayJob/{o['metadata']['name']}", o["spec"]["rayClusterSpec"]) for o in of_kind(objects, "RayJob")]
    return specs


def groups(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Head (as ``head``) and worker groups of a cluster spec, by group name."""
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}}


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay runs Ray in the first container of each pod template."""
    return group["template"]["spec"]["containers"][0]


def pod_templates(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(label, pod template) of every pod KubeRay creates from the manifests: each cluster's head and
    worker groups and each RayJob's submitter."""
    templates = [(f"{label}/{name}", group["template"])
                 for label, spec in cluster_specs(objects) for name, group in groups(spec).items()]
    templates += [(f"RayJob/{o['metadata']['name']}/submitter", o["spec"]["submitterPodTemplate"])
                  for o in of_kind(objects, "RayJob")]
    return templates


def gpu_capacity(spec: dict[str, Any]) -> int:
    """GPUs of the gpu group at maxReplicas: the most any one job can ask for at once."""
    gpu = groups(spec)["gpu"]
    return int(gpu["maxReplicas"]) * int(ray_container(gpu)["resources"]["limits"][GPU])


def entrypoint_argv(job: dict[str, Any]) -> list[str]:
    return shlex.split(job["spec"]["entrypoint"])


def option_values(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (``--set a=1 --set b=2`` -> ["a=1", "b=2"])."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def option_value(argv: list[str], flag: str) -> str:
    (value,) = option_values(argv, flag)
    return value


def set_value(argv: list[str], key: str) -> str:
    """The last ``--set key=value`` value for ``key`` (later overrides win, as in apply_overrides)."""
    values = [item.split("=", 1)[1] for item in option_values(argv, "--set") if item.split("=", 1)[0] == key]
    assert values, f"no --set {key}=... in {shlex.join(argv)}"
    return values[-1]


def s3_buckets(text: str) -> set[str]:
    return set(re.findall(r"s3://([^/\s]+)", text))


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pin() -> str:
    """The exact ray version pyproject.toml pins (``ray[...]==X``)."""
    for dep in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml pins no exact ray version")


def python_minor() -> str:
    """The one ``3.X`` that pyproject's requires-python allows, e.g. ``3.11``."""
    spec = SpecifierSet(pyproject()["project"]["requires-python"])
    allowed = [f"3.{minor}" for minor in range(8, 20) if f"3.{minor}.0" in spec]
    assert len(allowed) == 1, f"requires-python allows {allowed}; the image needs exactly one"
    return allowed[0]


@functools.cache
def locked_versions() -> dict[str, str]:
    """Package name -> version in uv.lock."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return {pkg["name"]: pkg["version"] for pkg in lock["package"] if "version" in pkg}


def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return instructions


def dockerfile_last(keyword: str) -> str:
    """Arguments of the last ``keyword`` instruction (e.g. the user or workdir the image ends with)."""
    values = [args for kw, args in dockerfile_instructions() if kw == keyword]
    assert values, f"infra/Dockerfile has no {keyword}"
    return values[-1]
