"""The IMP encoder: ``build_model(cfg)`` plus presets and safetensors I/O."""

from imp_platform.model.embed import MODALITIES
from imp_platform.model.imp import EncoderOutput, IMPModel, build_model

__all__ = ["MODALITIES", "EncoderOutput", "IMPModel", "build_model"]
