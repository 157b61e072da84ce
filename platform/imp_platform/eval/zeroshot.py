"""Held-out evaluation of any corpus: zero-shot classification by text prompts, cross-modal retrieval.

Zero-shot: the dataset card (``manifest.json``'s ``dataset``, else the pipeline YAML) names
the classes and prompt templates; each class is the mean of its prompts' text embeddings,
projected towards the modality, and a clip takes the class of highest cosine similarity.
A corpus that declares no classes gets no zero-shot metrics (one log line says so).

Retrieval: R@k over the whole held-out split, averaged over both directions. On templated
captions many clips share one caption, which caps instance R@1 far below 1 (about 7 clips
per caption in the demo's test split: at most ~0.14), so ``_semantic`` variants also count a
hit when the retrieved item has the same caption (pairs with text: the text embedded is a
sample's first caption, and it matches a clip when it is any of that clip's captions) or the
same class (video-audio). ``val_loss`` is the mean symmetric NCE of the pairs on held-out
batches, so it is comparable across AGD and mixed runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imp_platform.config.train import PretrainConfig
from imp_platform.data import modalities as registry
from imp_platform.data.dataset import DatasetCard, load_card, read_tokenizer
from imp_platform.eval.calibration import Reliability, reliability
from imp_platform.eval.captioning import EXAMPLES_KEY, HeldOutCaptions
from imp_platform.eval.heads import score_heads
from imp_platform.train.tasks import encode, head_modalities

log = logging.getLogger(__name__)

RETRIEVAL = {"video_text": ("video", "text"), "audio_text": ("audio", "text"), "video_audio": ("video", "audio")}
KS = (1, 5, 10)
SEMANTIC_KS = (1, 5)
TOP_KS = (1, 5)

Prompts = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids [C*P, L], mask [C*P, L], class of each prompt


@dataclass
class Features:
    """Pooled encoder features per metric family over the held-out split, with each row's label and caption."""

    pooled: dict[str, torch.Tensor]
    labels: np.ndarray  # int64, -1 = unlabelled
    captions: np.ndarray | None  # object array of str, None when the split has no caption column
    caption_sets: list[tuple[str, ...]] | None = None  # every caption of each row (json caption lists)


@dataclass
class Evaluation:
    """Scalar metrics (what the training loop reports), the zero-shot confusion matrices and the
    reliability bins (calibration) of each scored classifier."""

    metrics: dict[str, float]
    confusion: dict[str, np.ndarray] = field(default_factory=dict)  # family -> [true class, predicted class]
    reliability: dict[str, Reliability] = field(default_factory=dict)  # zeroshot_<family> / head_<name> -> bins
    caption_examples: list[dict[str, Any]] = field(default_factory=list)  # generated vs reference, a few clips

    def as_json(self) -> dict[str, Any]:
        """Metrics with ``zeroshot_<family>_confusion`` and ``<classifier>_reliability`` nested, for ``metrics.json``
        (and ``caption_examples``, which ``write_outputs`` moves to ``captions.jsonl`` and the report)."""
        return {**self.metrics, **{f"zeroshot_{f}_confusion": m.tolist() for f, m in self.confusion.items()},
                **{f"{name}_reliability": r.as_json() for name, r in self.reliability.items()},
                **({EXAMPLES_KEY: self.caption_examples} if self.caption_examples else {})}


