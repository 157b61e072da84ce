"""Captioning on a processed split: a generated caption per clip, scored against the stored caption.

Metrics: ``caption_token_accuracy`` (teacher-forced next-token accuracy over the reference
tokens and EOS: what the captioning loss trains), ``caption_exact_match`` (generated ==
reference, case and spacing ignored), ``caption_bleu4`` (corpus BLEU-4, ``bleu4``),
``caption_cider`` (CIDEr-D, ``cider_d``) and, when
the dataset declares classes, ``caption_label_word_accuracy`` (labelled clips whose caption
names their class: Video-STaR's label check).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imp_platform.data import modalities as registry
from imp_platform.model.generate import generate_from, ids_to_text
from imp_platform.objectives.caption import IGNORE, caption_targets
from imp_platform.train.tasks import to_inputs

EXAMPLES_KEY = "caption_examples"  # in an eval's metrics: generated vs reference captions of a few clips


@dataclass(frozen=True)
class CaptionRow:
    key: str
    generated: str
    reference: str | None  # the stored caption, None when the split has none
    label: int  # -1 = unlabelled
    tokens_correct: int = 0  # teacher-forced hits over the reference tokens + EOS
    tokens_total: int = 0
    frame: np.ndarray | None = None  # uint8 [H, W, 3] thumbnail of the clip's first frame (report examples)

    def example(self) -> dict[str, Any]:
        """JSON form for an eval's ``caption_examples`` (the report; frame as nested lists)."""
        return {"key": self.key, "reference": self.reference, "generated": self.generated, "label": self.label,
                "frame": None if self.frame is None else self.frame.tolist()}


def source_modality(columns: Sequence[str]) -> str | None:
    """The modality a bucket's captions are generated from (None: it stores none we can caption)."""
    return next((m for m in registry.media() if registry.modality(m).column in columns), None)


def thumbnail(x: np.ndarray, modality: str, size: int = 96) -> np.ndarray | None:
    """The first frame of a video (an image as it is), strided to at most ``size`` pixels a side; None for audio."""
    if modality not in ("video", "image"):
        return None
    frame = np.asarray(x[0] if modality == "video" else x)
    stride = max(1, math.ceil(max(frame.shape[:2]) / size))
    return np.ascontiguousarray(frame[::stride, ::stride]).astype(np.uint8)


@torch.no_grad()
def iter_captions(model: Any, dataset: Any, tokenizer: Any, *, batch_size: int = 32, max_len: int = 16,
                  beam_size: int = 1, max_samples: int | None = None, frames: int = 0,
                  device: torch.device | str = "cpu") -> Iterator[CaptionRow]:
    """Caption every row of a ``ProcessedDataset`` (stored order, bucket by bucket, up to ``max_samples``);
    the first ``frames`` rows carry a thumbnail of their clip."""
    device = torch.device(device)
    seen = 0
    for info in dataset.buckets:
        modality = source_modality(list(info.columns))
        if modality is None or not info.count:
            continue
        extra = [c for c in ("key", "label", "caption", "text_ids", "text_mask") if c in info.columns]
        column = registry.modality(modality).column
        for batch in dataset.iter_batches(info, batch_size, [*registry.modality(modality).columns, *extra]):
            if max_samples is not None and seen >= max_samples:
                return
            n = len(batch[column])
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
                    frame=thumbnail(batch[column][i], modality) if seen + i < frames else None,
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


