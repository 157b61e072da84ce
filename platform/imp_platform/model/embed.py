"""Per-modality embedders: tubelets (video, images as short clips), log-mel patches, raw-waveform
patches and text tokens; factorized positions; a modality-type embedding; DropToken.

Positions are three learned tables (temporal, vertical, horizontal) read with linear
interpolation at *normalized* token coordinates (cell centres in [0, 1]), so every bucket
resolution, frame count or clip length uses the same weights. Text keeps absolute positions.
Inputs whose sizes are not multiples of the patch are cropped to the largest multiple.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from imp_platform.config.model import ModelConfig
from imp_platform.data import modalities as registry


@dataclass
class Embedded:
    tokens: torch.Tensor  # [B, N, d]
    mask: torch.Tensor | None  # [B, N] True = real token; None = all real


def grid_shape(cfg: ModelConfig, modality: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """Token grid (t, h, w) for one sample of per-sample ``shape`` (no batch dimension)."""
    spec = registry.modality(modality)
    grid = spec.grid(shape, spec.model_patch(cfg))
    if min(grid) < 1:
        raise ValueError(f"{modality} input of shape {tuple(shape)} is smaller than one patch")
    return grid


def normalized_coords(grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Cell-centre coordinates in [0, 1] for a (t, h, w) grid, row-major: [t*h*w, 3]."""
    axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class FactorizedPositions(nn.Module):
    """Sum of temporal, vertical and horizontal tables, each interpolated at a coordinate in [0, 1]."""

    def __init__(self, sizes: tuple[int, int, int], dim: int) -> None:
        super().__init__()
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(n, dim) * 0.02) for n in sizes])

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords`` [..., 3] -> [..., dim]."""
        out = 0
        for axis, table in enumerate(self.tables):
            pos = coords[..., axis].clamp(0, 1) * (table.shape[0] - 1)
            lo = pos.floor().long()
            hi = (lo + 1).clamp_max(table.shape[0] - 1)
            frac = (pos - lo).unsqueeze(-1).to(table.dtype)
            out = out + table[lo] * (1 - frac) + table[hi] * frac
        return out


def kept_tokens(n: int, rate: float) -> int:
    """How many of ``n`` tokens DropToken keeps at ``rate``: shared by the encoder and the budget."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {rate}")
    return n if rate == 0.0 else min(n, max(1, round(n * (1.0 - rate))))


