"""Sparse mixture-of-experts FFN: Expert-Choice (IMP's default) and dropless token-choice top-k.

Experts are stored stacked, ``w1`` [E, d, h] and ``w2`` [E, h, d] (bias-free, as IMP), so
the export layout is one tensor per layer and both routers run as batched GEMMs:
Expert Choice has fixed shapes ([E, C, d]) and uses ``bmm``; token choice sorts the
(token, expert) assignments by expert and runs ``grouped_mm`` over the jagged groups, as
one autograd node (``SortedExperts``) whose backward is written out.
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


def router_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of router ``logits`` [T, E] and their log-partition ``logsumexp`` [T].

    Both come from one ``log_softmax`` (lse = logit - log p, for any expert): on CPU that takes
    about a third of the time of ``softmax`` plus ``logsumexp`` (whose composite kernel is slow).
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.exp(), logits[:, 0] - log_probs[:, 0]


def router_z_loss(log_partition: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (given as ``log_partition``); keeps logits small."""
    return log_partition.square().mean()


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


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [M, K] sorted by group, times per-group ``w`` [G, K, N] -> [M, N].

    ``offs`` [G] are the int32 end offsets of the groups (offs[-1] == M). Uses
    ``torch.nn.functional.grouped_mm`` on CPU and for bf16 on CUDA; loops over groups otherwise.
    """
    if _has_grouped_mm(x):
        return F.grouped_mm(x, w, offs=offs)
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(_spans(offs))], dim=0)


def grouped_weight_grad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group g, ``a_g.T @ b_g`` for ``a`` [M, K] and ``b`` [M, N] grouped by ``offs`` -> [G, K, N]."""
    if _has_grouped_mm(a):
        return F.grouped_mm(a.T, b, offs=offs)
    return torch.stack([a[s:e].T @ b[s:e] for s, e in _spans(offs)])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of ``x`` in."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _has_grouped_mm(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" or x.dtype == torch.bfloat16


def _spans(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends))


