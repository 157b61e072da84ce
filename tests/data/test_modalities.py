"""The modality registry: a new modality is one entry (plus its decode op), and no other module enumerates modalities."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from media import image_bytes
from PIL import Image

from imp_platform.config.pipeline import ModalitiesConfig, load_pipeline
from imp_platform.config.train import TaskConfig
from imp_platform.data import decode
from imp_platform.data import modalities as registry
from imp_platform.data.buckets import tokens_per_sample
from imp_platform.data.pipeline import bucket_layouts, stack_rows
from imp_platform.model import build_model
from imp_platform.model.presets import preset
from imp_platform.train.tasks import encode, task_columns, to_inputs

PACKAGE = Path(registry.__file__).parents[1]  # imp_platform
CPU = torch.device("cpu")


@pytest.fixture
def depth(monkeypatch: pytest.MonkeyPatch) -> registry.Modality:
    """Depth maps as 8-bit PGM members, registered for one test: a source entry composing the image
    decode op with one op of its own (near = bright), and a modality entry with its own embedder."""
    for table in (registry, "SOURCES"), (registry, "MODALITIES"), (decode, "OPS"):
        monkeypatch.setattr(*table, dict(getattr(*table)))

    @decode.decode_op("near_is_bright")
    def near_is_bright(member: decode.Member, state: decode.SampleState) -> decode.Member:
        return {**member, "views": {c: [255 - a for a in arrays] for c, arrays in member["views"].items()}}

    registry.register_source(registry.Source("depth", ("pgm",), ("image_views", "near_is_bright"), registry.image_layouts))
    return registry.register_modality(registry.Modality(
        "depth", "depth", "depth", "d", "uint8", lambda c: (None, None, 3), (1, 2),
        lambda c: tuple(c.video_patch[1:]), lambda p: tuple(p.image), "tubelets", "depth", 4, "vision"))


def _sample(with_depth: bool = True) -> dict[str, bytes | str]:
    rgb = Image.fromarray(np.full((40, 80, 3), 90, np.uint8))
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 80).astype(np.uint8), (40, 1)))  # far on the right
    sample = {"__key__": "s0", "png": image_bytes(rgb), "json": b'{"caption": "a ramp", "label": 1}'}
    return {**sample, "pgm": image_bytes(ramp, "PPM")} if with_depth else sample


def test_a_registered_modality_flows_from_tar_members_to_the_encoder(depth) -> None:
    cfg = load_pipeline(None, ["modalities.enabled=[image,depth]", "modalities.required=[depth]",
                               "image.buckets=[[32,32],[32,64]]"])
    assert cfg.modalities.modality_of("PGM") == "depth"
    [row] = decode.decode_sample(_sample(), cfg)
    assert row.bucket == "i32x64_d32x64" and row.row["label"] == 1  # 2:1 native picks the 2:1 bucket
    got = row.row["depth"]
    assert got.shape == (32, 64, 3) and got.dtype == np.uint8
    assert (got[..., 0] == got[..., 2]).all() and got[:, 0, 0].mean() > got[:, -1, 0].mean() + 200  # near is bright
    layouts = bucket_layouts(cfg)
    assert all("depth" in layout for layout in layouts.values())  # required: no bucket without it
    assert layouts[row.bucket] == {"image": ("uint8", [32, 64, 3]), "depth": ("uint8", [32, 64, 3])}
    assert tokens_per_sample(row.shapes, cfg.patches) == 2 * (32 // 8) * (64 // 8)
    with pytest.raises(decode.MissingModality, match="depth"):
        decode.decode_sample(_sample(with_depth=False), cfg)

    batch = stack_rows([row], layouts[row.bucket], with_caption=False)
    model = build_model(preset("tiny")).eval()
    assert {n.split(".")[1] for n in model.state_dict() if n.startswith("embed.depth.")}  # its own stem
    assert model.embed.types.shape[0] == 5
    x, _ = to_inputs("depth", batch, CPU)
    assert x.shape == (1, 32, 64, 3) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    with torch.no_grad():
        out = encode(model, "depth", batch, CPU)
        z = model.project(out.pooled, "depth", "text")
    assert out.pooled.shape == (1, model.cfg.d_model) and z.shape == (1, model.cfg.d_common)
    assert model.num_tokens("depth", (32, 64, 3)) == (32 // model.cfg.video_patch[1]) * (64 // model.cfg.video_patch[2])
    task = TaskConfig(modalities=["depth", "text"], objectives=[{"kind": "nce"}])
    assert task_columns(task) == ["depth", "text_ids", "text_mask"]


def test_registry_refuses_clashes_and_unknown_ops(depth) -> None:
    with pytest.raises(ValueError, match="already belong to 'image'"):
        registry.register_source(registry.Source("photo", ("jpg",), ("image_views",), registry.image_layouts))
    with pytest.raises(ValueError, match="tag already used by 'video'"):
        registry.register_modality(dataclasses.replace(depth, name="depth2", column="depth2", tag="v"))
    registry.register_source(registry.Source("scan", ("tif",), ("no_such_op",), registry.image_layouts))
    cfg = load_pipeline(None, ["modalities.enabled=[scan]", "modalities.required=[]", "image.buckets=[[32,32]]"])
    with pytest.raises(ValueError, match="no decode op 'no_such_op'"):
        decode.decode_sample({"__key__": "k", "tif": b"x"}, cfg)
    with pytest.raises(ValueError, match="unknown modality 'lidar'"):
        TaskConfig(modalities=["lidar"], objectives=[{"kind": "classification"}])


def _enumerations(tree: ast.AST, names: set[str]) -> list[tuple[int, list[str]]]:
    """Literals listing three or more modalities and nothing else (tuples, lists, sets, dict keys),
    or an ``a|b|c`` string of them (config section names among other keys are not a list of modalities)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict):
            items = node.keys if isinstance(node, ast.Dict) else node.elts
            strings = {e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            named = strings if strings <= names else set()
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = {w for group in re.findall(r"[a-z_]+(?:\|[a-z_]+)+", node.value) for w in group.split("|")} & names
        else:
            continue
        if len(named) >= 3:
            found.append((node.lineno, sorted(named)))
    return found


def test_only_the_registry_enumerates_modalities() -> None:
    """The former per-module constants (three MODALITIES, COLUMNS, FAMILY_OF, bucket tags, caption
    sources, ...) are gone: a branch on two modalities is fine, a list of them lives in one place."""
    names = set(registry.MODALITIES) | set(registry.SOURCES)
    offenders = [f"{path.relative_to(PACKAGE)}:{line} {named}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path != Path(registry.__file__)
                 for line, named in _enumerations(ast.parse(path.read_text()), names)]
    assert offenders == []
    assert ModalitiesConfig().enabled == list(registry.SOURCES)
    assert ModalitiesConfig().extensions == registry.default_extensions()
    for name in registry.media():  # the run config takes exactly the registry's names
        assert TaskConfig(modalities=[name, "text"], objectives=[{"kind": "nce"}]).modalities == [name, "text"]