@dataclass
class HeldOut:
    """The held-out split of a run, opened once; ``run(model)`` embeds it and scores."""

    dataset: Any
    card: DatasetCard
    prompts: Prompts | None  # None: the dataset declares no classes, zero-shot is skipped
    batch_size: int
    max_samples: int | None
    device: torch.device
    heads: dict[str, str] = field(default_factory=dict)  # classification head -> the modality its task reads
    captions: HeldOutCaptions | None = None  # runs with a caption objective: captioning metrics too

    @classmethod
    def open(cls, cfg: PretrainConfig, device: torch.device | str = "cpu") -> HeldOut:
        from imp_platform.data.decode import load_tokenizer
        from imp_platform.data.stream import ProcessedDataset

        split = cfg.data.eval_split
        dataset = ProcessedDataset.open(cfg.data.processed_path(split), cfg.data.storage_options)
        card = load_card(cfg, split, dataset.manifest)
        prompts = None
        if card.classes is None:
            log.info("zero-shot skipped: the dataset declares no classes (dataset.classes in the pipeline YAML); "
                     "retrieval still runs")
        else:
            tokenizer = load_tokenizer(read_tokenizer(cfg, split))
            lengths = [b.shape["text_ids"][0] for b in dataset.buckets if "text_ids" in b.shape]
            prompts = prompt_tokens(card, tokenizer, max(lengths) if lengths else None)
        heads = head_modalities(cfg)
        return cls(dataset, card, prompts, cfg.eval.batch_size, cfg.eval.max_samples, torch.device(device), heads,
                   captions=HeldOutCaptions.for_run(cfg))

    def _modalities(self) -> dict[str, str]:
        """metric family (a registry source: "video", "image", "audio", "text") -> the first of its
        model modalities (``audio_mel`` before ``audio_wave``) present in every bucket."""
        common = set.intersection(*(set(b.shape) for b in self.dataset.buckets))
        out: dict[str, str] = {}
        for spec in (*map(registry.modality, registry.media()), registry.modality("text")):
            if spec.column in common:
                out.setdefault(spec.source, spec.name)
        return out

    @torch.no_grad()
    def embed(self, model: Any) -> Features:
        """Pooled features per family over the held-out split (up to ``max_samples``), labels and captions."""
        families = self._modalities()
        stored = set.intersection(*(set(b.columns) for b in self.dataset.buckets))
        extra = [c for c in ("label", "caption", *(["meta"] if "caption" in stored else [])) if c in stored]
        columns = sorted({c for m in families.values() for c in registry.modality(m).columns} | set(extra))
        pooled: dict[str, list[torch.Tensor]] = {f: [] for f in families}
        labels: list[np.ndarray] = []
        captions: list[np.ndarray] = []
        metas: list[str | None] = []
        seen = 0
        for info in self.dataset.buckets:
            for batch in self.dataset.iter_batches(info, self.batch_size, columns):
                if self.max_samples is not None and seen >= self.max_samples:
                    break
                n = len(batch[columns[0]])
                for family, modality in families.items():
                    pooled[family].append(encode(model, modality, batch, self.device).pooled.float())
                labels.append(batch["label"] if "label" in batch else np.full(n, -1, dtype=np.int64))
                if "caption" in batch:
                    captions.append(batch["caption"])
                    metas.extend(batch.get("meta", [None] * n))
                seen += n
        cap = self.max_samples
        first = np.concatenate(captions)[:cap] if captions else None
        return Features(pooled={f: torch.cat(v)[:cap] for f, v in pooled.items() if v},
                        labels=np.concatenate(labels)[:cap].astype(np.int64), captions=first,
                        caption_sets=None if first is None else [caption_set(c, m) for c, m in zip(first, metas)])

    @torch.no_grad()
    def run(self, model: Any) -> Evaluation:
        """Zero-shot (when classes are declared) and retrieval metrics of ``model`` on the split."""
        families = self._modalities()
        feats = self.embed(model)
        result = Evaluation({"eval_samples": float(len(feats.labels))})
        if self.captions is not None and getattr(model, "decoder", None) is not None:
            metrics, result.caption_examples = self.captions.evaluate(
                model, self.dataset, self.card.classes, device=self.device, batch_size=self.batch_size,
                max_samples=self.max_samples)
            result.metrics.update(metrics)
        if self.prompts is not None:
            self._zero_shot(model, families, feats, result)
        head_metrics, head_bins = score_heads(model, self.heads, {families[f]: v for f, v in feats.pooled.items()},
                                              feats.labels)
        result.metrics.update(head_metrics)
        result.reliability.update(head_bins)
        val_losses = []
        for name, (fa, fb) in RETRIEVAL.items():
            if fa not in feats.pooled or fb not in feats.pooled:
                continue
            ma, mb = families[fa], families[fb]
            za = F.normalize(model.project(feats.pooled[fa], ma, mb).float(), dim=-1)
            zb = F.normalize(model.project(feats.pooled[fb], mb, ma).float(), dim=-1)
            sim = za @ zb.T
            for k, value in recall_at_k(sim, KS).items():
                result.metrics[f"retrieval_{name}_r{k}"] = value
            groups = semantic_groups(feats, text_side=(fa, fb).index("text") if "text" in (fa, fb) else None)
            for k, value in recall_at_k(sim, SEMANTIC_KS, groups).items():
                result.metrics[f"retrieval_{name}_r{k}_semantic"] = value
            val_losses.append(_heldout_nce(za, zb, model.temperature(ma, mb).float(), self.batch_size))
        if val_losses:
            result.metrics["val_loss"] = float(np.mean(val_losses))
        return result

    def evaluate(self, model: Any) -> dict[str, float]:
        """Scalar metrics only: what the training loop logs, reports to Ray and keeps in its history."""
        return self.run(model).metrics

    def _zero_shot(self, model: Any, families: dict[str, str], feats: Features, result: Evaluation) -> None:
        num_classes = len(self.card.classes)
        text = encode_prompts(model, self.prompts, self.batch_size, self.device)
        labelled = (feats.labels >= 0) & (feats.labels < num_classes)
        if not labelled.any():
            log.info("zero-shot skipped: no held-out sample carries a label")
            return
        result.metrics["num_classes"] = float(num_classes)
        for family in feats.pooled:
            if family == "text":
                continue
            modality = families[family]
            pooled = feats.pooled[family][torch.as_tensor(labelled, device=feats.pooled[family].device)]
            z = text_space(model, pooled, modality)
            classes = class_space(model, text, self.prompts[2], num_classes, modality)
            scores, confusion = zero_shot_scores(z @ classes.T, feats.labels[labelled])
            for k, value in scores.items():
                result.metrics[f"zeroshot_{family}_top{k}"] = value
            result.confusion[family] = confusion
            # confidences: softmax of the cosine scores at the model's learned temperature for the pair
            probs = (z @ classes.T / model.temperature(modality, "text").float()).softmax(-1)
            bins = reliability(probs, torch.as_tensor(feats.labels[labelled]))
            result.metrics[f"zeroshot_{family}_ece"] = bins.ece
            result.reliability[f"zeroshot_{family}"] = bins


