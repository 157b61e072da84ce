"""Captioning on a processed split: a generated caption per clip, scored against the stored caption.

Metrics: ``caption_token_accuracy`` (teacher-forced next-token accuracy over the reference
tokens and EOS: what the captioning loss trains), ``caption_exact_match`` (generated ==
reference, case and spacing ignored), ``caption_bleu4`` (corpus BLEU-4, ``bleu4``) and, when
the dataset declares classes, ``caption_label_word_accuracy`` (labelled clips whose caption
names their class: Video-STaR's label check).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imp_platform.model.generate import generate_from, ids_to_text
from imp_platform.objectives.caption import IGNORE, caption_targets
from imp_platform.train.tasks import COLUMNS, to_inputs

CAPTION_SOURCES = ("video", "image", "audio_mel", "audio_wave")  # captions come from the first one stored


@dataclass(frozen=True)
class CaptionRow:
    key: str
    generated: str
    reference: str | None  # the stored caption, None when the split has none
    label: int  # -1 = unlabelled
    tokens_correct: int = 0  # teacher-forced hits over the reference tokens + EOS
    tokens_total: int = 0


def source_modality(columns: Sequence[str]) -> str | None:
    """The modality a bucket's captions are generated from (None: it stores none we can caption)."""
    return next((m for m in CAPTION_SOURCES if COLUMNS[m][0] in columns), None)


@torch.no_grad()
def iter_captions(model: Any, dataset: Any, tokenizer: Any, *, batch_size: int = 32, max_len: int = 16,
                  beam_size: int = 1, max_samples: int | None = None,
                  device: torch.device | str = "cpu") -> Iterator[CaptionRow]:
    """Caption every row of a ``ProcessedDataset`` (stored order, bucket by bucket, up to ``max_samples``)."""
    device = torch.device(device)
    seen = 0
    for info in dataset.buckets:
        modality = source_modality(list(info.columns))
        if modality is None or not info.count:
            continue
        extra = [c for c in ("key", "label", "caption", "text_ids", "text_mask") if c in info.columns]
        for batch in dataset.iter_batches(info, batch_size, [*COLUMNS[modality], *extra]):
            if max_samples is not None and seen >= max_samples:
                return
            n = len(batch[COLUMNS[modality][0]])
            x, kwargs = to_inputs(modality, batch, device)
            encoded = model.encode(modality, x, **kwargs)
            texts = ids_to_text(generate_from(model, encoded, max_len=max_len, beam_size=beam_size), tokenizer)
            correct, total = _teacher_forced(model, encoded, batch, device) if "text_ids" in batch else (None, None)
            for i in range(min(n, max_samples - seen if max_samples is not None else n)):
                yield CaptionRow(
                    key=str(batch["key"][i]) if "key" in batch else f"{info.name}/{seen + i}",
                    generated=texts[i],
                    reference=str(batch["caption"][i]) if "caption" in batch else None,
                    label=int(batch["label"][i]) if "label" in batch else -1,
                    tokens_correct=int(correct[i]) if correct is not None else 0,
                    tokens_total=int(total[i]) if total is not None else 0,
                )
            seen += n


