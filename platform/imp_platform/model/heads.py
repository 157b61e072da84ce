"""Output side: pooling, projections into the common space, temperatures, classifiers.

Projections and temperatures are keyed by modality *family* (vision = video or image,
audio = log-mel or waveform, text), so images and videos land in the same space.
With ``pair_mlp`` (IMP) each ordered (source -> target) family pair has its own MLP;
otherwise one linear projection per source family.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from imp_platform.config.model import ModelConfig
from imp_platform.data import modalities as registry


def family(modality: str) -> str:
    return registry.modality(modality).family


def pair_key(source: str, target: str) -> str:
    """Unordered family pair, e.g. ('text', 'video') -> 'text-vision' (temperatures are symmetric)."""
    return "-".join(sorted((family(source), family(target))))


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Average over real tokens."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class Heads(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, common, families = cfg.d_model, cfg.d_common, registry.families()
        if cfg.pair_mlp:
            self.projections = nn.ModuleDict(
                {
                    f"{s}_to_{t}": nn.Sequential(nn.Linear(d, d, bias=cfg.bias), nn.GELU(), nn.Linear(d, common, bias=cfg.bias))
                    for s, t in itertools.product(families, families)
                    if s != t
                }
            )
        else:
            self.projections = nn.ModuleDict({s: nn.Linear(d, common, bias=cfg.bias) for s in families})
        self.pair_mlp = cfg.pair_mlp
        pairs = ["-".join(p) for p in itertools.combinations_with_replacement(sorted(families), 2)]
        init = torch.tensor(cfg.log_temperature_init())
        self.log_temperatures = nn.ParameterDict({p: nn.Parameter(init.clone()) for p in pairs})
        self.classifiers = nn.ModuleDict({name: nn.Linear(d, n) for name, n in cfg.heads.items()})

    def project(self, pooled: torch.Tensor, source: str, target: str) -> torch.Tensor:
        s, t = family(source), family(target)
        if not self.pair_mlp:
            return self.projections[s](pooled)
        if s == t:
            raise ValueError(f"pair_mlp has no projection within one family ({source} -> {target})")
        return self.projections[f"{s}_to_{t}"](pooled)

    def log_temperature(self, source: str, target: str) -> torch.Tensor:
        return self.log_temperatures[pair_key(source, target)]

    def classify(self, pooled: torch.Tensor, head: str) -> torch.Tensor:
        if head not in self.classifiers:
            raise KeyError(f"no classification head {head!r}; configured: {sorted(self.classifiers)}")
        return self.classifiers[head](pooled)