@torch.no_grad()
def encode_prompts(model: Any, prompts: Prompts, batch_size: int, device: torch.device) -> torch.Tensor:
    """Pooled text features [C*P, d] of every class prompt, in chunks (classes x prompts can be many thousands)."""
    ids, mask, _ = prompts
    chunks = [{"text_ids": ids[i:i + batch_size], "text_mask": mask[i:i + batch_size]}
              for i in range(0, len(ids), batch_size)]
    return torch.cat([encode(model, "text", chunk, device).pooled.float() for chunk in chunks])


def text_space(model: Any, pooled: torch.Tensor, modality: str) -> torch.Tensor:
    """[N, d_common]: ``modality`` features projected into the space shared with text, L2-normalised."""
    return F.normalize(model.project(pooled, modality, "text").float(), dim=-1)


def class_space(model: Any, prompt_features: torch.Tensor, prompt_class: np.ndarray, num_classes: int,
                modality: str) -> torch.Tensor:
    """[C, d_common]: the classes' prompts (``encode_prompts``) projected towards ``modality`` and averaged,
    so ``text_space(model, x, modality) @ class_space(...).T`` scores ``modality`` features against every class."""
    prompts = F.normalize(model.project(prompt_features, "text", modality).float(), dim=-1)
    return class_embeddings(prompts, prompt_class, num_classes)


def class_embeddings(prompts: torch.Tensor, prompt_class: np.ndarray, num_classes: int) -> torch.Tensor:
    """[C, D]: each class's L2-normalised mean of its normalised prompt embeddings."""
    owner = torch.as_tensor(prompt_class, device=prompts.device)
    return torch.stack([F.normalize(prompts[owner == c].mean(0), dim=-1) for c in range(num_classes)])


