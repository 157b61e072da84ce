"""Packed / masked attention against attention computed one sequence at a time."""

from __future__ import annotations

import pytest
import torch

from imp_platform.model.attention import attention, resolve_backend, varlen_attention

SEQLENS = [5, 1, 9, 3]
H, DH = 2, 8


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one sequence [L, H, D]."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / DH**0.5
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def packed(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(sum(SEQLENS), H, DH, device=device, dtype=dtype) for _ in range(3))


def per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bounds = torch.tensor([0, *SEQLENS]).cumsum(0).tolist()
    return torch.cat([naive(q[a:b], k[a:b], v[a:b]) for a, b in zip(bounds, bounds[1:])])


def padded(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter packed rows into [B, Lmax, H, D] plus the real-token mask."""
    mask = torch.zeros(len(SEQLENS), max(SEQLENS), dtype=torch.bool, device=q.device)
    for i, n in enumerate(SEQLENS):
        mask[i, :n] = True
    out = q.new_zeros(*mask.shape, H, DH)
    out[mask] = q
    return out, mask


def test_varlen_sdpa_matches_per_sequence() -> None:
    q, k, v = packed()
    torch.testing.assert_close(varlen_attention(q, k, v, SEQLENS, backend="sdpa"), per_sequence(q, k, v))


def test_masked_padded_sdpa_matches_per_sequence() -> None:
    q, k, v = packed()
    (qp, mask), (kp, _), (vp, _) = padded(q), padded(k), padded(v)
    out = attention(qp, kp, vp, mask=mask, backend="sdpa")
    torch.testing.assert_close(out[mask], per_sequence(q, k, v), atol=1e-5, rtol=1e-5)


def test_backend_resolution() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="xformers"):
        resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="one of"):
        resolve_backend("flash", torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_packed_matches_sdpa_on_cuda(dtype: torch.dtype) -> None:
    q, k, v = packed("cuda", dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    assert resolve_backend("auto", q.device) == "xformers"
    want = varlen_attention(q, k, v, SEQLENS, backend="sdpa")
    torch.testing.assert_close(varlen_attention(q, k, v, SEQLENS, backend="xformers"), want, **tol)
    (qp, mask), (kp, _), (vp, _) = padded(q), padded(k), padded(v)
    got = attention(qp, kp, vp, mask=mask, backend="xformers")
    torch.testing.assert_close(got[mask], want, **tol)
    torch.testing.assert_close(attention(qp, kp, vp, backend="xformers"), attention(qp, kp, vp, backend="sdpa"), **tol)
