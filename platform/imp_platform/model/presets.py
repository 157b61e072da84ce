"""Named model sizes (IMP-B/L and small ones for CPU) and parameter counts.

Parameters per token (PPT, as IMP reports) counts what one vision token passes through:
the tubelet embedder, positional tables, the shared encoder with only its *active* experts
(Expert Choice: capacity_factor experts on average; top-k: k), and the final norm. Text
embeddings, other modalities' embedders, projections and classifiers are in ``total`` only.
"""

from __future__ import annotations

from typing import Any

from torch.overrides import TorchFunctionMode

from imp_platform.config.model import ModelConfig, MoEConfig

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        d_model=96, depth=4, num_heads=4, mlp_dim=384, video_patch=(2, 8, 8), audio_patch=(16, 16),
        vocab_size=1024, max_text_len=64, max_positions=(8, 16, 16), d_common=128,
        vision_stem="conv",  # a linear stem barely learns digits in the demo's few hundred steps
    ),
    "small": dict(d_model=384, depth=12, num_heads=6, mlp_dim=1536, d_common=512),
    "base": dict(d_model=768, depth=12, num_heads=12, mlp_dim=3072, d_common=1024),
    "large": dict(d_model=1024, depth=24, num_heads=16, mlp_dim=4096, d_common=1024),
}
# IMP-MoE: 16 experts in the last 6 layers, QK-LayerNorm, Expert Choice, temperature init 1.0.
_MOE: dict[str, dict[str, Any]] = {
    "tiny": dict(num_experts=4, last_n=2),
    "small": dict(num_experts=16, last_n=6),
    "base": dict(num_experts=16, last_n=6),
    "large": dict(num_experts=16, last_n=6),
}
PRESETS = tuple(_SIZES)


def preset(name: str, moe: bool = False, **overrides: Any) -> ModelConfig:
    """The ``name`` preset, dense or MoE; ``overrides`` replace top-level fields."""
    if name not in _SIZES:
        raise ValueError(f"unknown model preset {name!r}; choose from {PRESETS}")
    fields: dict[str, Any] = dict(_SIZES[name], preset=f"{name}-moe" if moe else name)
    if moe:
        fields.update(moe=MoEConfig(**_MOE[name]), qk_norm=True, temperature_init=1.0)
    fields.update(overrides)
    return ModelConfig(**fields)


class _SkipInit(TorchFunctionMode):
    """Turns the in-place weight initializers into no-ops while a model is built only to be counted.

    Uninitialised ``torch.empty`` storage is never touched, so even large-MoE (1.1B) costs
    almost no memory or time; the meta device would do too, but pulls in slow Python
    decompositions on first use.
    """

    _SKIP = frozenset({"uniform_", "normal_", "kaiming_uniform_", "trunc_normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self._SKIP:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "per_token"} of the model ``cfg`` builds (see the module docstring)."""
    from imp_platform.model.imp import build_model

    with _SkipInit():
        model = build_model(cfg)
    active = cfg.moe.active_experts_per_token() / cfg.moe.num_experts if cfg.moe.enabled else 1.0
    total = per_token = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if name.startswith("encoder."):
            per_token += round(n * active) if name.endswith((".w1", ".w2")) else n
        elif name.startswith(("embed.vision.", "embed.positions.", "embed.types")):
            per_token += n
    return {"total": total, "per_token": per_token}
