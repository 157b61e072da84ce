"""``platform data inspect``: the card of a processed dataset and a contact sheet of what the model sees.

Counts come from the manifest (buckets, skips) and the stored ``label`` column (classes), so
they describe the rows training will read, not the raw shards. Raw bytes per sample need the
manifest's ``raw_bytes`` (the summed size of the shards read); older manifests lack it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imp_platform.data import manifest as manifest_io
from imp_platform.data import modalities as registry
from imp_platform.data.dataset import DatasetCard
from imp_platform.data.sources import filesystem, join
from imp_platform.data.stream import ProcessedDataset

UNLABELLED = "(unlabelled)"


def _visual_columns() -> list[str]:
    """Columns a contact sheet draws: pixels (clips, images) and 2-D features (log-mel), registry order."""
    return [m.column for m in registry.MODALITIES.values() if m.dtype == "uint8" or (m.stem == "patches" and len(m.grid_axes) == 2)]


@dataclass
class SplitCard:
    """One processed split as a user should see it before training on it."""

    split: str
    root: str
    kept: int
    read: int
    classes: list[str] | None
    prompts: list[str]
    per_bucket: dict[str, int]
    per_class: dict[str, int]
    skipped: dict[str, int]
    processed_bytes: int
    raw_bytes: int | None

    @property
    def processed_per_sample(self) -> float:
        return self.processed_bytes / max(self.kept, 1)

    @property
    def raw_per_sample(self) -> float | None:
        return None if self.raw_bytes is None else self.raw_bytes / max(self.read, 1)


def find_splits(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """split name -> processed root: ``path`` itself when it holds a manifest, else each subfolder that does."""
    fs, base = filesystem(path, storage_options)
    root = path.rstrip("/")
    if fs.exists(join(base, manifest_io.MANIFEST_NAME)):
        return {root.rsplit("/", 1)[-1]: root}
    splits = {}
    if fs.isdir(base):
        for entry in sorted(fs.ls(base, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if fs.exists(join(entry, manifest_io.MANIFEST_NAME)):
                splits[name] = join(root, name)
    if not splits:
        raise FileNotFoundError(f"no {manifest_io.MANIFEST_NAME} in {path} or its subfolders: "
                                "run `platform data preprocess` first")
    return splits


def class_counts(dataset: ProcessedDataset, classes: list[str] | None) -> dict[str, int]:
    """Samples per class name (label id where no names are declared), unlabelled samples last.

    Counted by key, so a sample written into several buckets (``video.resolutions``) counts once.
    """
    labels: dict[str, int] = {}
    for info in dataset.buckets:
        if info.count and "label" in info.columns:
            for batch in dataset.iter_batches(info, 4096, ["key", "label"]):
                labels.update(zip(batch["key"].tolist(), batch["label"].tolist(), strict=True))
    counts = Counter(labels.values())
    names = {i: name for i, name in enumerate(classes or [])}
    out = {names.get(label, str(label)): counts[label] for label in sorted(c for c in counts if c >= 0)}
    if counts[-1]:
        out[UNLABELLED] = counts[-1]
    return out


def inspect_split(split: str, root: str, storage_options: dict[str, Any] | None = None) -> SplitCard:
    dataset = ProcessedDataset.open(root, storage_options)
    manifest = dataset.manifest
    card = DatasetCard.from_manifest(manifest)
    classes = list(card.classes) if card and card.classes is not None else None
    processed = sum(dataset.fs.size(filesystem(f, storage_options)[1]) for info in dataset.buckets for f in info.files)
    return SplitCard(
        split=split, root=root, kept=int(manifest["kept"]), read=int(manifest["total_read"]),
        classes=classes, prompts=list(card.prompts) if card else [],
        per_bucket={info.name: info.count for info in dataset.buckets},
        per_class=class_counts(dataset, classes), skipped=dict(manifest.get("skipped", {})),
        processed_bytes=int(processed), raw_bytes=manifest.get("raw_bytes"),
    )


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    width = max(len(r[0]) for r in [header, *rows])
    return [f"  {header[0].ljust(width)}  {header[1]}", *(f"  {a.ljust(width)}  {b}" for a, b in rows)]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_cards(cards: list[SplitCard]) -> str:
    """The printed dataset card: a per-split line, then each split's buckets, classes, skips and bytes."""
    lines = []
    if len(cards) > 1:
        per_split = [(c.split, f"{c.kept} kept of {c.read} read") for c in cards]
        lines += ["splits:", *_table(per_split, ("split", "samples")), ""]
    for c in cards:
        lines.append(f"split {c.split} ({c.root}): {c.kept} samples kept of {c.read} read")
        if not c.prompts:  # every card has a prompt: none means the manifest predates dataset cards
            lines.append("  classes: unknown (the manifest has no dataset card: preprocess it again)")
        elif c.classes is None:
            lines.append("  classes: none declared (zero-shot eval is skipped; retrieval still runs)")
        else:
            lines.append(f"  classes: {len(c.classes)}; prompts: {len(c.prompts)} (e.g. {c.prompts[0]!r})")
        lines += _table([(b, str(n)) for b, n in c.per_bucket.items()], ("bucket", "samples"))
        lines += _table([(name, str(n)) for name, n in c.per_class.items()] or [("-", "0")], ("class", "samples"))
        lines += _table([(k, str(n)) for k, n in c.skipped.items()] or [("none", "0")], ("skipped kind", "samples"))
        raw = c.raw_per_sample
        ratio = f" ({c.processed_per_sample / raw:.2f}x raw)" if raw else ""
        lines.append(f"  bytes per sample: processed {_size(c.processed_per_sample)}{ratio}, raw "
                     + (_size(raw) if raw is not None else "unknown (the manifest has no raw_bytes)"))
        lines.append("")
    return "\n".join(lines).rstrip()


