"""Sparse mixture-of-experts FFN: Expert-Choice (IMP's default) and dropless token-choice top-k.

Experts are stored stacked, ``w1`` [E, d, h] and ``w2`` [E, h, d] (bias-free, as IMP), so
the export layout is one tensor per layer and both routers run as batched GEMMs:
Expert Choice has fixed shapes ([E, C, d]) and uses ``bmm``; token choice sorts the
(token, expert) assignments by expert and runs ``grouped_mm`` over the jagged groups.
The router runs in float32; gates scale expert outputs in float32 before the scatter-add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from imp_platform.config.model import MoEConfig


@dataclass
class MoEStats:
    """What one MoE call reports: the weighted aux loss and per-expert load for metrics."""

    aux_loss: torch.Tensor
    # [E] share of the routing per expert, detached: assignments for top-k; for Expert Choice, whose
    # picks are balanced by construction, the real tokens' mean router probability (which modality
    # leans to which expert)
    load: torch.Tensor
    coverage: torch.Tensor  # fraction of real tokens that reached at least one expert, detached
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted components, detached


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def load_balance_loss(probs: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """Switch load balance E * sum_i f_i * P_i (f: share of assignments, P: mean prob); 1.0 when uniform."""
    num_experts = probs.shape[-1]
    counts = torch.bincount(assignments.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / counts.sum().clamp_min(1)
    return num_experts * (f * probs.mean(dim=0)).sum()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-9))).sum(dim=-1)


def limoe_local_entropy(probs: torch.Tensor) -> torch.Tensor:
    """LIMoE local loss: mean per-token routing entropy (minimized: confident routing)."""
    return _entropy(probs).mean()


def limoe_global_entropy(probs: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """LIMoE global loss on the modality's mean routing distribution (minimized: spread experts).

    ``-H(mean p)``, or ``relu(threshold - H(mean p))`` so it stops once the modality uses
    about ``exp(threshold)`` experts.
    """
    entropy = _entropy(probs.mean(dim=0))
    return -entropy if threshold is None else F.relu(threshold - entropy)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (CPU grouped_mm rejects expanded grads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad.contiguous()


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [M, K] sorted by group, times per-group ``w`` [G, K, N] -> [M, N].

    Uses ``torch.nn.functional.grouped_mm`` (int32 end offsets; offs[-1] == M so no row is
    left uninitialised) on CPU and for bf16 on CUDA; loops over groups otherwise.
    """
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[-1])
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x, w = x.to(dtype), w.to(dtype)
    if x.device.type == "cpu" or x.dtype == torch.bfloat16:
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x, w, offs=offs))
    parts = torch.split(x, counts.tolist())
    return torch.cat([part @ w[g] for g, part in enumerate(parts)], dim=0)


