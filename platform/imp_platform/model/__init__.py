"""The IMP encoder: ``build_model(cfg)``, presets with parameter counts, safetensors I/O.

Typical use::

    cfg = preset("tiny", moe=True, heads={"digits": 10})
    model = build_model(cfg)
    out = model.encode("video", clips, drop_rate=0.75)   # EncoderOutput
    z = model.project(out.pooled, "video", "text")        # [B, d_common]
"""

from imp_platform.model.imp import EncoderOutput, IMPModel, build_model
from imp_platform.model.io import load_pretrained, save_pretrained
from imp_platform.model.presets import PRESETS, count_params, preset

__all__ = [
    "PRESETS",
    "EncoderOutput",
    "IMPModel",
    "build_model",
    "count_params",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
