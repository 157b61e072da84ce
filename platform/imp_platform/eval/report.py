"""The PNG report of a run: per-task loss curves, zero-shot accuracy over steps, expert use by modality.

Input is the metrics history the training loop keeps (and stores in every checkpoint), so a
report can be drawn from a checkpoint alone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def _series(history: list[dict[str, Any]], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for row in history:
        for key, value in row.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                out[key[len(prefix):]][0].append(int(row["step"]))
                out[key[len(prefix):]][1].append(float(value))
    return dict(out)


def _expert_use(history: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Latest per-expert load by modality, averaged over MoE layers."""
    latest: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for row in history:
        for key, value in row.items():
            if key.startswith("expert_load/") and isinstance(value, list):
                _, modality, layer = key.split("/", 2)
                latest[modality][layer] = value
    return {m: np.mean(np.array(list(layers.values()), dtype=float), axis=0) for m, layers in latest.items()}


def write_report(history: list[dict[str, Any]], out: str | Path, title: str = "imp-platform run") -> Path:
    """Draw the three panels into ``out`` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax = axes[0]
    for task, (steps, values) in sorted(_series(history, "loss/").items()):
        ax.plot(steps, values, label=task)
    val = _series(history, "").get("val_loss")
    if val:
        ax.plot(*val, "k--", label="held-out (val_loss)")
    ax.set(title="training loss per task", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)

    ax = axes[1]
    for name, (steps, values) in sorted(_series(history, "zeroshot_").items()):
        ax.plot(steps, values, marker="o", label=f"zero-shot {name}")
    for name, (steps, values) in sorted(_series(history, "retrieval_").items()):
        if name.endswith("_r1"):
            ax.plot(steps, values, linestyle=":", marker=".", label=f"R@1 {name[:-3]}")
    ax.axhline(0.1, color="grey", linewidth=0.8, linestyle="--", label="chance (10 classes)")
    ax.set(title="held-out zero-shot accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=8)

    ax = axes[2]
    use = _expert_use(history)
    if use:
        modalities = sorted(use)
        experts = max(len(v) for v in use.values())
        width = 0.8 / len(modalities)
        for index, modality in enumerate(modalities):
            ax.bar(np.arange(len(use[modality])) + index * width, use[modality], width, label=modality)
        ax.axhline(1 / experts, color="grey", linewidth=0.8, linestyle="--", label="uniform")
        ax.set_xticks(np.arange(experts) + 0.4 - width / 2, [f"e{i}" for i in range(experts)])
        top = max(max(v) for v in use.values())
        ax.set(title="expert use by modality (mean over MoE layers)", xlabel="expert",
               ylabel="share of routing (EC: mean router prob.)", ylim=(0, 1.3 * top))  # headroom for the legend
        ax.legend(fontsize=8, ncol=len(modalities) + 1, loc="upper center")
    else:
        ax.text(0.5, 0.5, "dense model: no experts", ha="center", va="center")
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
