"""Pure torch: tile encoders, MIL pooling, omics/clinical encoders, fusion, survival heads and losses.

No file I/O beyond loading weights an encoder is asked for, no Lightning, no Flower.
"""

from models.encoders import TileEncoder, build_encoder, list_encoders
from models.factory import MODEL_FAMILIES, SurvivalModel, build_model
from models.fusion import FUSIONS, build_fusion
from models.linear import LinearSurvival
from models.losses import (
    CoxMemoryBank,
    cox_loss,
    discrete_time_edges,
    nll_loss,
    survival_from_logits,
    time_to_bin,
)
from models.mil import MIL_POOLINGS, GatedAttentionMIL, TransMIL, build_mil
from models.survival import MultimodalSurvival, SurvivalOutput

__all__ = [
    "FUSIONS",
    "MIL_POOLINGS",
    "MODEL_FAMILIES",
    "CoxMemoryBank",
    "GatedAttentionMIL",
    "LinearSurvival",
    "MultimodalSurvival",
    "SurvivalModel",
    "SurvivalOutput",
    "TileEncoder",
    "TransMIL",
    "build_encoder",
    "build_fusion",
    "build_mil",
    "build_model",
    "cox_loss",
    "discrete_time_edges",
    "list_encoders",
    "nll_loss",
    "survival_from_logits",
    "time_to_bin",
]
