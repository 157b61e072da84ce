"""Training objectives as plain functions: NCE, MIL-NCE, cross-entropy, MoE aux losses, cross-worker gathering."""

from imp_platform.model.moe import limoe_global_entropy, limoe_local_entropy, load_balance_loss, router_z_loss
from imp_platform.objectives.caption import caption_loss
from imp_platform.objectives.classification import classification_loss
from imp_platform.objectives.contrastive import mil_nce_loss, nce_loss
from imp_platform.objectives.distill import distill_loss, feature_distance, kd_loss
from imp_platform.objectives.distributed import gather_with_grad

__all__ = [
    "caption_loss",
    "classification_loss",
    "distill_loss",
    "feature_distance",
    "gather_with_grad",
    "kd_loss",
    "limoe_global_entropy",
    "limoe_local_entropy",
    "load_balance_loss",
    "mil_nce_loss",
    "nce_loss",
    "router_z_loss",
]