def zero_shot_scores(scores: torch.Tensor, labels: np.ndarray,
                     ks: tuple[int, ...] = TOP_KS) -> tuple[dict[int, float], np.ndarray]:
    """Top-k accuracy of class ``scores`` [N, C] against ``labels`` [N], and the confusion matrix
    (int64 [C, C], rows = true class, columns = top-1 prediction)."""
    num_classes = scores.shape[1]
    truth = torch.as_tensor(labels, dtype=torch.long)
    ranked = scores.topk(min(max(ks), num_classes), dim=-1).indices.cpu()
    accuracy = {k: float((ranked[:, :k] == truth[:, None]).any(-1).float().mean()) for k in ks}
    cells = truth * num_classes + ranked[:, 0]
    confusion = np.bincount(cells.numpy(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return accuracy, confusion


def caption_set(caption: str, meta: str | None) -> tuple[str, ...]:
    """Every caption of a row: its json caption list (``meta.captions``), else the one stored caption."""
    listed = json.loads(meta).get("captions") if meta else None
    several = isinstance(listed, list) and listed and all(isinstance(c, str) for c in listed)
    return tuple(listed) if several else (str(caption),)


def semantic_groups(feats: Features, text_side: int | None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """What counts as a semantic match: for pairs with text (``text_side``: 0 or 1, when captions
    are stored) a text item (its first caption) and a clip match when that caption is any of the
    clip's captions, as the (a side, b side) id sets of ``recall_at_k``; else the same class per
    row; unlabelled rows match only themselves."""
    n = len(feats.labels)
    if text_side is not None and feats.captions is not None:
        sets = feats.caption_sets or [(str(c),) for c in feats.captions]
        vocab = {c: i for i, c in enumerate(sorted({c for s in sets for c in s} | set(feats.captions.astype(str))))}
        clips = np.full((n, max(map(len, sets))), -1, dtype=np.int64)
        for row, captions in enumerate(sets):
            clips[row, :len(captions)] = [vocab[c] for c in captions]
        texts = np.array([[vocab[str(c)]] for c in feats.captions], dtype=np.int64)
        return (texts, clips) if text_side == 0 else (clips, texts)
    return np.where(feats.labels >= 0, feats.labels, feats.labels.max(initial=0) + 1 + np.arange(n))


def _hits(query: torch.Tensor, items: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Share of queries (id sets [n, G], -1 = none) with a top item (indices [n, k]) whose id set meets theirs."""
    found = items[top]  # [n, k, H]
    meet = (found[:, :, :, None] == query[:, None, None, :]) & (query[:, None, None, :] >= 0)
    return meet.flatten(1).any(1).float().mean()


def recall_at_k(sim: torch.Tensor, ks: tuple[int, ...] = KS,
                groups: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None) -> dict[int, float]:
    """Recall@k averaged over a->b and b->a: a hit when one of the top k is the matching item
    (the diagonal) or, given ``groups``, an item of the query's group: one id (>= 0) per row for
    both sides, or per side an id set per row [n, G] (-1 pads), a hit when the sets meet."""
    n = sim.shape[0]
    side_a, side_b = (groups, groups) if groups is None or isinstance(groups, np.ndarray) else groups
    sets = [torch.as_tensor(np.arange(n) if g is None else g).reshape(n, -1) for g in (side_a, side_b)]
    out = {}
    for k in ks:
        k_eff = min(k, n)
        a2b = _hits(sets[0], sets[1], sim.topk(k_eff, dim=1).indices.cpu())
        b2a = _hits(sets[1], sets[0], sim.T.topk(k_eff, dim=1).indices.cpu())
        out[k] = float((a2b + b2a) / 2)
    return out


def _heldout_nce(za: torch.Tensor, zb: torch.Tensor, temperature: torch.Tensor, batch: int) -> float:
    losses = []
    for start in range(0, len(za) - 1, batch):
        a, b = za[start:start + batch], zb[start:start + batch]
        if len(a) < 2:
            continue
        logits = a @ b.T / temperature
        target = torch.arange(len(a))
        losses.append(float((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2))
    return float(np.mean(losses)) if losses else float("nan")


def prompt_tokens(card: DatasetCard, tokenizer: Any, length: int | None = None) -> Prompts:
    """Every class's prompts, tokenized like training captions: (ids [N, L], mask [N, L], class [N]).

    ``length`` is the longest stored caption length (prompts pad or truncate to it, as
    captions did); None (a split without captions) fits the longest prompt.
    """
    from imp_platform.data.decode import tokenize

    texts, classes = card.prompt_texts()
    length = length or max(len(tokenizer.encode(t).ids) for t in texts)
    pairs = [tokenize(text, tokenizer, length) for text in texts]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), classes
