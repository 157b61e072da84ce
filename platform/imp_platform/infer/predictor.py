"""The model step of batch inference: one model per Ray Data actor, decoded rows in, prediction rows out.

Input batches come in one of two layouts: the packed rows of the preprocess decode step
(``data.pipeline``: any bucket, tensors as raw bytes plus a layout, skip records included) or
one bucket's uniform rows from a processed split. Each modality is encoded on its own, its rows
grouped by input shape (whatever else differs in their buckets) and cut into ``batch_size``
chunks; Expert-Choice routing makes a sample's output depend on its batch mates, so outputs
repeat exactly only when batches do (the driver keeps Ray Data's order for that).

Output: one row per sample (a sample written at several video resolutions counts once, at its
first), skipped samples included (``skip_kind`` set, predictions null) for the driver to count.
Every batch has the same Arrow schema: a modality a row lacks is null there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from imp_platform.data import modalities as registry
from imp_platform.data.buckets import bucket_name
from imp_platform.data.pipeline import tensor_columns
from imp_platform.eval.zeroshot import Prompts, class_space, encode_prompts, text_space
from imp_platform.train.tasks import encode, to_inputs

Batch = dict[str, np.ndarray]
# Columns the driver reads and drops (counting skips) before writing.
SKIP_KIND, SKIP_DETAIL = "skip_kind", "skip_detail"


@dataclass(frozen=True)
class PredictorSpec:
    """Everything an actor needs besides the batches (plain data, shipped once per actor)."""

    checkpoint: str  # a run checkpoint or exported model: a local directory or an s3:// URI
    what: tuple[str, ...]
    modalities: tuple[str, ...]  # model modalities the output has columns for
    batch_size: int
    seed: int
    heads: dict[str, str] = field(default_factory=dict)  # classification head -> the modality it reads
    storage_options: dict[str, Any] = field(default_factory=dict)  # s3fs options of an s3:// checkpoint
    prompts: Prompts | None = None  # tokenized class prompts (zeroshot)
    num_classes: int | None = None
    tokenizer_json: str | None = None  # turns generated ids into text (caption)
    caption_max_len: int = 16
    caption_beam_size: int = 1


def _tensors(batch: Batch) -> tuple[np.ndarray, list[str], list[dict[str, np.ndarray]]]:
    """(output row of each good sample, its bucket, its tensor columns) in batch order.

    Output rows are the batch's rows that start a sample (``view`` 0); skipped rows hold no tensors.
    """
    if "layout" not in batch:  # one bucket's uniform rows (a processed split)
        columns = [c for c in tensor_columns() if c in batch]
        name = bucket_name({c: list(batch[c].shape[1:]) for c in registry.token_columns() if c in batch})
        n = len(batch["key"])
        return np.arange(n), [name] * n, [{c: batch[c][i] for c in columns} for i in range(n)]
    first = np.flatnonzero(batch["view"] == 0)
    out, buckets, tensors = [], [], []
    for i, row in enumerate(first):
        if batch["skip_kind"][row]:
            continue
        layout = json.loads(batch["layout"][row])
        out.append(i)
        buckets.append(str(batch["bucket"][row]))
        tensors.append({c: np.frombuffer(batch[c][row], dtype=dtype).reshape(shape) for c, (dtype, shape) in layout.items()})
    return np.array(out, dtype=np.int64), buckets, tensors


def _shape_groups(tensors: list[dict[str, np.ndarray]], columns: list[str]) -> Iterator[tuple[np.ndarray, Batch]]:
    """(indices, stacked ``columns``) per input shape among the rows that hold ``columns``, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(tensors):
        if all(c in row for c in columns):
            groups.setdefault(tuple(row[columns[0]].shape), []).append(i)
    for members in groups.values():
        yield np.array(members), {c: np.stack([tensors[i][c] for i in members]) for c in columns}


