"""Cross-modal contrastive losses on L2-normalized embeddings (IMP/VATT).

With ``gather=True`` each worker scores its own rows against every worker's rows
(``gather_with_grad``), so negatives come from the global batch and gradients reach all
workers; without a process group that is the plain local loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imp_platform.objectives.distributed import gather_with_grad, rank_offset


def _scale(temperature: float | torch.Tensor) -> float | torch.Tensor:
    return 1.0 / temperature


def nce_loss(
    a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor, *, gather: bool = False
) -> torch.Tensor:
    """Symmetric InfoNCE ``(l(a->b) + l(b->a)) / 2``; row i of ``a`` and ``b`` is the positive pair."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, all_b = (gather_with_grad(a), gather_with_grad(b)) if gather else (a, b)
    labels = torch.arange(a.shape[0], device=a.device) + (rank_offset(a.shape[0]) if gather else 0)
    scale = _scale(temperature)
    loss_ab = F.cross_entropy(a @ all_b.T * scale, labels)
    loss_ba = F.cross_entropy(b @ all_a.T * scale, labels)
    return (loss_ab + loss_ba) / 2


def mil_nce_loss(
    a: torch.Tensor,
    b_multi: torch.Tensor,
    temperature: float | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    gather: bool = False,
) -> torch.Tensor:
    """Symmetric MIL-NCE: ``a`` [B, D] has K positives ``b_multi`` [B, K, D] (``mask`` [B, K] marks real ones).

    a->b: -log(sum_k exp(s(a_i, b_ik)) / sum_{j,k} exp(s(a_i, b_jk)));
    b->a: same numerator over sum_{j,k} exp(s(a_j, b_ik)). K = 1 gives ``nce_loss``.
    """
    batch, k, _ = b_multi.shape
    a, b_multi = F.normalize(a.float(), dim=-1), F.normalize(b_multi.float(), dim=-1)
    if mask is None:
        mask = torch.ones(batch, k, dtype=torch.bool, device=a.device)
    all_a = gather_with_grad(a) if gather else a
    all_b = gather_with_grad(b_multi) if gather else b_multi
    all_mask = gather_with_grad(mask.float()).bool() if gather else mask
    offset = rank_offset(batch) if gather else 0
    rows = torch.arange(batch, device=a.device)
    scale = _scale(temperature)

    s_ab = torch.einsum("id,jkd->ijk", a, all_b) * scale  # [B, B_all, K]
    s_ab = s_ab.masked_fill(~all_mask[None], float("-inf"))
    positives = s_ab[rows, rows + offset]  # [B, K]
    pos = torch.logsumexp(positives, dim=-1)
    loss_ab = torch.logsumexp(s_ab.flatten(1), dim=-1) - pos

    s_ba = torch.einsum("jd,ikd->ijk", all_a, b_multi) * scale  # [B, B_all, K]
    s_ba = s_ba.masked_fill(~mask[:, None], float("-inf"))
    loss_ba = torch.logsumexp(s_ba.flatten(1), dim=-1) - pos
    return (loss_ab + loss_ba).mean() / 2