def contact_sheet(dataset: ProcessedDataset, out: str | Path, classes: list[str] | None = None,
                  per_bucket: int = 2, max_buckets: int = 8) -> Path:
    """A PNG with a few decoded samples of the largest buckets: video frames, the still image,
    the log-mel spectrogram and the caption with its class, exactly as stored for training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = sorted((b for b in dataset.buckets if b.count), key=lambda b: -b.count)[:max_buckets]
    samples = []
    for info in buckets:
        wanted = [c for c in (*_visual_columns(), "caption", "label", "key") if c in info.columns]
        batch = next(dataset.iter_batches(info, per_bucket, wanted))
        samples += [(info.name, {c: v[i] for c, v in batch.items()}) for i in range(len(batch[wanted[0]]))]
    kinds = [c for c in _visual_columns() if any(c in s for _, s in samples)]
    cols = len(kinds) + 1
    fig, axes = plt.subplots(len(samples), cols, figsize=(4 * cols, 1.9 * len(samples)), squeeze=False)
    for row, (bucket, sample) in enumerate(samples):
        for col, kind in enumerate(kinds):
            ax = axes[row, col]
            ax.set_axis_off()
            if kind not in sample:
                continue
            x, spec = sample[kind], registry.of_column(kind)
            if spec.dtype != "uint8":  # features over time (log-mel): time along x
                ax.imshow(x.T, origin="lower", aspect="auto", cmap="magma")
            elif x.ndim == 4:  # a clip: up to 4 frames side by side
                picked = np.linspace(0, len(x) - 1, min(4, len(x))).astype(int)
                ax.imshow(np.concatenate(list(x[picked]), axis=1))
            else:
                ax.imshow(x)
            if row == 0:
                ax.set_title(kind if spec.dtype == "uint8" else f"{kind} (time ->)", fontsize=9)
        ax = axes[row, -1]
        ax.set_axis_off()
        label = int(sample.get("label", -1))
        name = (classes[label] if classes and 0 <= label < len(classes) else str(label)) if label >= 0 else UNLABELLED
        text = f"bucket {bucket}\nkey {sample.get('key', '?')}\nclass {name}\n\"{sample.get('caption', '')}\""
        ax.text(0, 0.5, text, fontsize=8, va="center", wrap=True)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def inspect(path: str, out_dir: str | Path | None = None, storage_options: dict[str, Any] | None = None,
            per_bucket: int = 2) -> tuple[list[SplitCard], list[Path]]:
    """Cards of every split under ``path``; with ``out_dir``, ``card.json`` and one contact sheet per split."""
    cards = [inspect_split(s, root, storage_options) for s, root in find_splits(path, storage_options).items()]
    sheets: list[Path] = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "card.json").write_text(json.dumps([asdict(c) for c in cards], indent=2))
        for c in cards:
            dataset = ProcessedDataset.open(c.root, storage_options)
            sheets.append(contact_sheet(dataset, out_dir / f"contact_sheet_{c.split}.png", c.classes, per_bucket))
    return cards, sheets