def _teacher_forced(model: Any, encoded: Any, batch: dict[str, np.ndarray],
                    device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per row: next-token argmax hits and counted positions over the stored caption (+ EOS)."""
    ids, text = to_inputs("text", batch, device)
    logits = model.caption_logits(encoded, ids)
    targets = caption_targets(ids, text["mask"], model.decoder.eos_id)
    counted = targets != IGNORE
    hits = (logits.argmax(dim=-1) == targets) & counted
    return hits.sum(dim=1).cpu().numpy(), counted.sum(dim=1).cpu().numpy()


def _words(text: str) -> list[str]:
    return text.lower().split()


def names_class(caption: str, class_name: str) -> bool:
    """Whether ``caption`` has ``class_name`` as a word (case ignored): Video-STaR's label verification."""
    return class_name.lower() in _words(caption)


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(pairs: Sequence[tuple[str, str]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) of (generated, reference) pairs, one reference each:
    clipped 1-4-gram precisions summed over the corpus, their geometric mean, times the brevity
    penalty; no smoothing, so a corpus without one matching 4-gram scores 0. Words are lower-cased
    whitespace tokens, as the captions are tokenized."""
    hits, totals = [0] * 4, [0] * 4
    generated_len = reference_len = 0
    for generated, reference in pairs:
        g, r = _words(generated), _words(reference)
        generated_len, reference_len = generated_len + len(g), reference_len + len(r)
        for n in range(1, 5):
            grams = _ngrams(g, n)
            hits[n - 1] += sum((grams & _ngrams(r, n)).values())
            totals[n - 1] += sum(grams.values())
    if not generated_len or min(hits) == 0:
        return 0.0
    log_precision = sum(math.log(h / t) for h, t in zip(hits, totals)) / 4
    brevity = min(0.0, 1.0 - reference_len / generated_len)
    return math.exp(brevity + log_precision)


def caption_metrics(rows: Sequence[CaptionRow], classes: Sequence[str] | None = None) -> dict[str, float]:
    """Token accuracy, exact match and (given class names) label-word accuracy of captioned rows."""
    out: dict[str, float] = {"caption_samples": float(len(rows))}
    total = sum(r.tokens_total for r in rows)
    if total:
        out["caption_token_accuracy"] = sum(r.tokens_correct for r in rows) / total
    refs = [r for r in rows if r.reference is not None]
    if refs:
        out["caption_exact_match"] = float(np.mean([_words(r.generated) == _words(r.reference or "") for r in refs]))
        out["caption_bleu4"] = bleu4([(r.generated, r.reference or "") for r in refs])
    labelled = [r for r in rows if classes is not None and 0 <= r.label < len(classes)]
    if labelled and classes is not None:
        out["caption_label_word_accuracy"] = float(np.mean(
            [names_class(r.generated, classes[r.label]) for r in labelled]))
    return out


def caption_checkpoint(checkpoint: str, input_path: str, out: str, *, tokenizer: str | None = None,
                       batch_size: int = 32, max_len: int = 16, beam_size: int = 1,
                       max_samples: int | None = None) -> dict[str, float]:
    """Caption a processed split with a checkpoint's model; write one JSON line per clip to ``out``.

    ``checkpoint``: a run checkpoint (its run config names the training tokenizer) or an exported
    model directory (then ``tokenizer`` must name a tokenizer.json). Returns the caption metrics.
    """
    import json
    from pathlib import Path

    from imp_platform.config import ConfigError
    from imp_platform.data.dataset import DatasetCard, read_tokenizer
    from imp_platform.data.decode import load_tokenizer
    from imp_platform.data.stream import ProcessedDataset
    from imp_platform.train.checkpoint import RUN_CONFIG, load_model, load_run_config

    model, model_cfg = load_model(checkpoint)
    if not model_cfg.decoder.enabled:
        raise ConfigError(f"{checkpoint}: the model has no text decoder (train it with a caption objective)")
    if max_len >= model.decoder.max_len:
        raise ConfigError(f"max_len {max_len} exceeds the model's max_text_len ({model.decoder.max_len - 1})")
    if tokenizer is None:
        if not (Path(checkpoint) / RUN_CONFIG).exists():
            raise ConfigError(f"{checkpoint} has no {RUN_CONFIG}: pass --tokenizer (the training tokenizer.json)")
        cfg = load_run_config(checkpoint)
        tokenizer = read_tokenizer(cfg, cfg.data.train_split)
    dataset = ProcessedDataset.open(input_path)
    card = DatasetCard.from_manifest(dataset.manifest)
    rows = []
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for row in iter_captions(model, dataset, load_tokenizer(tokenizer), batch_size=batch_size, max_len=max_len,
                                 beam_size=beam_size, max_samples=max_samples):
            fh.write(json.dumps({"key": row.key, "caption": row.generated, "reference": row.reference,
                                 "label": row.label}) + "\n")
            rows.append(row)
    return caption_metrics(rows, card.classes if card else None)


@dataclass(frozen=True)
class HeldOutCaptions:
    """The captioning part of a run's held-out eval (runs with a caption objective)."""

    tokenizer_json: str  # the training tokenizer: generated ids are its ids
    max_len: int = 16

    @classmethod
    def for_run(cls, cfg: Any) -> HeldOutCaptions | None:
        """None when no task trains the decoder."""
        from imp_platform.data.dataset import read_tokenizer

        if not any(o.kind == "caption" for t in cfg.tasks.values() for o in t.objectives):
            return None
        return cls(read_tokenizer(cfg, cfg.data.train_split))

    def metrics(self, model: Any, dataset: Any, classes: Sequence[str] | None, *, batch_size: int,
                max_samples: int | None, device: torch.device) -> dict[str, float]:
        from imp_platform.data.decode import load_tokenizer

        rows = list(iter_captions(model, dataset, load_tokenizer(self.tokenizer_json), batch_size=batch_size,
                                  max_len=self.max_len, max_samples=max_samples, device=device))
        return caption_metrics(rows, classes)
