"""Held-out evaluation: zero-shot classification by text prompts and cross-modal retrieval.

Zero-shot: each class is the mean of its prompts' text embeddings (``class_prompts``, the
caption templates used in training) projected towards the modality; a clip is assigned the
class with the highest cosine similarity. Retrieval: R@1/5/10 over the whole held-out split,
averaged over both directions. ``val_loss`` is the mean symmetric NCE of the pairs on
held-out batches, so it is comparable across AGD and mixed runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imp_platform.config.train import PretrainConfig
from imp_platform.train.tasks import COLUMNS, encode

# metric name -> model modality; the first available audio/vision representation is used.
ZERO_SHOT = {"video": "video", "image": "image", "audio": ("audio_mel", "audio_wave")}
RETRIEVAL = {"video_text": ("video", "text"), "audio_text": ("audio", "text"), "video_audio": ("video", "audio")}
KS = (1, 5, 10)


def _available(modality: str | tuple[str, ...], columns: set[str]) -> str | None:
    for name in (modality,) if isinstance(modality, str) else modality:
        if COLUMNS[name][0] in columns:
            return name
    return None


@dataclass
class HeldOut:
    """The held-out split of a run, opened once; ``evaluate(model)`` embeds it and scores."""

    dataset: Any
    prompts: tuple[np.ndarray, np.ndarray, np.ndarray]  # ids [C*P, L], mask, class of each prompt
    batch_size: int
    max_samples: int | None
    device: torch.device

    @classmethod
    def open(cls, cfg: PretrainConfig, device: torch.device | str = "cpu") -> HeldOut:
        from imp_platform.data.stream import ProcessedDataset

        dataset = ProcessedDataset.open(cfg.data.processed_path(cfg.data.eval_split), cfg.data.storage_options)
        text_len = max(b.shape["text_ids"][0] for b in dataset.buckets if "text_ids" in b.shape)
        return cls(dataset, prompt_tokens(cfg, text_len), cfg.eval.batch_size, cfg.eval.max_samples,
                   torch.device(device))

    def _modalities(self) -> dict[str, str]:
        """metric family ("video", "audio", "image", "text") -> model modality present in every bucket."""
        common = set.intersection(*(set(b.shape) for b in self.dataset.buckets))
        out = {family: m for family, spec in ZERO_SHOT.items() if (m := _available(spec, common))}
        if "text_ids" in common:
            out["text"] = "text"
        return out

    @torch.no_grad()
    def embed(self, model: Any) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """Pooled features per family over the held-out split (up to ``max_samples``), and labels."""
        families = self._modalities()
        columns = sorted({c for m in families.values() for c in COLUMNS[m]} | {"label"})
        pooled: dict[str, list[torch.Tensor]] = {f: [] for f in families}
        labels: list[np.ndarray] = []
        seen = 0
        for info in self.dataset.buckets:
            for batch in self.dataset.iter_batches(info, self.batch_size, columns):
                if self.max_samples is not None and seen >= self.max_samples:
                    break
                for family, modality in families.items():
                    pooled[family].append(encode(model, modality, batch, self.device).pooled.float())
                labels.append(batch["label"])
                seen += len(batch["label"])
        feats = {f: torch.cat(v)[: self.max_samples] for f, v in pooled.items() if v}
        return feats, np.concatenate(labels)[: self.max_samples]

    @torch.no_grad()
    def evaluate(self, model: Any) -> dict[str, float]:
        families = self._modalities()
        feats, labels = self.embed(model)
        out: dict[str, float] = {"eval_samples": float(len(labels))}
        ids, mask, prompt_class = self.prompts
        batch = {"text_ids": ids, "text_mask": mask}
        text = encode(model, "text", batch, self.device).pooled.float()
        for family in ("video", "image", "audio"):
            if family not in feats:
                continue
            modality = families[family]
            z = F.normalize(model.project(feats[family], modality, "text").float(), dim=-1)
            t = F.normalize(model.project(text, "text", modality).float(), dim=-1)
            classes = torch.stack([F.normalize(t[prompt_class == c].mean(0), dim=-1)
                                   for c in range(int(prompt_class.max()) + 1)])
            scores = z @ classes.T
            truth = torch.as_tensor(labels, dtype=torch.long)
            out[f"zeroshot_{family}_top1"] = float((scores.argmax(-1).cpu() == truth).float().mean())
            top5 = scores.topk(min(5, scores.shape[1]), dim=-1).indices.cpu()
            out[f"zeroshot_{family}_top5"] = float((top5 == truth[:, None]).any(-1).float().mean())
        val_losses = []
        for name, (fa, fb) in RETRIEVAL.items():
            if fa not in feats or fb not in feats:
                continue
            ma, mb = families[fa], families[fb]
            za = F.normalize(model.project(feats[fa], ma, mb).float(), dim=-1)
            zb = F.normalize(model.project(feats[fb], mb, ma).float(), dim=-1)
            for k, value in recall_at_k(za @ zb.T, KS).items():
                out[f"retrieval_{name}_r{k}"] = value
            val_losses.append(_heldout_nce(za, zb, model.temperature(ma, mb).float(), self.batch_size))
        if val_losses:
            out["val_loss"] = float(np.mean(val_losses))
        return out


def recall_at_k(sim: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Recall@k of the matching item (the diagonal), averaged over a->b and b->a."""
    n = sim.shape[0]
    target = torch.arange(n)
    out = {}
    for k in ks:
        k_eff = min(k, n)
        a2b = (sim.topk(k_eff, dim=1).indices.cpu() == target[:, None]).any(1).float().mean()
        b2a = (sim.T.topk(k_eff, dim=1).indices.cpu() == target[:, None]).any(1).float().mean()
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


def prompt_tokens(cfg: PretrainConfig, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every class's prompts, tokenized like training captions: (ids [N, L], mask [N, L], class [N])."""
    from imp_platform.data.synth import DIGIT_WORDS, class_prompts

    texts, classes = [], []
    for label in range(len(DIGIT_WORDS)):
        for prompt in class_prompts(label):
            texts.append(prompt)
            classes.append(label)
    ids, mask = tokenize(cfg, texts, length)
    return ids, mask, np.array(classes)


def tokenize(cfg: PretrainConfig, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's own tokenizer and padding, so prompts look exactly like training captions."""
    from imp_platform.data.decode import load_tokenizer, tokenize as tokenize_one

    tokenizer = load_tokenizer(cfg.data.tokenizer or f"{cfg.data.raw_root}/tokenizer.json")
    pairs = [tokenize_one(text, tokenizer, length) for text in texts]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
