"""Per-GPU memory plan of a training step: parameters, gradients, AdamW state, activations, peak.

Pure arithmetic on the ``ModelConfig`` (parameter counts from ``presets.count_params``), for
three layouts of ``gpus`` workers:

- ``replicate``: every worker holds the whole model, gradients and optimizer state;
- ``fsdp``: FSDP2 shards parameters, gradients and optimizer state over all workers, and
  holds one block's unsharded parameters and gradients at a time (two parameter copies, for
  the prefetch of the next block);
- ``fsdp+ep``: experts sharded over an expert-parallel group of ``expert`` workers, FSDP over
  the rest, so a sparse block gathers only its ``E / expert`` local experts. As
  ``train/parallel.py`` does, the expert shards stay outside FSDP: each worker holds
  ``1 / expert`` of the experts' parameters, grads and AdamW state, not ``1 / gpus``.

Bytes: parameters, gradients and the two AdamW moments are fp32 (4 + 4 + 8 bytes per held
parameter); FSDP's gathered copies are in the compute dtype; activations are in the compute
dtype (bf16 on GPU, fp32 on CPU), the router's in fp32. Activations are what backward keeps
per encoded token, counted tensor by tensor from the blocks (``_block_activation``), for a
memory-efficient attention kernel (xformers, SDPA flash: no [N, N] score matrix).

The peak is not the sum of the four: backward frees a block's activations as it makes that
block's gradients, so the peak is the largest of (a) parameters + optimizer state + the
activations still held + the gradients made so far, over the blocks in backward order, and
(b) the optimizer step: parameters + state + all gradients + ``foreach`` AdamW's temporary
(one fp32 copy of the held parameters; torch's default on GPU, per tensor on CPU). The
estimate is checked against a measured CPU peak by ``tests/model/test_plan.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from imp_platform.config.model import ModelConfig

Strategy = Literal["replicate", "fsdp", "fsdp+ep"]
STRATEGIES: tuple[Strategy, ...] = ("replicate", "fsdp", "fsdp+ep")
STATE_BYTES = {"params": 4, "grads": 4, "optimizer": 8}  # fp32 master weights, fp32 grads, AdamW m and v
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """One layout's bytes per GPU: what it holds (params .. activations) and its peak in a step."""

    strategy: Strategy
    gpus: int
    expert: int  # expert-parallel group size (1: experts not sharded by EP)
    tokens: int  # encoded tokens per GPU per micro-batch
    params: float
    grads: float
    optimizer: float
    activations: float
    peak: float

    def fits(self, gpu_mem_gb: float, headroom: float = 0.9) -> bool:
        """Whether the peak stays under ``headroom`` of the GPU (the rest: CUDA context, allocator slack)."""
        return self.peak <= headroom * gpu_mem_gb * GIB


def expert_params(cfg: ModelConfig) -> int:
    """Parameters in the experts' ``w1``/``w2`` of all sparse layers."""
    return len(cfg.sparse_layers()) * cfg.moe.num_experts * 2 * cfg.d_model * cfg.mlp_dim


def _block_params(cfg: ModelConfig, sparse: bool, expert: int) -> int:
    """Parameters one FSDP unit (an encoder block) gathers, with ``expert``-way sharded experts."""
    d, h = cfg.d_model, cfg.mlp_dim
    attention = 4 * d * d + (2 * cfg.head_dim if cfg.qk_norm else 0) + 2 * d
    if not sparse:
        return attention + 2 * d * h
    return attention + cfg.moe.num_experts // expert * 2 * d * h + cfg.moe.num_experts * d


def _block_activation(cfg: ModelConfig, sparse: bool, act_bytes: int) -> float:
    """Bytes backward keeps per token in one block.

    Attention: norm1 input and output, the qkv output (3d: q, k, v), the QK-norm outputs (2d),
    the attention output and its [B, N, d] copy for the output projection: 8d (+2d with
    QK-norm). Then norm2 input and output (2d) and the FFN: dense, the GELU input and output
    (2h); sparse, per routed slot (capacity factor or k per token) the gathered input, the GELU
    input and output and the expert output (2d + 2h), plus the router's fp32 logits,
    log-probabilities and probabilities (3E).
    """
    d, h = cfg.d_model, cfg.mlp_dim
    elements = 10 * d + (2 * d if cfg.qk_norm else 0)
    if not sparse:
        return (elements + 2 * h) * act_bytes
    slots = cfg.moe.active_experts_per_token()
    return (elements + slots * (2 * d + 2 * h)) * act_bytes + 3 * cfg.moe.num_experts * 4