def drop_tokens(
    tokens: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor | None, rate: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DropToken: keep a random ``1 - rate`` share of each sample's tokens with their coordinates.

    Every sample keeps the same count (the batch stays rectangular); kept tokens stay in order.
    """
    batch, n = tokens.shape[:2]
    keep = kept_tokens(n, rate)
    if keep >= n:
        return tokens, coords, mask
    scores = torch.rand(batch, n, device=tokens.device)
    if mask is not None:  # prefer real tokens over padding
        scores = scores + (~mask).float()
    idx = torch.sort(torch.topk(scores, keep, dim=1, largest=False).indices, dim=1).values
    take = lambda t: torch.gather(t, 1, idx.view(batch, keep, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))  # noqa: E731
    return take(tokens), take(coords), None if mask is None else take(mask)


class ConvTubelets(nn.Module):
    """Convolutional tubelet stem: per frame, log2(patch) stride-2 3x3 convs down to the patch grid,
    then one linear layer over the ``t`` frames of each tubelet.

    Why: a linear patch embedding learns translation-invariant features only from a lot of
    data; small models on small data learn far faster with a few early convolutions
    (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"). Token grid,
    order and count are those of the linear tubelets, so everything downstream is unchanged.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        pt, ph, _ = cfg.video_patch
        n = ph.bit_length() - 1  # ConfigModel checks ph == pw, a power of two >= 2
        widths = [3] + [max(8, cfg.d_model >> (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1), nn.GroupNorm(1, widths[i + 1]), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.frames = pt
        self.proj = nn.Linear(pt * widths[-1], cfg.d_model, bias=cfg.bias)

    def forward(self, clips: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``clips`` [B, T, H, W, 3] in [-1, 1], cropped to whole tubelets -> tokens [B, t*h*w, d]."""
        batch, frames, height, width, _ = clips.shape
        weight = self.convs[0].weight
        x = clips.to(weight.dtype).reshape(batch * frames, height, width, 3).permute(0, 3, 1, 2)
        x = self.convs(x)  # [B*T, C, h, w]
        nt, nh, nw = grid
        x = x.reshape(batch, nt, self.frames, -1, nh, nw).permute(0, 1, 4, 5, 2, 3)
        return self.proj(x.reshape(batch, nt * nh * nw, -1))


def _tubelet_stem(cfg: ModelConfig, spec: registry.Modality) -> nn.Module:
    pt, ph, pw = cfg.video_patch
    return ConvTubelets(cfg) if cfg.vision_stem == "conv" else nn.Linear(pt * ph * pw * 3, cfg.d_model, bias=cfg.bias)


def _patch_stem(cfg: ModelConfig, spec: registry.Modality) -> nn.Module:
    return nn.Linear(math.prod(spec.model_patch(cfg)), cfg.d_model, bias=cfg.bias)


def _token_stem(cfg: ModelConfig, spec: registry.Modality) -> nn.Module:
    table = nn.Embedding(cfg.vocab_size, cfg.d_model)
    nn.init.normal_(table.weight, std=0.02)
    return table


# Input layer factories named by ``Modality.stem``: tubelets take pixel clips (an image as a clip
# of video_patch[0] frames), patches cut float features into flat patches, tokens look ids up.
STEMS = {"tubelets": _tubelet_stem, "patches": _patch_stem, "tokens": _token_stem}


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """[B, d_1..d_k, *rest] -> [B, prod(n_i), prod(p_i) * prod(rest)], n_i = d_i // p_i whole patches, row-major."""
    batch, k = x.shape[0], len(patch)
    counts = [x.shape[1 + i] // p for i, p in enumerate(patch)]
    x = x[(slice(None), *(slice(0, n * p) for n, p in zip(counts, patch, strict=True)))]
    x = x.reshape(batch, *(v for n, p in zip(counts, patch, strict=True) for v in (n, p)), *x.shape[1 + k:])
    order = [0, *range(1, 2 * k, 2), *range(2, 2 * k + 1, 2), *range(2 * k + 1, x.dim())]
    return x.permute(order).reshape(batch, math.prod(counts), -1)


class Embedders(nn.Module):
    """All modality-specific input layers (one per registry ``embedder`` name, built in registry
    order so parameter names and init stay put); outputs tokens with position and type added."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.stem_names = tuple(dict.fromkeys(spec.embedder for spec in registry.MODALITIES.values()))
        for name in self.stem_names:
            spec = next(m for m in registry.MODALITIES.values() if m.embedder == name)
            self.add_module(name, STEMS[spec.stem](cfg, spec))
        self.positions = FactorizedPositions(cfg.max_positions, d)
        self.text_positions = nn.Parameter(torch.randn(cfg.max_text_len, d) * 0.02)
        types = max(spec.type_id for spec in registry.MODALITIES.values()) + 1
        self.types = nn.Parameter(torch.randn(types, d) * 0.02)

    def stems(self) -> list[nn.Module]:
        """The per-modality input layers (FSDP gathers each on its own)."""
        return [getattr(self, name) for name in self.stem_names]

    def forward(
        self, modality: str, inputs: torch.Tensor, mask: torch.Tensor | None = None, drop_rate: float = 0.0
    ) -> Embedded:
        spec = registry.modality(modality)
        if spec.stem == "tokens":
            tokens, coords = self._text(inputs)
        else:
            self._check_input(spec, inputs)
            layer = getattr(self, spec.embedder)
            if spec.stem == "tubelets":
                clips, grid = self._clips(spec, inputs)
                tokens = layer(clips, grid) if isinstance(layer, ConvTubelets) else layer(
                    patchify(clips, self.cfg.video_patch).to(layer.weight.dtype))
            else:
                grid = grid_shape(self.cfg, modality, inputs.shape[1:])
                tokens = layer(patchify(inputs.float(), spec.model_patch(self.cfg)).to(layer.weight.dtype))
            coords = normalized_coords(grid, inputs.device).expand(tokens.shape[0], -1, -1)
            mask = None
        tokens, coords, mask = drop_tokens(tokens, coords, mask, drop_rate)
        if spec.stem == "tokens":
            tokens = tokens + self.text_positions[coords[..., 0].long()]
        else:
            tokens = tokens + self.positions(coords).to(tokens.dtype)
        return Embedded(tokens + self.types[spec.type_id], mask)

    def _check_input(self, spec: registry.Modality, x: torch.Tensor) -> None:
        expected = spec.input_shape(self.cfg)
        if x.dim() != len(expected) + 1 or any(e is not None and x.shape[1 + i] != e for i, e in enumerate(expected)):
            dims = ", ".join("*" if e is None else str(e) for e in expected)
            raise ValueError(f"{spec.name} input must be [B, {dims}], got {tuple(x.shape)}")

    def _text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.dim() != 2:
            raise ValueError(f"text ids must be [B, L], got shape {tuple(ids.shape)}")
        length = ids.shape[1]
        if length > self.cfg.max_text_len:
            raise ValueError(f"text length {length} exceeds max_text_len ({self.cfg.max_text_len})")
        # Text coordinates are absolute positions (in axis 0), kept through DropToken.
        coords = torch.zeros(ids.shape[0], length, 3, device=ids.device)
        coords[..., 0] = torch.arange(length, device=ids.device, dtype=torch.float32)
        return self.text(ids.long()), coords

    def _clips(self, spec: registry.Modality, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Pixels in [0, 1] -> [B, T, H, W, 3] in [-1, 1] cropped to whole tubelets; a frameless input
        (no temporal grid axis: an image) becomes a clip of ``video_patch[0]`` copies of itself."""
        nt, nh, nw = grid_shape(self.cfg, spec.name, x.shape[1:])
        if 0 not in spec.grid_axes:
            x = x.unsqueeze(1).expand(-1, self.cfg.video_patch[0], *([-1] * (x.dim() - 1)))
        pt, ph, pw = self.cfg.video_patch
        return x[:, : nt * pt, : nh * ph, : nw * pw].float() * 2.0 - 1.0, (nt, nh, nw)