class SortedExperts(torch.autograd.Function):
    """Token-choice experts: gather, two grouped GEMMs with GELU, gate, scatter; one autograd node.

    ``dest`` [M] is the token row of each assignment, sorted by expert (groups end at
    ``offs``); ``gates`` [M] float32. ``inverse`` is ``dest``'s inverse permutation when every
    token has exactly one assignment (top-1, no padding): then the scatter and the input
    gradient are plain gathers, otherwise scatter-adds into ``rows`` zero rows. The backward is
    written out so that it skips autograd's per-op nodes and temporaries (and the contiguous
    copy CPU ``grouped_mm`` needs of an expanded gradient): about 3% of a small CPU layer.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, gates, dest, offs, inverse, rows):  # noqa: ANN001, ANN205
        xs = x.index_select(0, dest)
        pre = grouped_matmul(xs, w1, offs)
        act = F.gelu(pre)
        out = grouped_matmul(act, w2, offs)
        ctx.save_for_backward(xs, pre, act, out, w1, w2, gates, dest, offs, inverse)
        return _scatter(out.to(gates.dtype) * gates.unsqueeze(1), dest, inverse, rows)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        xs, pre, act, out, w1, w2, gates, dest, offs, inverse = ctx.saved_tensors
        grad_rows = grad.index_select(0, dest)  # float32, like the gates
        grad_gates = torch.linalg.vecdot(grad_rows, out.to(grad_rows.dtype)) if ctx.needs_input_grad[3] else None
        grad_out = (grad_rows * gates.unsqueeze(1)).to(out.dtype)
        grad_pre = torch.ops.aten.gelu_backward(grouped_matmul(grad_out, w2.transpose(1, 2), offs), pre)
        grad_w2 = grouped_weight_grad(act, grad_out, offs)
        grad_w1 = grouped_weight_grad(xs, grad_pre, offs)
        grad_x = _scatter(grouped_matmul(grad_pre, w1.transpose(1, 2), offs), dest, inverse, grad.shape[0])
        return grad_x, grad_w1, grad_w2, grad_gates, None, None, None, None


def _scatter(values: torch.Tensor, dest: torch.Tensor, inverse: torch.Tensor | None, rows: int) -> torch.Tensor:
    """Sum ``values`` [M, d] into ``rows`` rows at ``dest``; a gather by ``inverse`` when that is a permutation."""
    if inverse is not None:
        return values.index_select(0, inverse)
    return values.new_zeros(rows, values.shape[1]).index_add_(0, dest, values)


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

    def _dispatch_slots(self, x: torch.Tensor, token_idx: torch.Tensor, gates: torch.Tensor, rows: int) -> torch.Tensor:
        """Experts over equal-sized slot lists: ``token_idx`` [E * C] (expert-major) -> y [rows, d] float32.

        One gather, two ``bmm`` over [E, C, d] and one scatter-add: a handful of large kernels,
        which is what keeps the layer close to a dense FFN on CPU. (Expert parallelism overrides
        this and ``_dispatch_sorted``.)
        """
        d = x.shape[-1]
        out = self._experts_bmm(x.index_select(0, token_idx).view(self.num_experts, -1, d)).view(-1, d)
        return _scatter(out.to(gates.dtype) * gates.unsqueeze(1), token_idx, None, rows)

    def _aux(self, lse: torch.Tensor, probs: torch.Tensor, assignments: torch.Tensor | None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        weighted = {"z_loss": (cfg.z_loss_weight, router_z_loss(lse))}
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

        probs, lse = router_probs(self._logits(x))
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

        y = self._dispatch_slots(x, token_idx, gates, groups * size)[:tokens].to(x.dtype)

        real_lse, real_probs = (lse, probs) if valid is None else (lse[valid], probs[valid])
        with torch.no_grad():
            load = real_probs.mean(dim=0) if n_real else probs.new_full((experts,), 1.0 / experts)
            # Padding is picked only from invalid tokens, which coverage ignores: no need to filter it out.
            hit = torch.zeros(groups * size, dtype=torch.bool, device=x.device).index_fill_(0, token_idx, True)
            coverage = (hit if valid is None else hit[valid]).float().mean() if n_real else hit.new_zeros((), dtype=torch.float32)
        if not n_real:
            return y, self._empty_stats(load, coverage)
        return y, self._stats(self._aux(real_lse, real_probs, None), load, coverage)

    def _top_k(self, x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, MoEStats]:
        """Each real token goes to its top-k experts; no capacity, nothing dropped."""
        tokens = x.shape[0]
        experts, k = self.num_experts, self.cfg.top_k
        rows = None if valid is None else valid.nonzero().squeeze(1)
        xs = x if rows is None else x[rows]
        if xs.shape[0] == 0:
            # No assignments, but still through the experts: zero expert gradients, and an expert-parallel
            # layer joins the other ranks' token exchange.
            load = x.new_zeros(experts, dtype=torch.float32)
            none = x.new_zeros(0, dtype=torch.long)
            y = self._dispatch_sorted(x, load[:0], none, none.new_zeros(experts), None, tokens)
            return y.to(x.dtype), self._empty_stats(load, load.new_zeros(()))

        probs, lse = router_probs(self._logits(xs))
        # [Tv, k]; max is several times faster than topk for the common k = 1
        gates, expert_ids = probs.max(dim=-1, keepdim=True) if k == 1 else torch.topk(probs, k, dim=-1)
        sorted_ids, order = torch.sort(expert_ids.reshape(-1), stable=True)
        counts = torch.bincount(sorted_ids, minlength=experts)
        dest = order // k  # row of xs for each sorted assignment
        if rows is not None:
            dest = rows[dest]
        inverse = None
        if rows is None and k == 1:  # every token exactly once: dest is a permutation
            inverse = torch.empty_like(dest).scatter_(0, dest, torch.arange(tokens, device=x.device))
        y = self._dispatch_sorted(x, gates.reshape(-1).index_select(0, order), dest, counts, inverse, tokens)

        load = counts.float() / counts.sum()
        weighted = self._aux(lse, probs, expert_ids)
        return y.to(x.dtype), self._stats(weighted, load, torch.ones((), device=x.device))

    def _dispatch_sorted(
        self,
        x: torch.Tensor,
        gates: torch.Tensor,
        dest: torch.Tensor,
        counts: torch.Tensor,
        inverse: torch.Tensor | None,
        rows: int,
    ) -> torch.Tensor:
        """Experts over assignments sorted by expert -> y [rows, d] float32.

        ``dest`` [M] token rows, ``counts`` [E] assignments per expert, ``gates`` [M]; ``inverse``
        as in ``SortedExperts``.
        """
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        dtype = _compute_dtype(x)
        return SortedExperts.apply(x.to(dtype), self.w1.to(dtype), self.w2.to(dtype), gates, dest, offs, inverse, rows)

    def _empty_stats(self, load: torch.Tensor, coverage: torch.Tensor) -> MoEStats:
        # Keep the router in the graph so DDP sees a gradient (zero) for it.
        zero = (self.router.sum() * 0.0).to(torch.float32)
        return MoEStats(aux_loss=zero, load=load.detach(), coverage=coverage.detach())