def _sample_rows(batch: Batch) -> Batch:
    """key, label and skip columns of the rows that start a sample."""
    n = len(batch["key"])
    first = np.flatnonzero(batch["view"] == 0) if "view" in batch else np.arange(n)
    packed = "skip_kind" in batch
    return {
        "key": batch["key"][first].astype(str),
        "label": batch["label"][first].astype(np.int64) if "label" in batch else np.full(len(first), -1, np.int64),
        SKIP_KIND: batch["skip_kind"][first].astype(str) if packed else np.full(len(first), "", dtype=object),
        # a skip record carries its reason in the caption column (data.pipeline._pack)
        SKIP_DETAIL: np.where(batch["skip_kind"][first] != "", batch["caption"][first], "").astype(str)
        if packed else np.full(len(first), "", dtype=object),
    }


class _Column:
    """One output column filled group by group; rows never filled are null."""

    def __init__(self, n: int, dtype: pa.DataType, width: int | None = None) -> None:
        self.dtype, self.width = dtype, width
        self.valid = np.zeros(n, dtype=bool)
        self.values: np.ndarray = (np.zeros((n, width), np.float32) if width else
                                   np.zeros(n, dtype=object if pa.types.is_string(dtype) else dtype.to_pandas_dtype()))

    def put(self, rows: np.ndarray, values: Any) -> None:
        self.values[rows] = values
        self.valid[rows] = True

    def array(self) -> pa.Array:
        if self.width:
            values = pa.array(self.values.reshape(-1))
            return pa.FixedSizeListArray.from_arrays(values, self.width, mask=pa.array(~self.valid))
        return pa.array(self.values, type=self.dtype, mask=~self.valid)


