"""The shared pre-LN Transformer: attention (optionally QK-LayerNorm) and a dense or MoE FFN per block."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from imp_platform.config.model import ModelConfig
from imp_platform.model.attention import attention
from imp_platform.model.moe import MoEFFN, MoEStats


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.backend = cfg.num_heads, cfg.head_dim, cfg.attention
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        # QK-LayerNorm (IMP's MoE models): normalizes each head's queries and keys, bounding logits.
        self.q_norm = nn.LayerNorm(cfg.head_dim, bias=cfg.bias) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(cfg.head_dim, bias=cfg.bias) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, n, d = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.num_heads, self.head_dim).unbind(dim=2)
        out = attention(self.q_norm(q), self.k_norm(k), v, mask=mask, backend=self.backend)
        return self.out(out.reshape(batch, n, d))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.ffn = MoEFFN(cfg.d_model, cfg.mlp_dim, cfg.moe) if sparse else DenseFFN(cfg.d_model, cfg.mlp_dim, cfg.bias)

    @property
    def sparse(self) -> bool:
        return isinstance(self.ffn, MoEFFN)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.attn(self.norm1(x), mask)
        h = self.norm2(x)
        if self.sparse:
            y, stats = self.ffn(h, mask)
            return x + y, stats
        return x + self.ffn(h), None


@dataclass
class EncoderResult:
    tokens: torch.Tensor
    moe: dict[int, MoEStats] = field(default_factory=dict)  # layer index -> stats


class Encoder(nn.Module):
    """Blocks plus the final LayerNorm a pre-LN stack needs before pooling."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        sparse = set(cfg.sparse_layers())
        self.blocks = nn.ModuleList([Block(cfg, i in sparse) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderResult:
        stats: dict[int, MoEStats] = {}
        for i, block in enumerate(self.blocks):
            x, s = block(x, mask)
            if s is not None:
                stats[i] = s
        return EncoderResult(self.norm(x), stats)
