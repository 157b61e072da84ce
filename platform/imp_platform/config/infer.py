"""Typed config of a batch-inference run (``platform infer`` / ``jobs/infer.py``).

The command line's flags become one ``InferConfig``; the inference code reads nothing else.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from imp_platform.config.base import StrictModel

Output = Literal["embed", "classify", "caption", "zeroshot"]
OUTPUTS: tuple[str, ...] = ("embed", "classify", "caption", "zeroshot")


class InferConfig(StrictModel):
    """What to run (checkpoint), over what (raw shards or a processed split) and what to write."""

    checkpoint: str  # a run checkpoint directory (train/checkpoint.py) or an exported one (model/io.py)
    input: str  # .tar shards (folder, glob, s3://) or a processed split (a folder holding manifest.json)
    out: str  # output folder (or s3:// prefix): part-*.parquet + summary.json
    what: list[Output] = Field(default_factory=lambda: ["embed", "zeroshot"], min_length=1)
    # Pipeline YAML for decoding raw shards (default: the run checkpoint's, else the embedded demo's)
    # and its ``--set`` overrides (e.g. decode.num_actors=4).
    pipeline: str | None = None
    pipeline_overrides: list[str] = Field(default_factory=list)
    batch_size: int = Field(32, ge=1)  # samples per model forward, per bucket
    num_actors: int | None = Field(None, ge=1)  # model replicas; None: one per GPU, else one
    seed: int = 0  # torch seed set before every batch, so a run repeats exactly
    rows_per_file: int = Field(100_000, ge=1)  # output rows per parquet file
    caption_max_len: int = Field(16, ge=1)  # generated caption tokens at most
    caption_beam_size: int = Field(1, ge=1)  # 1: greedy
    storage_options: dict = Field(default_factory=dict)  # for ``out`` (s3fs keys come from the environment)

    @field_validator("what")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))
