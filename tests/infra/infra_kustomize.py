"""Pure-Python render of the small kustomize subset infra/kuberay uses, so tests need no binary.

Supported keys: ``resources`` (files, or directories holding a kustomization.yaml), ``patches``
(JSON 6902 ops, inline or from a file, with a kind/name ``target``), ``namespace``, ``images``
(name -> newName/newTag/digest on every ``containers``/``initContainers`` entry) and ``replacements``
(copy one field of one object into fields of the selected objects, ``options.create``). They run in
kustomize's order: patches, namespace, images, replacements. Any other key raises, so an overlay that
starts using more of kustomize fails here instead of rendering something different; where
``kubectl`` or ``kustomize`` is on PATH, test_infra_kustomize.py compares the two renders.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "namespace", "images", "replacements"}


class RenderError(ValueError):
    """The kustomization asks for something this subset does not do, or a patch does not apply."""


def load_documents(path: Path) -> list[dict[str, Any]]:
    """All YAML documents of a file, with anchors/aliases expanded into independent copies."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return json.loads(json.dumps(docs))


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize DIRECTORY`` would print (same content, any order)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    unsupported = set(kustomization) - SUPPORTED
    if unsupported:
        raise RenderError(f"{directory}/kustomization.yaml: unsupported keys {sorted(unsupported)}")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        _apply_patch(directory, objects, patch)
    if "namespace" in kustomization:
        for obj in objects:
            obj["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    for replacement in kustomization.get("replacements", []):
        _replace(objects, replacement)
    return objects


def _selects(selector: dict[str, str], obj: dict[str, Any]) -> bool:
    unsupported = set(selector) - {"kind", "name"}
    if unsupported:
        raise RenderError(f"unsupported selector fields {sorted(unsupported)}")
    return (selector.get("kind", obj["kind"]) == obj["kind"]
            and selector.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"])


def _apply_patch(directory: Path, objects: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    if set(patch) - {"path", "patch", "target"} or "target" not in patch:
        raise RenderError(f"only JSON 6902 patches with a target are supported, got {patch}")
    ops = yaml.safe_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise RenderError(f"patch for {patch['target']} is not a JSON 6902 op list (strategic merge is unsupported)")
    targets = [obj for obj in objects if _selects(patch["target"], obj)]
    if not targets:
        raise RenderError(f"patch target {patch['target']} matches no object")
    for obj in targets:
        for op in ops:
            _json_patch(obj, op)


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def _json_patch(obj: dict[str, Any], op: dict[str, Any]) -> None:
    *parents, last = _pointer(op["path"])
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index: Any = len(node) if last == "-" else int(last)
        exists = index < len(node)
    else:
        index, exists = last, last in node
    if kind != "add" and not exists:
        raise RenderError(f"{kind} at missing path {op['path']}")
    if kind == "test":
        if node[index] != op["value"]:
            raise RenderError(f"test failed at {op['path']}: {node[index]!r} != {op['value']!r}")
    elif kind == "add" and isinstance(node, list):
        node.insert(index, copy.deepcopy(op["value"]))
    elif kind in ("add", "replace"):
        node[index] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[index]
    else:
        raise RenderError(f"unsupported JSON 6902 op {kind!r}")


def _split_image(image: str) -> tuple[str, str]:
    """``repo/name:tag`` or ``repo/name@sha256:...`` -> (name, suffix including ':' or '@')."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")


def _set_image(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, suffix = _split_image(container.get("image", ""))
                if name == image["name"]:
                    if "digest" in image:
                        suffix = "@" + image["digest"]
                    elif "newTag" in image:
                        suffix = ":" + str(image["newTag"])
                    container["image"] = image.get("newName", name) + suffix
        _set_image(value, image)


def _replace(objects: list[dict[str, Any]], replacement: dict[str, Any]) -> None:
    source = {key: value for key, value in replacement["source"].items() if key != "fieldPath"}
    field = replacement["source"]["fieldPath"]
    sources = [obj for obj in objects if _selects(source, obj)]
    if len(sources) != 1:
        raise RenderError(f"replacement source {source} matches {len(sources)} objects, need exactly 1")
    value: Any = sources[0]
    for part in field.split("."):
        value = value[part]
    for target in replacement["targets"]:
        create = target.get("options", {}).get("create", False)
        if set(target.get("options", {})) - {"create"}:
            raise RenderError(f"unsupported replacement options {target['options']}")
        for obj in (o for o in objects if _selects(target["select"], o)):
            for path in target["fieldPaths"]:
                *parents, last = path.split(".")
                node = obj
                for part in parents:
                    if part not in node and not create:
                        raise RenderError(f"{obj['kind']}/{obj['metadata']['name']} has no {path}")
                    node = node.setdefault(part, {})
                if last not in node and not create:
                    raise RenderError(f"{obj['kind']}/{obj['metadata']['name']} has no {path}")
                node[last] = copy.deepcopy(value)
