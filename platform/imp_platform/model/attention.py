"""Attention kernels: xformers on CUDA (variable lengths packed with a block-diagonal mask),
PyTorch SDPA elsewhere.

xformers has no CPU kernels, so "auto" picks it only for CUDA tensors. On CPU, per-sequence
SDPA was the fastest way to handle packed variable lengths (see REFERENCE), so the packed
path loops over sequences there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "xformers", "sdpa")


@functools.cache
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to the concrete backend for ``device``; reject xformers off CUDA."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if backend == "xformers" and (device.type != "cuda" or not xformers_available()):
        raise ValueError("attention backend 'xformers' needs CUDA and an importable xformers")
    return backend


def _one_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """xformers is not autocast-aware: QK-LayerNorm under autocast hands it fp32 q/k next to a bf16 v."""
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype
    return q.to(dtype), k.to(dtype), v.to(dtype)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: Sequence[int], backend: str = "auto"
) -> torch.Tensor:
    """Attention over packed sequences ``[sum(L), H, D]``; tokens attend within their own sequence."""
    backend = resolve_backend(backend, q.device)
    q, k, v = _one_dtype(q, k, v)
    if backend == "xformers":
        from xformers.ops import fmha

        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(seqlens), device=q.device)
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    outs = []
    start = 0
    for length in seqlens:
        sl = slice(start, start + length)
        # SDPA wants [H, L, D].
        o = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1))
        outs.append(o.transpose(0, 1))
        start += length
    return torch.cat(outs, dim=0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    causal: bool = False,
    cross: bool = False,
) -> torch.Tensor:
    """Multi-head attention on ``[B, N, H, D]``; ``mask`` [B, N] marks real (True) vs padded keys.

    Padded query rows come back as zeros on the packed xformers path and as ordinary
    (ignored) values on SDPA; callers must not read them. Queries may be fewer than keys
    (cross-attention, or decoding with cached keys); ``causal`` then aligns the last query
    with the last key (query i sees keys up to ``i + Nk - Nq``). ``cross``: every query is real
    and ``mask`` covers the keys only (cross-attention).
    """
    backend = resolve_backend(backend, q.device)
    q, k, v = _one_dtype(q, k, v)
    if causal or cross or q.shape[1] != k.shape[1]:
        return _attention_general(q, k, v, mask, backend, causal)
    if backend == "xformers":
        from xformers.ops import fmha

        if mask is None:
            return fmha.memory_efficient_attention(q, k, v)
        seqlens = mask.sum(dim=1).tolist()
        packed = varlen_attention(q[mask], k[mask], v[mask], seqlens, backend="xformers")
        out = q.new_zeros(q.shape)
        out[mask] = packed
        return out
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


def _attention_general(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, backend: str, causal: bool
) -> torch.Tensor:
    """Causal and/or cross-length attention (the text decoder and the attentional pooler)."""
    nq, nk = q.shape[1], k.shape[1]
    if backend == "xformers":
        from xformers.ops import fmha

        if causal and mask is not None:
            raise ValueError("xformers attention: causal with a key padding mask is not supported; "
                             "right-padded causal text needs no key mask")
        if causal:
            bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if nq > 1 else None
            return fmha.memory_efficient_attention(q, k, v, attn_bias=bias)
        if mask is None:
            return fmha.memory_efficient_attention(q, k, v)
        # Every query row is real; pack the real keys of each sample.
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens([nq] * q.shape[0], mask.sum(dim=1).tolist(),
                                                            device=q.device)
        out = fmha.memory_efficient_attention(q.reshape(1, -1, *q.shape[2:]), k[mask][None], v[mask][None],
                                              attn_bias=bias)
        return out.reshape(q.shape)
    allowed = None if mask is None else mask[:, None, None, :]
    if causal:
        tri = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        allowed = tri if allowed is None else allowed & tri
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
    return out.transpose(1, 2)
