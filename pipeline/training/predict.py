"""TODO training.predict."""

from __future__ import annotations

import numpy as np
import torch

from models.survival import MultimodalSurvival
from pipeline.training.data import CohortData, make_loader, model_inputs


@torch.inference_mode()
def predict_log_hz(
    model: MultimodalSurvival, data: CohortData, idx: np.ndarray, with_attention: bool = False
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """``log_hz [len(idx)]`` in ``idx`` order, and each patient's tile attention (unpadded) if asked."""
    model.eval()
    out, attn = [], []
    for batch in make_loader(data, idx, 32, train=False):
        o = model(**model_inputs(batch))
        out.append(o.log_hz.float().cpu().numpy())
        if with_attention and o.attn is not None:
            for a, m in zip(o.attn, batch["mask"], strict=True):
                attn.append(a[m].cpu().numpy())
    return (np.concatenate(out) if out else np.zeros(0)), (attn if with_attention else None)


@torch.inference_mode()
def predict_outputs(model: MultimodalSurvival, data: CohortData, idx: np.ndarray) -> dict[str, np.ndarray | None]:
    """Everything the model predicts for the patients ``idx`` (in ``idx`` order).

    Returns:
        ``log_hz [P]`` (risk score, higher = higher risk), and for a discrete-time model ``hazards [P, K]``,
        ``survival [P, K]`` (``S`` at the end of each bin, ``cumprod(1 - hazards)``) and ``bin_edges [K + 1]``
        (bin ``k`` covers ``(e_k, e_{k+1}]``, in the cohort's time unit); these three are None for a Cox
        model (whose survival curves need a Breslow baseline fitted on the training patients).
    """
    model.eval()
    lh, hz, sv = [], [], []
    for batch in make_loader(data, idx, 32, train=False):
        o = model(**model_inputs(batch))
        lh.append(o.log_hz.float().cpu().numpy())
        if o.hazards is not None and o.survival is not None:
            hz.append(o.hazards.float().cpu().numpy())
            sv.append(o.survival.float().cpu().numpy())
    k = model.n_bins
    return {
        "log_hz": np.concatenate(lh) if lh else np.zeros(0),
        "hazards": (np.concatenate(hz) if hz else np.zeros((0, k))) if k else None,
        "survival": (np.concatenate(sv) if sv else np.zeros((0, k))) if k else None,
        "bin_edges": model.get_buffer("bin_edges").cpu().numpy().copy() if k else None,
    }


def predict_arrays(model, data: CohortData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``log_hz [len(idx)]`` and, for discrete-time heads, ``hazards [len(idx), K]`` (else None)."""
    import torch

    from pipeline.training.data import make_loader, model_inputs

    model.eval()
    lh, hz = [], []
    with torch.inference_mode():
        for batch in make_loader(data, idx, 32, train=False):
            o = model(**model_inputs(batch))
            lh.append(o.log_hz.float().cpu().numpy())
            if getattr(o, "hazards", None) is not None:
                hz.append(o.hazards.float().cpu().numpy())
    return (np.concatenate(lh) if lh else np.zeros(0)), (np.concatenate(hz) if hz else None)
