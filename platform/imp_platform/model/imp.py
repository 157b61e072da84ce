"""The IMP model: embedders -> shared encoder -> pooling, with projections, temperatures and classifiers;
optionally CoCa's text decoder over the encoder's output (``model.decoder``).

One module serves every (dataset, objective) pair of Alternating Gradient Descent: each call
to ``encode`` handles one modality at one input shape, so expert load and MoE aux losses
come out per modality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from imp_platform.config.model import ModelConfig
from imp_platform.model.decoder import TextDecoder
from imp_platform.model.embed import Embedders, grid_shape, kept_tokens
from imp_platform.model.encoder import Encoder
from imp_platform.model.heads import Heads, mean_pool
from imp_platform.model.moe import MoEStats
from imp_platform.model.pooling import AttentionPooler
from imp_platform.objectives.caption import decoder_inputs


@dataclass
class EncoderOutput:
    pooled: torch.Tensor  # [B, d]
    tokens: torch.Tensor  # [B, N, d] after the final norm (aggregation token first when pooling="token")
    mask: torch.Tensor | None  # [B, N] real tokens, None when all are real
    aux_loss: torch.Tensor  # scalar, already weighted; 0 for dense models
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E] share of assignments
    moe: dict[int, MoEStats] = field(default_factory=dict)  # layer -> full stats (coverage, loss parts)
    queries: torch.Tensor | None = None  # [B, Q, d] the attentional pooler's decoder queries (pooling="attention")


class IMPModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedders(cfg)
        self.encoder = Encoder(cfg)
        self.heads = Heads(cfg)
        self.agg_token = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02) if cfg.pooling == "token" else None
        self.pooler = AttentionPooler(cfg) if cfg.pooling == "attention" else None
        self.decoder = TextDecoder(cfg) if cfg.decoder.enabled else None

    def encode(
        self, modality: str, inputs: torch.Tensor, *, mask: torch.Tensor | None = None, drop_rate: float = 0.0
    ) -> EncoderOutput:
        """Encode one batch of one modality (see ``embed`` for input layouts).

        Text of a model with a decoder is CoCa's unimodal text embedding (``unimodal_text``), so
        training, zero-shot eval and inference, which all embed text here, use the same one.
        """
        if modality == "text" and mask is not None and mask.shape != inputs.shape:
            raise ValueError(f"text mask shape {tuple(mask.shape)} != ids shape {tuple(inputs.shape)}")
        if modality == "text" and self.decoder is not None:
            return self.unimodal_text(inputs, mask)
        emb = self.embed(modality, inputs, mask=mask if modality == "text" else None, drop_rate=drop_rate)
        x, mask = emb.tokens, emb.mask
        if mask is not None and bool(mask.all()):
            mask = None
        if self.agg_token is not None:
            x = torch.cat([self.agg_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        result = self.encoder(x, mask)
        tokens = result.tokens
        queries = None
        if self.pooler is not None:
            pooled, queries = self.pooler(tokens, mask)
        else:
            pooled = tokens[:, 0] if self.agg_token is not None else mean_pool(tokens, mask)
        aux = sum((s.aux_loss for s in result.moe.values()), tokens.new_zeros((), dtype=torch.float32))
        return EncoderOutput(
            pooled=pooled,
            tokens=tokens,
            mask=mask,
            aux_loss=aux,
            expert_load={layer: s.load for layer, s in result.moe.items()},
            moe=result.moe,
            queries=queries,
        )

    def unimodal_text(self, ids: torch.Tensor, mask: torch.Tensor | None) -> EncoderOutput:
        """CoCa's text side: the decoder's unimodal output at the last real token of ``[BOS] + ids``
        (causal and right-padded, so it has seen the whole caption and no padding)."""
        assert self.decoder is not None
        out = self.decoder(decoder_inputs(ids, self.decoder.bos_id), None)
        real = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        real = torch.cat([real.new_ones(real.shape[0], 1), real.bool()], dim=1)  # BOS
        return EncoderOutput(pooled=self.decoder.text_embedding(out, real.sum(dim=1)), tokens=out.text,
                             mask=None if bool(real.all()) else real,
                             aux_loss=out.text.new_zeros((), dtype=torch.float32))

    def decoder_context(self, out: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the text decoder cross-attends to: the pooler's queries, else every encoder token (and mask)."""
        if self.decoder is None:
            raise ValueError("the model has no text decoder (set model.decoder.enabled, or add a caption objective)")
        return (out.queries, None) if out.queries is not None else (out.tokens, out.mask)

    def caption_logits(self, out: EncoderOutput, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder logits [B, L + 1, V] for captions ``ids`` [B, L] of the encoded batch ``out``."""
        context, mask = self.decoder_context(out)
        assert self.decoder is not None
        return self.decoder(decoder_inputs(ids, self.decoder.bos_id), context, mask).logits

    def project(self, pooled: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """Map ``source``-modality features into the common space shared with ``target`` -> [B, d_common]."""
        return self.heads.project(pooled, source, target)

    def log_temperature(self, source: str, target: str) -> torch.Tensor:
        return self.heads.log_temperature(source, target)

    def temperature(self, source: str, target: str) -> torch.Tensor:
        """Learnable positive NCE temperature for the (unordered) modality-family pair."""
        return self.log_temperature(source, target).exp()

    def classify(self, pooled: torch.Tensor, head: str) -> torch.Tensor:
        return self.heads.classify(pooled, head)

    def num_tokens(self, modality: str, shape: Sequence[int], drop_rate: float = 0.0) -> int:
        """Encoder tokens for one sample of per-sample ``shape`` (no batch dim) after DropToken at ``drop_rate``."""
        t, h, w = grid_shape(self.cfg, modality, shape)
        return kept_tokens(t * h * w, drop_rate) + (1 if self.agg_token is not None else 0)


def build_model(cfg: ModelConfig) -> IMPModel:
    """Build an ``IMPModel`` from a config (random init; seed torch first for reproducibility)."""
    return IMPModel(cfg)