def _stem_elements(cfg: ModelConfig) -> int:
    """Elements the vision stem keeps per token: the input patch, and for the conv stem each
    stride-2 stage's conv, GroupNorm and GELU outputs plus the projection's input."""
    pt, ph, pw = cfg.video_patch
    if cfg.vision_stem == "linear":
        return pt * ph * pw * 3
    from imp_platform.model.embed import ConvTubelets

    per_frame, side = ph * pw * 3, ph
    convs = [m for m in ConvTubelets(cfg).convs if isinstance(m, nn.Conv2d)]
    for conv in convs:
        side //= conv.stride[0]
        per_frame += 3 * conv.out_channels * side * side
    return pt * (per_frame + convs[-1].out_channels)


def _outside_activation(cfg: ModelConfig, act_bytes: int) -> float:
    """Per token outside the blocks: the vision stem's, its output and the final norm's input and output."""
    return (3 * cfg.d_model + _stem_elements(cfg)) * act_bytes


def activation_bytes(cfg: ModelConfig, tokens: int, act_bytes: int) -> float:
    """Activations backward keeps for one micro-batch of ``tokens`` encoded vision tokens."""
    sparse = set(cfg.sparse_layers())
    per_token = sum(_block_activation(cfg, i in sparse, act_bytes) for i in range(cfg.depth))
    return tokens * (per_token + _outside_activation(cfg, act_bytes))


def _backward_peak(cfg: ModelConfig, tokens: int, act_bytes: int, grad_share: float, rest_grads: float) -> float:
    """Most activations + gradients alive at once in backward: block ``i`` running holds the
    activations of blocks ``0..i`` and the gradients of blocks ``i..`` (``grad_share`` bytes per
    parameter held), plus the stem's activations and the other parameters' gradients."""
    sparse = set(cfg.sparse_layers())
    acts = [tokens * _block_activation(cfg, i in sparse, act_bytes) for i in range(cfg.depth)]
    grads = [grad_share * _block_params(cfg, i in sparse, 1) for i in range(cfg.depth)]
    live = max(sum(acts[: i + 1]) + sum(grads[i:]) for i in range(cfg.depth))
    return live + tokens * _outside_activation(cfg, act_bytes) + rest_grads


def plan(
    cfg: ModelConfig, strategy: Strategy, gpus: int, tokens: int, expert: int = 1, act_bytes: int = 2, foreach: bool = True
) -> MemoryPlan:
    """Bytes per GPU of ``strategy`` on ``gpus`` workers at ``tokens`` per micro-batch (``foreach``: AdamW's GPU default)."""
    from imp_platform.model.presets import count_params

    if gpus < 1 or tokens < 1:
        raise ValueError(f"gpus ({gpus}) and tokens ({tokens}) must be positive")
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "fsdp+ep":
        expert = 1
    elif not cfg.moe.enabled:
        raise ValueError("parallel 'fsdp+ep' needs an MoE model (--moe)")
    elif gpus % expert or cfg.moe.num_experts % expert:
        raise ValueError(f"expert ({expert}) must divide both gpus ({gpus}) and moe.num_experts ({cfg.moe.num_experts})")
    total = count_params(cfg)["total"]
    shards = 1 if strategy == "replicate" else gpus
    held = total / shards
    if strategy == "fsdp+ep":  # expert shards are replicated over the gpus / expert EP groups, not FSDP-sharded
        held += expert_params(cfg) * (1 / expert - 1 / gpus)
    sparse = set(cfg.sparse_layers())
    gathered = 0 if shards == 1 else max(_block_params(cfg, i in sparse, expert) for i in range(cfg.depth))
    params = held * STATE_BYTES["params"] + 2 * gathered * act_bytes
    grads = held * STATE_BYTES["grads"] + gathered * STATE_BYTES["grads"]
    optimizer = held * STATE_BYTES["optimizer"]
    grad_share = STATE_BYTES["grads"] / shards
    rest = (total - sum(_block_params(cfg, i in sparse, 1) for i in range(cfg.depth))) * grad_share
    in_backward = _backward_peak(cfg, tokens, act_bytes, grad_share, rest) + gathered * STATE_BYTES["grads"]
    in_step = held * (STATE_BYTES["grads"] + (STATE_BYTES["params"] if foreach else 0))
    return MemoryPlan(
        strategy=strategy,
        gpus=gpus,
        expert=expert,
        tokens=tokens,
        params=params,
        grads=grads,
        optimizer=optimizer,
        activations=activation_bytes(cfg, tokens, act_bytes),
        peak=params + optimizer + max(in_backward, in_step),
    )


def default_expert(cfg: ModelConfig, gpus: int) -> int:
    """The largest expert-parallel size dividing both the expert count and ``gpus`` (torchtitan: EP <= E)."""
    return math.gcd(cfg.moe.num_experts, gpus) if cfg.moe.enabled else 1
