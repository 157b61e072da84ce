"""CoCa's text decoder: unimodal causal layers (their last real token is a text embedding),
then multimodal layers that add cross-attention to the encoder's (pooled) tokens.

Input and output token embeddings are tied. Ids ``vocab_size`` and ``vocab_size + 1`` are
reserved for BOS and EOS, outside any tokenizer's range, so a dataset tokenizer needs no
special tokens beyond [PAD] = 0. Padding is on the right, so causal attention alone keeps
real tokens from seeing it; padded positions produce logits the loss ignores.
A ``DecoderCache`` keeps each layer's keys and values, so generation feeds one token per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from imp_platform.config.model import ModelConfig
from imp_platform.model.attention import attention
from imp_platform.model.encoder import DenseFFN, SelfAttention
from imp_platform.model.pooling import CrossAttention, KeysValues


@dataclass
class DecoderCache:
    """Per-layer self-attention keys/values so far, the context's keys/values, and the step count."""

    self_kv: dict[int, KeysValues] = field(default_factory=dict)
    cross_kv: dict[int, KeysValues] = field(default_factory=dict)
    length: int = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search: each surviving beam's parent)."""
        for kv in (self.self_kv, self.cross_kv):
            for layer, (k, v) in kv.items():
                kv[layer] = (k.index_select(0, index), v.index_select(0, index))


@dataclass
class DecoderOutput:
    logits: torch.Tensor | None  # [B, T, vocab_size + 2]; None when only the unimodal layers ran
    text: torch.Tensor  # [B, T, d] normalized unimodal output; row t embeds tokens 0..t


class CausalSelfAttention(SelfAttention):
    """The encoder's self-attention with a causal mask and an optional key/value cache."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, cache: DecoderCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        batch, n, d = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.num_heads, self.head_dim).unbind(dim=2)
        k = self.k_norm(k)
        if cache is not None:
            if layer in cache.self_kv:
                past_k, past_v = cache.self_kv[layer]
                k, v = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
            cache.self_kv[layer] = (k, v)
        out = attention(self.q_norm(q), k, v, backend=self.backend, causal=True)
        return self.out(out.reshape(batch, n, d))


class DecoderBlock(nn.Module):
    """Pre-LN: causal self-attention, cross-attention (multimodal layers only), dense FFN."""

    def __init__(self, cfg: ModelConfig, multimodal: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.norm_cross = nn.LayerNorm(cfg.d_model, bias=cfg.bias) if multimodal else None
        self.cross = CrossAttention(cfg) if multimodal else None
        self.norm2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.ffn = DenseFFN(cfg.d_model, cfg.mlp_dim, cfg.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None,
                cache: DecoderCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        if self.cross is not None:
            assert self.norm_cross is not None and context is not None
            if cache is not None and layer in cache.cross_kv:
                kv = cache.cross_kv[layer]
            else:
                kv = self.cross.keys_values(context)
                if cache is not None:
                    cache.cross_kv[layer] = kv
            x = x + self.cross(self.norm_cross(x), kv, mask)
        return x + self.ffn(self.norm2(x))


class TextDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, dec = cfg.d_model, cfg.decoder
        self.bos_id, self.eos_id = cfg.vocab_size, cfg.vocab_size + 1
        self.max_len = cfg.max_text_len + 1  # BOS + a full-length caption
        self.embed = nn.Embedding(cfg.vocab_size + 2, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.positions = nn.Parameter(torch.randn(self.max_len, d) * 0.02)
        depth = dec.unimodal_depth + dec.multimodal_depth
        self.blocks = nn.ModuleList([DecoderBlock(cfg, i >= dec.unimodal_depth) for i in range(depth)])
        self.unimodal_depth = dec.unimodal_depth
        self.text_norm = nn.LayerNorm(d, bias=cfg.bias)
        self.norm = nn.LayerNorm(d, bias=cfg.bias)

    def forward(self, ids: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None = None,
                cache: DecoderCache | None = None) -> DecoderOutput:
        """``ids`` [B, T] (the tokens after those in ``cache``) over ``context`` [B, N, d] -> logits [B, T, V].

        Without ``context`` only the unimodal layers run: the text embedding (CoCa's contrastive
        text side), no logits. Kept in ``forward`` so FSDP gathers the decoder's weights for it too.
        """
        start = cache.length if cache is not None else 0
        if start + ids.shape[1] > self.max_len:
            raise ValueError(f"decoder input of {start + ids.shape[1]} tokens exceeds "
                             f"max_text_len + 1 ({self.max_len})")
        x = self.embed(ids.long()) + self.positions[start:start + ids.shape[1]]
        text = x
        for i, block in enumerate(self.blocks):
            if i == self.unimodal_depth:
                text = self.text_norm(x)
                if context is None:
                    return DecoderOutput(logits=None, text=text)
            x = block(x, context, mask, cache, i)
        if cache is not None:
            cache.length = start + ids.shape[1]
        logits = self.norm(x) @ self.embed.weight.T.to(x.dtype)
        return DecoderOutput(logits=logits, text=text)

    def text_embedding(self, out: DecoderOutput, lengths: torch.Tensor) -> torch.Tensor:
        """The unimodal output at each sequence's last real input token (``lengths`` [B] real inputs) -> [B, d]."""
        rows = torch.arange(out.text.shape[0], device=out.text.device)
        return out.text[rows, lengths.long().to(out.text.device) - 1]
