"""Pure torch: tile encoders, MIL pooling, omics/clinical encoders, fusion, survival heads and losses.

No file I/O beyond loading weights an encoder is asked for, no Lightning, no Flower.
"""

from models.encoders import TileEncoder, build_encoder, list_encoders
from models.losses import cox_loss
from models.mil import GatedAttentionMIL
from models.survival import MultimodalSurvival, SurvivalOutput, build_model

__all__ = [
    "GatedAttentionMIL",
    "MultimodalSurvival",
    "SurvivalOutput",
    "TileEncoder",
    "build_encoder",
    "build_model",
    "cox_loss",
    "list_encoders",
]
