"""Training FLOPs of the model, counted from its shapes (the numerator of ``platform bench train``'s ``cpu_mfu``).

A multiply-add is 2 FLOPs. Counted: every matrix product the encoder runs per sequence
(qkv and output projections, attention's ``QK^T`` and ``AV`` over all heads, the dense FFN
or the router and the routed experts' FFN) and the input stems (the conv stem's 3x3 convs on
every frame and its tubelet projection, the audio patch projection). Not counted: norms,
activations, softmax, pooling heads and losses (O(d) per token or per sample, a few percent
of the tiny model at most). Backward costs twice the forward (a product's input and weight
gradients), so a training step is 3x the forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from imp_platform.config.model import ModelConfig

BACKWARD_FACTOR = 3  # forward + backward (grad of the input and of the weight, each one forward's cost)


def matmul(rows: float, inner: int, cols: int) -> float:
    """FLOPs of a [rows, inner] x [inner, cols] product."""
    return 2.0 * rows * inner * cols


def attention_forward(cfg: ModelConfig, tokens: int) -> float:
    """``QK^T`` and ``AV`` of one sequence, summed over heads (heads x head_dim = d): quadratic in ``tokens``."""
    return 2 * matmul(tokens, cfg.d_model, tokens)


def block_forward(cfg: ModelConfig, tokens: int, sparse: bool) -> float:
    """One encoder block's forward FLOPs on one sequence of ``tokens``."""
    d, h = cfg.d_model, cfg.mlp_dim
    flops = matmul(tokens, d, 3 * d) + matmul(tokens, d, d) + attention_forward(cfg, tokens)  # qkv, out, attention
    if not sparse:
        return flops + matmul(tokens, d, h) + matmul(tokens, h, d)
    slots = tokens * cfg.moe.active_experts_per_token()  # Expert Choice: capacity_factor slots per token
    return flops + matmul(tokens, d, cfg.moe.num_experts) + matmul(slots, d, h) + matmul(slots, h, d)


def encoder_forward(cfg: ModelConfig, tokens: int) -> float:
    """All blocks' forward FLOPs on one sequence of ``tokens``."""
    sparse = set(cfg.sparse_layers())
    return sum(block_forward(cfg, tokens, i in sparse) for i in range(cfg.depth))


def conv_stem_forward(cfg: ModelConfig, frames: int, height: int, width: int, tubelets: int) -> float:
    """The conv stem on ``frames`` frames of ``height x width``, then its projection of ``tubelets`` tubelets."""
    from imp_platform.model.embed import ConvTubelets

    stem = ConvTubelets(cfg)
    flops, side_h, side_w = 0.0, height, width
    convs = [m for m in stem.convs if isinstance(m, nn.Conv2d)]
    for conv in convs:
        side_h, side_w = -(-side_h // conv.stride[0]), -(-side_w // conv.stride[1])
        kh, kw = conv.kernel_size
        flops += frames * matmul(side_h * side_w, conv.in_channels * kh * kw, conv.out_channels)
    return flops + matmul(tubelets, stem.proj.in_features, cfg.d_model)


def embed_forward(cfg: ModelConfig, modality: str, shape: Sequence[int]) -> float:
    """The input stem's forward FLOPs for one sample of ``shape`` (runs on every token, before DropToken)."""
    from imp_platform.data import modalities as registry
    from imp_platform.model.embed import grid_shape

    spec = registry.modality(modality)
    t, h, w = grid_shape(cfg, modality, shape)
    pt, ph, pw = cfg.video_patch
    if spec.stem == "tubelets":
        if cfg.vision_stem == "conv":  # an image runs as a clip of pt copies of itself
            return conv_stem_forward(cfg, t * pt, h * ph, w * pw, t * h * w)
        return matmul(t * h * w, pt * ph * pw * 3, cfg.d_model)
    if spec.stem == "patches":
        return matmul(t * h * w, math.prod(spec.model_patch(cfg)), cfg.d_model)
    return 0.0  # tokens: an embedding lookup


def sample_forward(cfg: ModelConfig, modality: str, shape: Sequence[int], drop_rate: float = 0.0) -> float:
    """Forward FLOPs of one sample of ``modality``: its stem on every token, the encoder on the kept ones."""
    from imp_platform.model.embed import grid_shape, kept_tokens

    t, h, w = grid_shape(cfg, modality, shape)
    kept = kept_tokens(t * h * w, drop_rate) + (1 if cfg.pooling == "token" else 0)
    return embed_forward(cfg, modality, shape) + encoder_forward(cfg, kept)


def sample_train(cfg: ModelConfig, modality: str, shape: Sequence[int], drop_rate: float = 0.0) -> float:
    """Forward + backward FLOPs of one sample (``BACKWARD_FACTOR`` x the forward)."""
    return BACKWARD_FACTOR * sample_forward(cfg, modality, shape, drop_rate)