class MoEFFN(nn.Module):
    """A drop-in sparse replacement for the dense FFN of a Transformer block."""

    def __init__(self, d_model: int, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        # Router in float32, no bias, N(0, 0.02) as IMP. Stored [E, d] (nn.Linear's layout): on CPU
        # the skinny logits GEMM and its weight gradient run 3-6x faster this way than as [d, E].
        self.router = nn.Parameter(torch.empty(cfg.num_experts, d_model, dtype=torch.float32))
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router, std=self.cfg.router_init_std)
        # Same scale as nn.Linear's default init, per expert.
        for w in (self.w1, self.w2):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """``x`` [B, N, d], ``mask`` [B, N] (True = real token) -> (y [B, N, d], stats)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        valid = None if mask is None else mask.reshape(-1)
        if self.cfg.router == "expert_choice":
            y, stats = self._expert_choice(flat, valid)
        else:
            y, stats = self._top_k(flat, valid)
        return y.view(shape), stats

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.router.float())

    def _experts_bmm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(F.gelu(torch.bmm(x, self.w1)), self.w2)

    def _combine(self, out: torch.Tensor, token_idx: torch.Tensor, gates: torch.Tensor, rows: int) -> torch.Tensor:
        """Scale expert output rows by their float32 gates and scatter-add them into ``rows`` token rows."""
        out = out.to(gates.dtype) * gates.unsqueeze(1)
        return out.new_zeros(rows, out.shape[1]).index_add_(0, token_idx, out)

    def _dispatch_bmm(self, x: torch.Tensor, token_idx: torch.Tensor, gates: torch.Tensor, rows: int) -> torch.Tensor:
        """Experts over equal-sized slot lists: ``token_idx`` [E * C] (expert-major) -> y [rows, d] float32.

        One gather, two ``bmm`` over [E, C, d] and one scatter-add: a handful of large kernels,
        which is what keeps the layer close to a dense FFN on CPU.
        """
        d = x.shape[-1]
        out = self._experts_bmm(x.index_select(0, token_idx).view(self.num_experts, -1, d))
        return self._combine(out.view(-1, d), token_idx, gates, rows)

    def _aux(self, logits: torch.Tensor, probs: torch.Tensor, assignments: torch.Tensor | None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        weighted = {"z_loss": (cfg.z_loss_weight, router_z_loss(logits))}
        if assignments is not None:
            weighted["load_balance"] = (cfg.load_balance_weight, load_balance_loss(probs, assignments))
        if cfg.limoe_local_weight:
            weighted["limoe_local"] = (cfg.limoe_local_weight, limoe_local_entropy(probs))
        if cfg.limoe_global_weight:
            weighted["limoe_global"] = (cfg.limoe_global_weight, limoe_global_entropy(probs, cfg.limoe_global_threshold))
        return weighted

    def _stats(self, weighted: dict, load: torch.Tensor, coverage: torch.Tensor) -> MoEStats:
        aux = sum(w * v for w, v in weighted.values())
        return MoEStats(
            aux_loss=aux,
            load=load.detach(),
            coverage=coverage.detach(),
            losses={k: v.detach() for k, (_, v) in weighted.items()},
        )

    def _expert_choice(self, x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, MoEStats]:
        """Each expert picks its top-C tokens of each group by router probability."""
        tokens = x.shape[0]
        experts = self.num_experts
        groups = max(1, math.ceil(tokens / self.cfg.group_size))
        size = math.ceil(tokens / groups)
        pad = groups * size - tokens
        n_real = tokens if valid is None else int(valid.sum())
        if n_real == tokens:
            valid = None  # no masking work (or host syncs) when every token is real
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            real = torch.ones(tokens, dtype=torch.bool, device=x.device) if valid is None else valid
            valid = F.pad(real, (0, pad), value=False)
        capacity = min(size, max(1, math.ceil(size * self.cfg.capacity_factor / experts)))

        logits = self._logits(x)
        probs = torch.softmax(logits, dim=-1)
        scores = probs.view(groups, size, experts)
        if valid is not None:
            # Padded tokens score -1, below any probability: picked only when a group has too few real tokens.
            scores = scores.masked_fill(~valid.view(groups, size, 1), -1.0)
        # Top-C over each group's tokens (dim 1) needs no transposed copy of the scores; the
        # order inside an expert's slots does not matter, so skip sorting them.
        gates, idx = torch.topk(scores, capacity, dim=1, sorted=False)  # [G, C, E]
        offsets = torch.arange(0, groups * size, size, device=x.device).view(groups, 1, 1)
        token_idx = (idx + offsets).permute(2, 0, 1).reshape(-1)  # expert-major [E * G * C]
        gates = gates.permute(2, 0, 1).reshape(-1)
        if valid is not None:
            gates = gates.clamp_min(0.0)  # a padding slot (score -1) adds nothing

        y = self._dispatch_bmm(x, token_idx, gates, groups * size)[:tokens].to(x.dtype)

        real_logits, real_probs = (logits, probs) if valid is None else (logits[valid], probs[valid])
        with torch.no_grad():
            load = real_probs.mean(dim=0) if n_real else probs.new_full((experts,), 1.0 / experts)
            # Padding is picked only from invalid tokens, which coverage ignores: no need to filter it out.
            hit = torch.zeros(groups * size, dtype=torch.bool, device=x.device).index_fill_(0, token_idx, True)
            coverage = (hit if valid is None else hit[valid]).float().mean() if n_real else hit.new_zeros((), dtype=torch.float32)
        if not n_real:
            return y, self._empty_stats(load, coverage)
        return y, self._stats(self._aux(real_logits, real_probs, None), load, coverage)

    def _top_k(self, x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, MoEStats]:
        """Each real token goes to its top-k experts; no capacity, nothing dropped."""
        tokens = x.shape[0]
        experts, k = self.num_experts, self.cfg.top_k
        rows = None if valid is None else valid.nonzero().squeeze(1)
        xs = x if rows is None else x[rows]
        if xs.shape[0] == 0:
            load = x.new_zeros(experts, dtype=torch.float32)
            return torch.zeros_like(x), self._empty_stats(load, load.new_zeros(()))

        logits = self._logits(xs)
        probs = torch.softmax(logits, dim=-1)
        gates, expert_ids = torch.topk(probs, k, dim=-1)  # [Tv, k]
        sorted_ids, order = torch.sort(expert_ids.reshape(-1), stable=True)
        counts = torch.bincount(sorted_ids, minlength=experts)
        src = order // k  # row of xs for each sorted assignment
        dest = src if rows is None else rows[src]
        sorted_gates = gates.reshape(-1)[order]
        h = F.gelu(grouped_matmul(x.index_select(0, dest), self.w1, counts))
        y = self._combine(grouped_matmul(h, self.w2, counts), dest, sorted_gates, tokens)

        load = counts.float() / counts.sum()
        weighted = self._aux(logits, probs, expert_ids)
        return y.to(x.dtype), self._stats(weighted, load, torch.ones((), device=x.device))

    def _empty_stats(self, load: torch.Tensor, coverage: torch.Tensor) -> MoEStats:
        # Keep the router in the graph so DDP sees a gradient (zero) for it.
        zero = (self.router.sum() * 0.0).to(torch.float32)
        return MoEStats(aux_loss=zero, load=load.detach(), coverage=coverage.detach())
