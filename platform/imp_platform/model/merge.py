"""Merge models by weight interpolation (UnIVAL): ``sum_i w_i * theta_i`` over every tensor.

Inputs are run checkpoints or exported models (``imp_platform.model.init.read_model``) whose
ModelConfigs agree (refused otherwise, naming each differing field) except for their
classification heads: a head present in only some models is carried over, interpolated among
those that have it with their weights renormalised (a copy when one model has it). Stacked
expert tensors interpolate element-wise like any other, so expert ``e`` of the result mixes
expert ``e`` of every input: merge models fine-tuned from one parent, whose experts correspond.
A weight of exactly 0 drops that model's term, so the end points of a sweep are the inputs
bit for bit. Sums run in float64 and are cast back to each tensor's dtype.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from imp_platform.config.base import ConfigError, validate
from imp_platform.config.model import ModelConfig
from imp_platform.model.init import State, config_differences, read_model

log = logging.getLogger(__name__)

MERGE_INFO = "merge.json"  # next to config.json: sources, weights, which model each head came from
NOT_WEIGHTS = ("preset", "attention")  # a label and a runtime backend choice: may differ, the first one's is kept
SWEEP_METRICS = ("_top1", "_r1", "_r1_semantic", "val_loss")  # suffixes plotted by default


def parse_weights(text: str | None, count: int) -> list[float]:
    """``"0.3,0.7"`` -> [0.3, 0.7]: one per model, summing to 1 (None: equal weights)."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: expected comma-separated numbers, one per model") from None
    if len(weights) != count:
        raise ConfigError(f"--weights {text!r}: {len(weights)} weights for {count} models")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ConfigError(f"--weights {text!r}: weights sum to {sum(weights):g}, not 1 (an interpolation)")
    return weights


def parse_sweep(text: str) -> list[float]:
    """``"0:1:0.1"`` -> alphas 0, 0.1, ..., 1 (stop included when the steps land on it)."""
    try:
        start, stop, step = (float(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"--sweep {text!r}: expected START:STOP:STEP, e.g. 0:1:0.1") from None
    if step <= 0 or stop < start:
        raise ConfigError(f"--sweep {text!r}: needs STEP > 0 and STOP >= START")
    count = int((stop - start) / step + 1e-9) + 1
    return [round(start + i * step, 12) for i in range(count)]


def merge_configs(cfgs: Sequence[ModelConfig], names: Sequence[str]) -> ModelConfig:
    """The first config with the union of every model's heads; ``ConfigError`` naming each field that differs."""
    problems = [f"{field}: {a!r} in {names[0]}, {b!r} in {name}"
                for cfg, name in zip(cfgs[1:], names[1:])
                for field, (a, b) in config_differences(cfgs[0], cfg, ignore=(*NOT_WEIGHTS, "heads")).items()]
    heads: dict[str, tuple[int, str]] = {}
    for cfg, name in zip(cfgs, names):
        for head, classes in cfg.heads.items():
            first, owner = heads.setdefault(head, (classes, name))
            if first != classes:
                problems.append(f"heads.{head}: {first} classes in {owner}, {classes} classes in {name}")
    if problems:
        raise ConfigError("models cannot be merged, their configs differ:\n  " + "\n  ".join(problems))
    data = {**cfgs[0].model_dump(mode="json"), "heads": {head: classes for head, (classes, _) in heads.items()}}
    return validate(ModelConfig, data, source="merged config")


def interpolate(tensors: Sequence[torch.Tensor], weights: Sequence[float], key: str = "") -> torch.Tensor:
    """``sum w_i * t_i`` in float64, cast back to the inputs' dtype; zero weights contribute nothing."""
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors):
        raise ConfigError(f"{key}: shapes {[list(t.shape) for t in tensors]} differ; cannot interpolate")
    if not first.is_floating_point():
        if any(not torch.equal(t, first) for t in tensors):
            raise ConfigError(f"{key}: non-float tensors differ between models; cannot interpolate")
        return first.clone()
    terms = [(w, t) for w, t in zip(weights, tensors) if w != 0]
    total = sum(w * t.to(torch.float64) for w, t in terms)
    return total.to(first.dtype)


