"""Typed model config: sizes, patching, MoE placement/routing, heads.

One ``ModelConfig`` builds the whole IMP encoder (``imp_platform.model.build_model``).
Validation names the offending field so a YAML typo fails before any tensor is made.
Naming: ``num_heads`` is the attention head count; ``heads`` maps a classification head
(one per labelled dataset) to its number of classes.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from imp_platform.config.base import StrictModel

Router = Literal["expert_choice", "top_k"]
Backend = Literal["auto", "xformers", "sdpa"]


class MoEConfig(StrictModel):
    """Sparse FFN layers. ``num_experts == 0`` means a dense model.

    Placement: ``last_n`` (IMP: the last 6 layers) or ``every_k`` (every k-th layer,
    counting from the last one), exactly one of them when experts are on.
    """

    num_experts: int = Field(0, ge=0)
    last_n: int | None = Field(None, ge=1)
    every_k: int | None = Field(None, ge=1)
    router: Router = "expert_choice"
    # Expert Choice: each expert takes capacity_factor * group_size / E tokens per group.
    capacity_factor: float = Field(1.0, gt=0)
    group_size: int = Field(2048, ge=1)
    # Token choice: each token goes to top_k experts, no token dropped.
    top_k: int = Field(1, ge=1)
    # IMP adds z-loss unweighted; 1e-3 (ST-MoE) is the safer default at small scale.
    z_loss_weight: float = Field(1e-3, ge=0)
    load_balance_weight: float = Field(0.01, ge=0)
    # LIMoE entropy losses per modality (0 = off). global loss = relu(threshold - H(mean p)),
    # or -H(mean p) when no threshold is set.
    limoe_local_weight: float = Field(0.0, ge=0)
    limoe_global_weight: float = Field(0.0, ge=0)
    limoe_global_threshold: float | None = None
    router_init_std: float = Field(0.02, gt=0)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.enabled:
            if (self.last_n is None) == (self.every_k is None):
                raise ValueError("moe: set exactly one of last_n / every_k when num_experts > 0")
            if self.router == "top_k" and self.top_k > self.num_experts:
                raise ValueError(f"moe.top_k ({self.top_k}) exceeds moe.num_experts ({self.num_experts})")
        return self

    def is_sparse(self, layer: int, depth: int) -> bool:
        """Whether encoder layer ``layer`` (0-based) of ``depth`` holds experts."""
        if not self.enabled:
            return False
        from_end = depth - 1 - layer
        if self.last_n is not None:
            return from_end < self.last_n
        assert self.every_k is not None
        return from_end % self.every_k == 0

    def active_experts_per_token(self) -> float:
        """Average experts a token passes through (for per-token parameter counts)."""
        return self.capacity_factor if self.router == "expert_choice" else float(self.top_k)


class DecoderConfig(StrictModel):
    """CoCa's text decoder: unimodal (causal) layers, then multimodal layers that also
    cross-attend to the encoder. Off by default, so encoder-only models keep their weights."""

    enabled: bool = False
    unimodal_depth: int = Field(1, ge=0)
    multimodal_depth: int = Field(2, ge=1)
    # Decoder queries of the attentional pooler (``pooling: attention``); other poolings let the
    # decoder cross-attend to every encoder token.
    num_queries: int = Field(16, ge=1)


class ModelConfig(StrictModel):
    """The IMP encoder: one shared Transformer, small per-modality embedders and heads."""

    preset: str | None = None
    d_model: int = Field(768, ge=8)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_dim: int = Field(3072, ge=8)
    # Vision tubelet (t, h, w); images become clips of t frames.
    video_patch: tuple[int, int, int] = (4, 16, 16)
    # "linear": IMP's linear tubelet embedding. "conv": a few stride-2 convs per frame (square
    # power-of-two patches only); learns much faster for small models on small data.
    vision_stem: Literal["linear", "conv"] = "linear"
    # Log-mel patch (frames, mel bins) over inputs [F, mel_bins].
    audio_patch: tuple[int, int] = (16, 16)
    mel_bins: int = Field(128, ge=1)
    wave_patch: int = Field(256, ge=1)
    vocab_size: int = Field(32100, ge=2)
    max_text_len: int = Field(512, ge=1)
    # Sizes of the factorized positional tables (temporal, vertical, horizontal); looked up
    # with linear interpolation at normalized token coordinates.
    max_positions: tuple[int, int, int] = (16, 32, 32)
    qk_norm: bool = False
    bias: bool = False
    moe: MoEConfig = MoEConfig()
    attention: Backend = "auto"
    d_common: int = Field(1024, ge=1)
    pair_mlp: bool = True
    # "attention": CoCa's attentional pooler (a learned query cross-attending to the tokens).
    pooling: Literal["mean", "token", "attention"] = "mean"
    decoder: DecoderConfig = DecoderConfig()
    heads: dict[str, int] = Field(default_factory=dict)
    temperature_init: float = Field(0.2, gt=0)

    @field_validator("heads", mode="before")
    @classmethod
    def _heads_is_mapping(cls, value: object) -> object:
        if isinstance(value, int):
            raise ValueError("heads maps classification head name -> num classes; attention heads are num_heads")
        return value

    @field_validator("heads")
    @classmethod
    def _positive_classes(cls, value: dict[str, int]) -> dict[str, int]:
        for name, classes in value.items():
            if classes < 1:
                raise ValueError(f"heads.{name}: needs at least 1 class, got {classes}")
        return value

    @field_validator("video_patch", "audio_patch", "max_positions")
    @classmethod
    def _positive_sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(v < 1 for v in value):
            raise ValueError(f"all sizes must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        _, ph, pw = self.video_patch
        if self.vision_stem == "conv" and (ph != pw or ph < 2 or ph & (ph - 1)):
            raise ValueError(f"vision_stem 'conv' needs square power-of-two video_patch sides, got {self.video_patch}")
        if self.mel_bins % self.audio_patch[1]:
            raise ValueError(f"mel_bins ({self.mel_bins}) must be divisible by audio_patch[1] ({self.audio_patch[1]})")
        if self.moe.enabled:
            # grouped_mm needs rows of 16 bytes: 8 elements covers bf16 and fp32.
            for name in ("d_model", "mlp_dim"):
                if getattr(self, name) % 8:
                    raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of 8 for MoE grouped GEMM")
            sparse = [i for i in range(self.depth) if self.moe.is_sparse(i, self.depth)]
            if self.moe.last_n is not None and self.moe.last_n > self.depth:
                raise ValueError(f"moe.last_n ({self.moe.last_n}) exceeds depth ({self.depth})")
            if not sparse:  # pragma: no cover - every_k >= 1 always hits the last layer
                raise ValueError("moe: no layer is sparse")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.depth) if self.moe.is_sparse(i, self.depth)]

    def log_temperature_init(self) -> float:
        return math.log(self.temperature_init)
