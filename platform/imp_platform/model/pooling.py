"""CoCa's attentional pooler: learned queries cross-attending to the encoder's tokens.

One query gives the pooled (contrastive) embedding; with the text decoder on, N more give
the decoder a fixed-size summary to cross-attend to, whatever the input's token count.
"""

from __future__ import annotations

import torch
from torch import nn

from imp_platform.config.model import ModelConfig
from imp_platform.model.attention import attention

KeysValues = tuple[torch.Tensor, torch.Tensor]  # each [B, N, H, D]


class CrossAttention(nn.Module):
    """Queries from ``x`` attend to a context's keys/values (projected once, so decoding can cache them)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.backend = cfg.num_heads, cfg.head_dim, cfg.attention
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.q_norm = nn.LayerNorm(cfg.head_dim, bias=cfg.bias) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(cfg.head_dim, bias=cfg.bias) if cfg.qk_norm else nn.Identity()

    def keys_values(self, context: torch.Tensor) -> KeysValues:
        batch, n, _ = context.shape
        k, v = self.kv(context).view(batch, n, 2, self.num_heads, self.head_dim).unbind(dim=2)
        return self.k_norm(k), v

    def forward(self, x: torch.Tensor, kv: KeysValues, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` [B, Nq, d] over keys/values [B, Nk, H, D]; ``mask`` [B, Nk] marks real context tokens."""
        batch, n, d = x.shape
        q = self.q_norm(self.q(x).view(batch, n, self.num_heads, self.head_dim))
        out = attention(q, *kv, mask=mask, backend=self.backend, cross=True)
        return self.out(out.reshape(batch, n, d))


class AttentionPooler(nn.Module):
    """``1 + num_queries`` learned queries over the encoder tokens, then a LayerNorm (as CoCa)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        extra = cfg.decoder.num_queries if cfg.decoder.enabled else 0
        self.queries = nn.Parameter(torch.randn(1 + extra, cfg.d_model) * 0.02)
        self.attn = CrossAttention(cfg)
        self.norm = nn.LayerNorm(cfg.d_model, bias=cfg.bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens [B, N, d] -> (pooled [B, d], decoder queries [B, num_queries, d] or None)."""
        queries = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        out = self.norm(self.attn(queries, self.attn.keys_values(tokens), mask))
        return out[:, 0], (out[:, 1:] if out.shape[1] > 1 else None)