def merge_states(states: Sequence[State], weights: Sequence[float]) -> State:
    """Every key of any input: interpolated over the models that have it (weights renormalised
    there when some lack it; equal when theirs are all 0)."""
    keys = list(dict.fromkeys(k for state in states for k in state))
    merged: State = {}
    for key in keys:
        present = [(w, s[key]) for w, s in zip(weights, states) if key in s]
        ws = [w for w, _ in present]
        if len(present) < len(states):
            total = sum(ws)
            ws = [w / total for w in ws] if total else [1.0 / len(ws)] * len(ws)
        merged[key] = interpolate([t for _, t in present], ws, key)
    return merged


def _merged_model(states: Sequence[State], cfg: ModelConfig, weights: Sequence[float]) -> torch.nn.Module:
    """A model of ``cfg`` holding the interpolation (a strict load: every key accounted for)."""
    from imp_platform.model.imp import build_model

    model = build_model(cfg)
    model.load_state_dict(merge_states(states, weights), strict=True)
    return model.eval()


def merge_models(paths: Sequence[str], weights: Sequence[float], out: str | Path,
                 storage_options: dict[str, Any] | None = None) -> Path:
    """Write the interpolation of ``paths`` as an exported model in ``out`` (+ ``merge.json``)."""
    from imp_platform.model.io import save_pretrained

    loaded = [read_model(p, storage_options) for p in paths]
    cfg = merge_configs([c for _, c in loaded], paths)
    model = _merged_model([s for s, _ in loaded], cfg, weights)
    out = save_pretrained(model, cfg, out)
    heads = {head: [p for p, (_, c) in zip(paths, loaded) if head in c.heads] for head in cfg.heads}
    (out / MERGE_INFO).write_text(json.dumps({"sources": list(paths), "weights": list(weights),
                                              "heads": heads}, indent=2))
    log.info("merged %s with weights %s into %s", list(paths), list(weights), out)
    return out


def sweep(paths: Sequence[str], alphas: Sequence[float], cfg: Any, out: str | Path,
          storage_options: dict[str, Any] | None = None, metrics: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Evaluate ``(1 - alpha) * A + alpha * B`` on ``cfg``'s held-out split for each alpha.

    Writes ``sweep.json``, ``sweep.csv`` and ``sweep.png`` (each chosen metric against alpha)
    into ``out``; returns the rows.
    """
    from imp_platform.eval.zeroshot import HeldOut

    if len(paths) != 2:
        raise ConfigError(f"--sweep interpolates two models, got {len(paths)}")
    loaded = [read_model(p, storage_options) for p in paths]
    merged_cfg = merge_configs([c for _, c in loaded], paths)
    states = [s for s, _ in loaded]
    heldout = HeldOut.open(cfg)
    rows = []
    for alpha in alphas:
        model = _merged_model(states, merged_cfg, [1.0 - alpha, alpha])
        rows.append({"alpha": alpha, **heldout.run(model).metrics})
        log.info("alpha %.3g: %s", alpha, {k: round(v, 4) for k, v in rows[-1].items() if k.endswith(SWEEP_METRICS)})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"models": list(paths), "rows": rows}, indent=2))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "sweep.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_sweep(rows, out / "sweep.png", metrics or [c for c in columns if c.endswith(SWEEP_METRICS)], paths)
    return rows


def plot_sweep(rows: Sequence[dict[str, float]], path: Path, metrics: Sequence[str], names: Sequence[str]) -> Path:
    """One panel per metric against alpha (0 = the first model, 1 = the second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [m for m in metrics if not any(m in row for row in rows)]
    if missing or not metrics:
        raise ConfigError(f"--metric: {missing or 'none'} not among the eval's metrics {sorted(rows[0])}")
    cols = min(4, len(metrics))
    rows_n = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
    alphas = [row["alpha"] for row in rows]
    for ax, metric in zip(axes.flat, metrics):
        ax.plot(alphas, [row.get(metric, float("nan")) for row in rows], marker="o")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    a, b = ("/".join(Path(n).parts[-2:]) for n in names)
    fig.suptitle(f"(1 - alpha) * {a} + alpha * {b}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eval_config(paths: Sequence[str], config: str | Path | None, max_samples: int | None = None) -> Any:
    """The PretrainConfig whose held-out split scores a sweep: ``config``, else the first input's run config."""
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train.checkpoint import RUN_CONFIG, load_run_config

    if config is not None:
        cfg = load_pretrain_config(config)
    elif (Path(paths[0]) / RUN_CONFIG).exists():
        cfg = load_run_config(paths[0])
    else:
        raise ConfigError(f"--eval: {paths[0]} carries no {RUN_CONFIG}; pass --config PRETRAIN_YAML")
    if max_samples is not None:
        cfg.eval.max_samples = max_samples
    return cfg
