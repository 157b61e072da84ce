"""Start a model from another one: read its weights, match them key by key, apply, freeze.

The source is a run checkpoint directory or an exported one (``model.safetensors`` +
``config.json``, see ``imp_platform.model.io``), local or ``s3://``. Matching is by
``state_dict`` key. A key whose shape differs, that the source lacks, or that only the source
has is a problem unless declared in ``reinit`` (name globs: the model keeps its fresh
initialisation there, the source's tensor is dropped); ``strict=False`` tolerates the last two
(reported, never silent). Every problem is named in one error, so a user fixes the YAML once.

Upcycling (dense -> MoE): where the model has experts and the source a dense FFN, every expert
starts as that FFN (``w1[e] = fc1.weight.T``, ``w2[e] = fc2.weight.T``) and the router keeps its
fresh initialisation.
"""

from __future__ import annotations

import fnmatch
import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imp_platform.config.base import ConfigError
from imp_platform.config.model import ModelConfig
from imp_platform.config.train import ModelSpec
from imp_platform.train.checkpoint import CheckpointError

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
# ModelConfig fields that may differ from the source's without a warning: names, init-time
# values the weights override, the attention backend, heads (matched by key) and the MoE
# layout (matched by shape, or upcycled).
INIT_ONLY_FIELDS = ("preset", "heads", "moe", "temperature_init", "attention")


@dataclass
class InitPlan:
    """What ``plan_init`` decided: tensors to load and why the other keys keep their fresh init."""

    load: State = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)  # model key -> reason it keeps its init
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> reason it is not used
    upcycled: list[str] = field(default_factory=list)  # FFN prefixes whose experts copy the dense FFN

    def lines(self) -> list[str]:
        """The report, one line per key that is not a plain copy."""
        return ([f"upcycled {p}: every expert = the dense FFN, router fresh" for p in self.upcycled]
                + [f"fresh {k}: {why}" for k, why in self.fresh.items()]
                + [f"dropped {k}: {why}" for k, why in self.dropped.items()])


def read_model(path: str, storage_options: dict[str, Any] | None = None) -> tuple[State, ModelConfig]:
    """(state dict on CPU, ModelConfig) of a run checkpoint or an exported model, local or remote.

    A run checkpoint (it has ``COMPLETE.json``) is read by ``train.checkpoint`` (verified
    complete, sharded ones consolidated); a directory with a train state but no marker is a
    half-written checkpoint and refused. A remote directory is downloaded first.
    """
    if "://" not in path:
        return _read_local(Path(path))
    from imp_platform.data.sources import filesystem

    fs, root = filesystem(path, storage_options)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{path} not found: expected a run checkpoint or an exported model directory")
    with tempfile.TemporaryDirectory(prefix="imp-init-") as tmp:
        fs.get(root.rstrip("/") + "/", tmp, recursive=True)
        try:
            return _read_local(Path(tmp))
        except (CheckpointError, FileNotFoundError) as exc:
            raise type(exc)(f"{path} (downloaded): {exc}") from None


def _read_local(directory: Path) -> tuple[State, ModelConfig]:
    """``load_model`` reads both kinds (an exported dir is an unsharded checkpoint) and verifies a run checkpoint."""
    from imp_platform.train.checkpoint import load_model

    model, cfg = load_model(directory)
    return model.state_dict(), cfg