class Predictor:
    """The ``map_batches`` callable: loads the model once (GPU when the actor has one) and, for
    zero-shot, embeds the class prompts once."""

    def __init__(self, spec: PredictorSpec) -> None:
        from imp_platform.infer.batch import local_checkpoint
        from imp_platform.train.checkpoint import load_model

        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with local_checkpoint(spec.checkpoint, spec.storage_options) as directory:  # each actor downloads its own
            model, model_cfg = load_model(directory)
        self.model = model.to(self.device)
        self.d_model, self.d_common = model_cfg.d_model, model_cfg.d_common
        self.classes: dict[str, torch.Tensor] = {}
        if "zeroshot" in spec.what:
            assert spec.prompts is not None and spec.num_classes, "zeroshot needs the class prompts"
            prompts = tuple(np.array(a) for a in spec.prompts)  # Ray hands them over read-only; torch warns
            text = encode_prompts(self.model, prompts, spec.batch_size, self.device)
            self.classes = {m: class_space(self.model, text, prompts[2], spec.num_classes, m)
                            for m in spec.modalities if m != "text"}
        # Encode only what an output needs: every modality for embeddings, else those with classes or a head.
        self.encoded = [m for m in spec.modalities
                        if "embed" in spec.what or m in self.classes or m in spec.heads.values()]
        self.tokenizer = None
        if "caption" in spec.what:
            from imp_platform.data.decode import load_tokenizer

            assert spec.tokenizer_json is not None, "caption needs the tokenizer"
            self.tokenizer = load_tokenizer(spec.tokenizer_json)

    def _columns(self, n: int) -> dict[str, _Column]:
        """The output columns after key/bucket/label/skip, in a fixed order."""
        what, cols = self.spec.what, {}
        for m in self.spec.modalities:
            if "embed" in what:
                cols[f"pooled_{m}"] = _Column(n, pa.float32(), self.d_model)
                cols[f"common_{m}"] = _Column(n, pa.float32(), self.d_common)
            if m in self.classes:
                cols[f"zeroshot_{m}"] = _Column(n, pa.int64())
                cols[f"zeroshot_{m}_score"] = _Column(n, pa.float32())
        if "classify" in what:
            for head in self.spec.heads:
                cols[f"head_{head}"] = _Column(n, pa.int64())
                cols[f"head_{head}_score"] = _Column(n, pa.float32())
        if "caption" in what:
            cols["generated_caption"] = _Column(n, pa.string())
        return cols

    @torch.no_grad()
    def __call__(self, batch: Batch) -> pa.Table:
        torch.manual_seed(self.spec.seed)  # nothing here samples today; a sampling decoder would repeat too
        rows = _sample_rows(batch)
        n = len(rows["key"])
        out, buckets, tensors = _tensors(batch)
        bucket = _Column(n, pa.string())
        bucket.put(out, buckets)
        cols = self._columns(n)
        for m in self.encoded:
            for members, stacked in _shape_groups(tensors, registry.modality(m).columns):
                for start in range(0, len(members), self.spec.batch_size):
                    part = slice(start, start + self.spec.batch_size)
                    self._embed(m, {c: v[part] for c, v in stacked.items()}, out[members[part]], cols)
        if "generated_caption" in cols:
            self._captions(tensors, out, cols["generated_caption"])
        return pa.table({
            "key": pa.array(rows["key"], pa.string()), "bucket": bucket.array(), "label": pa.array(rows["label"]),
            SKIP_KIND: pa.array(rows[SKIP_KIND], pa.string()), SKIP_DETAIL: pa.array(rows[SKIP_DETAIL], pa.string()),
            **{name: col.array() for name, col in cols.items()},
        })

    def _embed(self, modality: str, chunk: Batch, out: np.ndarray, cols: dict[str, _Column]) -> None:
        """One model batch of one modality at one shape: fill its columns at rows ``out``."""
        features = encode(self.model, modality, chunk, self.device).pooled.float()
        if f"pooled_{modality}" in cols:
            cols[f"pooled_{modality}"].put(out, features.cpu().numpy())
            cols[f"common_{modality}"].put(out, self._common(features, modality).cpu().numpy())
        if modality in self.classes:
            logits = text_space(self.model, features, modality) @ self.classes[modality].T
            self._put_top(cols, f"zeroshot_{modality}", out, logits / self.model.temperature(modality, "text").float())
        for head, m in self.spec.heads.items():
            if m == modality and f"head_{head}" in cols:
                self._put_top(cols, f"head_{head}", out, self.model.classify(features, head).float())

    def _captions(self, tensors: list[dict[str, np.ndarray]], out: np.ndarray, column: _Column) -> None:
        """Generated captions from each row's first caption source (video, else image, else audio)."""
        todo = list(range(len(tensors)))
        for m in registry.media():  # the first one a row has
            sources = [tensors[i] for i in todo]
            for members, stacked in _shape_groups(sources, registry.modality(m).columns):
                rows = np.array([todo[i] for i in members])
                for start in range(0, len(rows), self.spec.batch_size):
                    part = slice(start, start + self.spec.batch_size)
                    column.put(out[rows[part]], self._caption(m, {c: v[part] for c, v in stacked.items()}))
            todo = [i for i in todo if not all(c in tensors[i] for c in registry.modality(m).columns)]

    def _common(self, features: torch.Tensor, modality: str) -> torch.Tensor:
        """Unit-norm embedding in the common space: towards text, or (text itself) towards vision."""
        if modality != "text":
            return text_space(self.model, features, modality)
        return F.normalize(self.model.project(features, "text", "video").float(), dim=-1)

    @staticmethod
    def _put_top(cols: dict[str, _Column], name: str, out: np.ndarray, logits: torch.Tensor) -> None:
        """Top class and its softmax probability."""
        score, index = logits.softmax(dim=-1).max(dim=-1)
        cols[name].put(out, index.cpu().numpy())
        cols[f"{name}_score"].put(out, score.cpu().numpy())

    def _caption(self, modality: str, chunk: Batch) -> list[str]:
        from imp_platform.model.generate import generate, ids_to_text

        x, kwargs = to_inputs(modality, chunk, self.device)
        ids = generate(self.model, modality, x, max_len=self.spec.caption_max_len,
                       beam_size=self.spec.caption_beam_size, **kwargs)
        return ids_to_text(ids, self.tokenizer)
