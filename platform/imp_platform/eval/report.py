"""The PNG report of a run: per-task loss curves, zero-shot accuracy and retrieval over steps,
expert use by modality, the zero-shot video confusion matrix, a reliability diagram and, for a
model with a text decoder, a few held-out clips with their reference and generated captions.

Input is the metrics history the training loop keeps (and stores in every checkpoint), so a
report can be drawn from a checkpoint alone; the confusion matrix, reliability bins and class
names come from an eval (``platform eval``), since the training history keeps scalars only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imp_platform.eval.captioning import EXAMPLES_KEY


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


def _latest(history: list[dict[str, Any]], key: str) -> Any:
    return next((row[key] for row in reversed(history) if row.get(key) is not None), None)


def _class_list(classes: Sequence[str], limit: int = 12) -> str:
    names = ", ".join(classes[:limit])
    return names + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")


def write_report(history: list[dict[str, Any]], out: str | Path, title: str = "imp-platform run",
                 classes: Sequence[str] | None = None) -> Path:
    """Draw the six panels into ``out`` (PNG) and return its path.

    ``classes`` names the zero-shot classes (title and confusion axes); the chance line is
    1 / ``num_classes`` of the latest eval, absent when the dataset declares no classes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(23, 11))
    axes = axes.ravel()
    ax = axes[0]
    for task, (steps, values) in sorted(_series(history, "loss/").items()):
        ax.plot(steps, values, label=task)
    val = _series(history, "").get("val_loss")
    if val:
        ax.plot(*val, "k--", label="held-out (val_loss)")
    ax.set(title="training loss per task", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)

    _accuracy_panel(axes[1], history, classes)
    _expert_panel(axes[2], history)
    _confusion_panel(axes[3], _latest(history, "zeroshot_video_confusion"), classes)
    _reliability_panel(axes[4], history)
    _captions_panel(axes[5], _latest(history, EXAMPLES_KEY))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _accuracy_panel(ax: Any, history: list[dict[str, Any]], classes: Sequence[str] | None) -> None:
    """Zero-shot top-1 per modality, classification heads' top-1, and semantic R@1 per pair (a
    retrieved item with the same caption, or class, counts: instance R@1 is capped on templated captions)."""
    for name, (steps, values) in sorted(_series(history, "zeroshot_").items()):
        if name.endswith("_top1"):
            ax.plot(steps, values, marker="o", label=f"zero-shot {name[:-5]} top-1")
    for name, (steps, values) in sorted(_series(history, "head_").items()):
        if name.endswith("_top1"):
            ax.plot(steps, values, marker="s", linestyle="-.", label=f"head {name[:-5]} top-1")
    for name, (steps, values) in sorted(_series(history, "retrieval_").items()):
        if name.endswith("_r1_semantic"):
            ax.plot(steps, values, linestyle=":", marker=".",
                    label=f"R@1 {name[:-len('_r1_semantic')]} (semantic: same caption/class)")
    num_classes = _latest(history, "num_classes")
    if num_classes:
        ax.axhline(1 / num_classes, color="grey", linewidth=0.8, linestyle="--",
                   label=f"chance (1/{int(num_classes)} classes)")
    heading = "held-out zero-shot accuracy and retrieval"
    if classes:
        heading += f"\nclasses: {_class_list(list(classes))}"
    ax.set(title=heading, xlabel="step", ylabel="accuracy / recall", ylim=(0, 1.02))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _expert_panel(ax: Any, history: list[dict[str, Any]]) -> None:
    use = _expert_use(history)
    if not use:
        ax.text(0.5, 0.5, "dense model: no experts", ha="center", va="center")
        ax.set_axis_off()
        return
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


def _captions_panel(ax: Any, examples: list[dict[str, Any]] | None) -> None:
    """A few held-out clips: first frame, reference caption, generated caption (greedy)."""
    ax.set_axis_off()
    if not examples:
        ax.text(0.5, 0.5, "no generated captions\n(the model has no text decoder, or the report\n"
                "was drawn from the training history: run `platform eval`)", ha="center", va="center")
        return
    ax.set_title("held-out captions: reference vs generated (greedy)")
    rows = len(examples)
    for i, example in enumerate(examples):
        top = 1 - i / rows
        if example.get("frame") is not None:
            inset = ax.inset_axes((0.0, top - 0.9 / rows, 0.16, 0.9 / rows))
            inset.imshow(np.asarray(example["frame"], dtype=np.uint8))
            inset.set_axis_off()
        ax.text(0.19, top - 0.45 / rows, f"{example['key']}\nreference: {example.get('reference') or '-'}\n"
                f"generated: {example['generated'] or '(empty)'}", va="center", fontsize=8, family="monospace",
                transform=ax.transAxes, clip_on=True)


def _reliability_panel(ax: Any, history: list[dict[str, Any]]) -> None:
    """Reliability diagram of each classifier's latest eval (accuracy vs confidence per bin, ECE in
    the legend): points below the diagonal are overconfident."""
    from imp_platform.eval.calibration import Reliability

    names = sorted({k for row in history for k, v in row.items() if k.endswith("_reliability") and isinstance(v, dict)})
    if not names:
        ax.text(0.5, 0.5, "no calibration bins\n(drawn from the training history: run `platform eval`)",
                ha="center", va="center")
        ax.set_axis_off()
        return
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--", label="perfectly calibrated")
    for name in names:
        bins = Reliability(**_latest(history, name))
        filled = [i for i, n in enumerate(bins.count) if n]
        ax.plot([bins.confidence[i] for i in filled], [bins.accuracy[i] for i in filled], marker="o",
                label=f"{name[:-len('_reliability')]} (ECE {bins.ece:.3f})")
    ax.set(title="reliability (15 confidence bins)", xlabel="confidence (top-1 probability)", ylabel="accuracy",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8)


def _confusion_panel(ax: Any, confusion: list[list[int]] | None, classes: Sequence[str] | None) -> None:
    """Row-normalised zero-shot video confusion (rows: true class, columns: predicted)."""
    if confusion is None:
        ax.text(0.5, 0.5, "no zero-shot video confusion matrix\n(dataset declares no classes, or the report\n"
                "was drawn from the training history: run `platform eval`)", ha="center", va="center")
        ax.set_axis_off()
        return
    counts = np.asarray(confusion, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    n = len(rates)
    names = list(classes) if classes and len(classes) == n else [str(i) for i in range(n)]
    if n <= 40:  # beyond that, tick labels are unreadable
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    ax.set(title=f"zero-shot video confusion ({int(counts.sum())} clips)", xlabel="predicted", ylabel="true")