def cider_d_scores(pairs: Sequence[tuple[str, Sequence[str]]], sigma: float = 6.0) -> list[float]:
    """CIDEr-D (Vedantam et al. 2015, as the COCO caption evaluation computes it) of each
    (generated, references) pair: per n = 1..4, the cosine of TF-IDF n-gram vectors with the
    generated counts clipped at the reference's, times a Gaussian penalty on the length difference,
    averaged over n and references, x10. IDF is over the corpus's references, so a score depends on
    the whole corpus but not on its order or the other generated captions. Lengths are word counts
    (COCO counts bigrams: the same difference whenever neither caption is empty)."""
    refs = [[_words(r) for r in references] for _, references in pairs]
    df: Counter[tuple[str, ...]] = Counter()
    for item in refs:
        df.update({g for words in item for n in range(1, 5) for g in _ngrams(words, n)})
    log_corpus = math.log(max(len(pairs), 1))

    def vectors(words: list[str]) -> tuple[list[dict[tuple[str, ...], float]], list[float]]:
        vecs = [{g: tf * (log_corpus - math.log(max(1.0, df[g]))) for g, tf in _ngrams(words, n).items()}
                for n in range(1, 5)]
        return vecs, [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]

    scores = []
    for (generated, _), item in zip(pairs, refs):
        words = _words(generated)
        gen, gen_norm = vectors(words)
        total = 0.0
        for ref_words in item:
            ref, ref_norm = vectors(ref_words)
            penalty = math.exp(-((len(words) - len(ref_words)) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                if gen_norm[n] and ref_norm[n]:
                    dot = sum(min(v, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, v in gen[n].items())
                    total += dot / (gen_norm[n] * ref_norm[n]) * penalty
        scores.append(10.0 * total / 4 / max(len(item), 1))
    return scores


def cider_d(pairs: Sequence[tuple[str, Sequence[str]]]) -> float:
    """Corpus CIDEr-D: the mean of ``cider_d_scores`` (0 for an empty corpus)."""
    return float(np.mean(cider_d_scores(pairs))) if pairs else 0.0


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
        out["caption_cider"] = cider_d([(r.generated, [r.reference or ""]) for r in refs])
    labelled = [r for r in rows if classes is not None and 0 <= r.label < len(classes)]
    if labelled and classes is not None:
        out["caption_label_word_accuracy"] = float(np.mean(
            [names_class(r.generated, classes[r.label]) for r in labelled]))
    return out


def caption_checkpoint(checkpoint: str, input_path: str, out: str, *, tokenizer: str | None = None,
                       batch_size: int = 32, max_len: int = 16, beam_size: int = 1, max_samples: int | None = None,
                       storage_options: dict[str, Any] | None = None) -> dict[str, float]:
    """Caption a processed split with a checkpoint's model; write one JSON line per clip to ``out``.

    ``checkpoint``: a run checkpoint (its run config names the training tokenizer) or an exported
    model directory (then ``tokenizer`` must name a tokenizer.json), local or s3:// (read with
    ``storage_options``, as is an s3:// input). Returns the caption metrics.
    """
    from imp_platform.config import ConfigError
    from imp_platform.data.dataset import DatasetCard, read_tokenizer
    from imp_platform.data.decode import load_tokenizer
    from imp_platform.data.stream import ProcessedDataset
    from imp_platform.infer.batch import local_checkpoint
    from imp_platform.train.checkpoint import RUN_CONFIG, load_model, load_run_config

    with local_checkpoint(checkpoint, storage_options) as directory:
        model, model_cfg = load_model(directory)
        cfg = load_run_config(directory) if (Path(directory) / RUN_CONFIG).exists() else None
    if not model_cfg.decoder.enabled:
        raise ConfigError(f"{checkpoint}: the model has no text decoder (train it with a caption objective)")
    if max_len >= model.decoder.max_len:
        raise ConfigError(f"max_len {max_len} exceeds the model's max_text_len ({model.decoder.max_len - 1})")
    if tokenizer is None:
        if cfg is None:
            raise ConfigError(f"{checkpoint} has no {RUN_CONFIG}: pass --tokenizer (the training tokenizer.json)")
        tokenizer = read_tokenizer(cfg, cfg.data.train_split)
    dataset = ProcessedDataset.open(input_path, storage_options)
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
    examples: int = 6  # clips shown in the report (and written to captions.jsonl) with both captions

    @classmethod
    def for_run(cls, cfg: Any) -> HeldOutCaptions | None:
        """None when no task trains the decoder."""
        from imp_platform.data.dataset import read_tokenizer

        if not any(o.kind == "caption" for t in cfg.tasks.values() for o in t.objectives):
            return None
        return cls(read_tokenizer(cfg, cfg.data.train_split))

    def evaluate(self, model: Any, dataset: Any, classes: Sequence[str] | None, *, batch_size: int,
                 max_samples: int | None, device: torch.device) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(caption metrics, the first ``examples`` clips as ``CaptionRow.example`` dicts)."""
        from imp_platform.data.decode import load_tokenizer

        rows = list(iter_captions(model, dataset, load_tokenizer(self.tokenizer_json), batch_size=batch_size,
                                  max_len=self.max_len, max_samples=max_samples, frames=self.examples,
                                  device=device))
        return caption_metrics(rows, classes), [r.example() for r in rows[:self.examples]]


def write_examples(examples: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One JSON line per example clip (key, label, reference, generated; the frame stays in the report)."""
    path = Path(path)
    path.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "frame"}) + "\n" for e in examples))
    return path