def config_differences(a: ModelConfig, b: ModelConfig, ignore: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (value in ``a``, value in ``b``) for every field that differs (``ignore``: top-level names)."""
    skip = set(ignore)
    flat_a, flat_b = _flatten(a.model_dump(mode="json")), _flatten(b.model_dump(mode="json"))
    return {k: (flat_a.get(k), flat_b.get(k)) for k in sorted(set(flat_a) | set(flat_b))
            if k.split(".")[0] not in skip and flat_a.get(k) != flat_b.get(k)}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def upcycle(source: State, target_shapes: Mapping[str, torch.Size]) -> tuple[State, list[str]]:
    """``source`` with each dense FFN turned into the experts of the model's sparse layer at that place.

    Returns (new state, upcycled FFN prefixes). Experts have no biases, so a dense FFN with
    biases cannot be reproduced and is refused.
    """
    out, done = dict(source), []
    for key, shape in target_shapes.items():
        prefix = key.removesuffix(".w1")
        fc1, fc2 = f"{prefix}.fc1.weight", f"{prefix}.fc2.weight"
        if not key.endswith(".ffn.w1") or key in source or fc1 not in source or fc2 not in source:
            continue
        biases = [b for b in (f"{prefix}.fc1.bias", f"{prefix}.fc2.bias") if b in source]
        if biases:
            raise ConfigError(f"model.upcycle: {', '.join(biases)}: experts have no biases, so a dense FFN "
                              f"with biases cannot be upcycled")
        experts = shape[0]
        out[key] = out.pop(fc1).T.unsqueeze(0).expand(experts, -1, -1).contiguous()
        out[f"{prefix}.w2"] = out.pop(fc2).T.unsqueeze(0).expand(experts, -1, -1).contiguous()
        done.append(prefix)
    return out, done


def plan_init(target: Mapping[str, torch.Tensor], source: State, *, strict: bool = True,
              reinit: Iterable[str] = (), upcycled: Iterable[str] = (), origin: str = "the source") -> InitPlan:
    """Match ``source`` against the model's ``target`` state; raise ``ConfigError`` naming every key that
    does not fit (shape, missing, unused) unless declared in ``reinit`` (or tolerated when not ``strict``)."""
    reinit = list(reinit)
    unknown = [p for p in reinit if not any(fnmatch.fnmatchcase(k, p) for k in (*target, *source))]
    if unknown:
        raise ConfigError(f"model.reinit: {unknown} match no key of the model or of {origin}")
    routers = {f"{p}.router" for p in upcycled}
    plan, problems = InitPlan(upcycled=list(upcycled)), {}
    for key, tensor in target.items():
        if key in source and source[key].shape == tensor.shape:
            plan.load[key] = source[key].to(tensor.dtype)
        elif key in source:
            why = f"shape {list(source[key].shape)} in {origin}, {list(tensor.shape)} in the model"
            if matches(key, reinit):
                plan.fresh[key] = f"{why} (declared in model.reinit)"
            else:
                problems[key] = why
        elif key in routers:
            plan.fresh[key] = "router of an upcycled layer"
        elif matches(key, reinit) or not strict:
            plan.fresh[key] = f"not in {origin}"
        else:
            problems[key] = f"not in {origin}"
    for key in source.keys() - target.keys():
        if matches(key, reinit) or not strict:
            plan.dropped[key] = "not in the model"
        else:
            problems[key] = f"in {origin}, not in the model"
    if problems:
        hint = ("declare keys to re-initialise in model.reinit (name globs, e.g. 'heads.classifiers.*'); "
                "model.init_strict: false tolerates keys only one side has")
        if any(k.endswith((".ffn.fc1.weight", ".ffn.w1")) for k in problems):
            hint += "; model.upcycle: true starts experts from a dense FFN"
        raise ConfigError(f"model.init_from {origin} does not fit the model ({len(problems)} keys):\n  "
                          + "\n  ".join(f"{k}: {problems[k]}" for k in sorted(problems)) + f"\n{hint}")
    return plan


def freeze(model: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    """Stop gradients (so optimizer updates) of parameters whose names match ``patterns``; their names."""
    patterns = list(patterns)
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise ConfigError(f"model.freeze: {unknown} match no parameter of the model")
    frozen = []
    for name, param in model.named_parameters():
        if matches(name, patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def init_model(model: torch.nn.Module, spec: ModelSpec, model_cfg: ModelConfig,
               storage_options: dict[str, Any] | None = None, resuming: bool = False) -> InitPlan | None:
    """Apply ``spec.init_from`` (skipped when ``resuming``: the run's own checkpoint wins) and ``spec.freeze``.

    Freezing happens on resume too, before the optimizer is built, so its parameter groups
    match the saved optimizer state.
    """
    plan = None
    if spec.init_from and not resuming:
        source, source_cfg = read_model(spec.init_from, storage_options)
        target = model.state_dict()
        upcycled: list[str] = []
        if spec.upcycle:
            source, upcycled = upcycle(source, {k: v.shape for k, v in target.items()})
            if not upcycled:
                raise ConfigError(f"model.upcycle: {spec.init_from} has no dense FFN where the model has experts")
        plan = plan_init(target, source, strict=spec.init_strict, reinit=spec.reinit, upcycled=upcycled,
                         origin=spec.init_from)
        model.load_state_dict({**target, **plan.load}, strict=True)
        differing = config_differences(source_cfg, model_cfg, ignore=INIT_ONLY_FIELDS)
        log.info("initialised from %s: %d of %d tensors loaded%s", spec.init_from, len(plan.load), len(target),
                 "".join(f"\n  {line}" for line in plan.lines()))
        if differing:
            log.warning("model.init_from %s: config differs from the model's in %s", spec.init_from,
                        ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in differing.items()))
    if spec.freeze:
        frozen = freeze(model, spec.freeze)
        log.info("frozen: %d parameter tensors matching %s", len(frozen), spec.freeze)
    return plan
