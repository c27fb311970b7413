"""The one prediction loop: a trained network over chosen patients, returned as a typed :class:`Prediction`.

Every stage, site and script that needs risk scores, tile attention or discrete-time curves calls
:func:`predict` (eval mode, no autograd, batches of 32 patients in ``idx`` order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.survival import MultimodalSurvival
from pipeline.training.data import CohortData, make_loader, model_inputs

PREDICT_BATCH = 32


@dataclass(frozen=True)
class Prediction:
    """What the model predicts for ``P`` patients, in the order they were asked for.

    Attributes:
        log_hz: ``[P]`` float32, risk score (higher = higher risk).
        attn: per patient, its unpadded tile attention ``[N_i]`` (only when asked and the model pools tiles).
        hazards: ``[P, K]`` discrete-time bin hazards; survival ``[P, K]`` is ``S`` at the end of each bin
            (``cumprod(1 - hazards)``); bin_edges ``[K + 1]`` (bin ``k`` covers ``(e_k, e_{k+1}]``). These
            three are None for a Cox model (its curves need a Breslow baseline fitted on training patients).
    """

    log_hz: np.ndarray
    attn: list[np.ndarray] | None = None
    hazards: np.ndarray | None = None
    survival: np.ndarray | None = None
    bin_edges: np.ndarray | None = None


@torch.inference_mode()
def predict(model: MultimodalSurvival, data: CohortData, idx: np.ndarray, attention: bool = False) -> Prediction:
    """Predict for the patients ``idx`` (cohort indices); ``attention``: also return each one's tile attention."""
    model.eval()
    lh, hz, sv, attn = [], [], [], []
    for batch in make_loader(data, idx, PREDICT_BATCH, train=False):
        o = model(**model_inputs(batch))
        lh.append(o.log_hz.float().cpu().numpy())
        if o.hazards is not None and o.survival is not None:
            hz.append(o.hazards.float().cpu().numpy())
            sv.append(o.survival.float().cpu().numpy())
        if attention and o.attn is not None:
            for a, m in zip(o.attn, batch["mask"], strict=True):
                attn.append(a[m].cpu().numpy())
    k = model.n_bins
    return Prediction(
        log_hz=np.concatenate(lh) if lh else np.zeros(0),
        attn=attn if attention else None,
        hazards=(np.concatenate(hz) if hz else np.zeros((0, k))) if k else None,
        survival=(np.concatenate(sv) if sv else np.zeros((0, k))) if k else None,
        bin_edges=model.get_buffer("bin_edges").cpu().numpy().copy() if k else None,
    )
