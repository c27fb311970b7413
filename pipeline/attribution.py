"""Biomarker attributions: which tiles (attention) and which genes (integrated gradients) drive risk."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.survival import MultimodalSurvival
from pipeline.data import CohortData, make_loader, model_inputs

log = logging.getLogger(__name__)


def tile_attention(data: CohortData, idx: np.ndarray, attn: list[np.ndarray]) -> pd.DataFrame:
    """One row per tile: patient_id, slide_id, x, y (level 0), attn, and attn x n_tiles (1 = uniform).

    Args:
        idx: the patients, in the order of ``attn``.
        attn: each patient's unpadded tile attention, as returned by ``predict_log_hz(..., with_attention=True)``.
    """
    rows = []
    for i, a in zip(idx, attn, strict=True):
        tiles = data.tiles[i]  # type: ignore[index]
        assert len(tiles) == len(a), "attention and tile list out of step"
        for (sid, x, y), w in zip(tiles, a, strict=True):
            rows.append((data.patient_ids[i], sid, x, y, float(w), float(w) * len(a)))
    return pd.DataFrame(rows, columns=["patient_id", "slide_id", "x", "y", "attn", "attn_rel"])


def attention_heatmap(tiles: pd.DataFrame, features_dir: Path, slide_id: str, out_png: Path) -> None:
    """Overlay one slide's tile attention on its thumbnail (tissue tiles only), with a colour bar."""
    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    t = tiles[tiles.slide_id == slide_id]
    with h5py.File(Path(features_dir) / f"{slide_id}.h5", "r") as f:
        w0, size0 = int(f.attrs["width0"]), int(f.attrs["size0"])
    thumb = Image.open(Path(features_dir) / f"{slide_id}.thumb.jpg")
    scale = thumb.size[0] / w0
    grid = np.full((thumb.size[1], thumb.size[0]), np.nan)
    for x, y, a in zip(t.x, t.y, t.attn_rel, strict=True):
        x0, y0 = int(x * scale), int(y * scale)
        grid[y0 : y0 + int(np.ceil(size0 * scale)), x0 : x0 + int(np.ceil(size0 * scale))] = a
    fig, ax = plt.subplots(figsize=(6, 6 * thumb.size[1] / thumb.size[0] + 0.3), dpi=100)
    ax.imshow(thumb)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="inferno", alpha=0.55)
    fig.colorbar(im, ax=ax, fraction=0.035, label="attention x tiles (1 = uniform)")
    ax.set_axis_off()
    ax.set_title(slide_id, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def gene_integrated_gradients(
    model: MultimodalSurvival, data: CohortData, idx: np.ndarray, n_steps: int = 32
) -> np.ndarray:
    """Integrated gradients of ``log_hz`` w.r.t. each patient's omics (captum), ``[len(idx), G]``.

    The baseline is the training-mean expression (zero after standardisation); other modalities are
    held at the patient's own values. Patients without omics get zero attribution.
    """
    from captum.attr import IntegratedGradients

    assert data.omics is not None, "the cohort has no omics"
    model.eval()
    out = []
    for batch in make_loader(data, idx, 16, train=False):
        inputs = model_inputs(batch)
        others = [k for k in inputs if k != "omics"]

        def f(omics: torch.Tensor, *rest: torch.Tensor, _keys: list[str] = others) -> torch.Tensor:
            return model(omics=omics, **dict(zip(_keys, rest, strict=True))).log_hz

        # captum repeats the additional inputs along the batch for its interpolation steps
        attr = IntegratedGradients(f).attribute(
            inputs["omics"],
            baselines=torch.zeros_like(inputs["omics"]),
            additional_forward_args=tuple(inputs[k] for k in others),
            n_steps=n_steps,
            internal_batch_size=16 * n_steps,
        )
        attr = attr * inputs["omics_mask"].unsqueeze(1).float()
        out.append(attr.detach().numpy())
    return np.concatenate(out)


def rank_genes(attr: np.ndarray, omics: np.ndarray, present: np.ndarray, genes: list[str]) -> pd.DataFrame:
    """Cohort-level gene ranking by mean |IG|, with direction from the Spearman correlation between a
    gene's expression and its attribution (positive: higher expression -> higher risk)."""
    from scipy.stats import spearmanr

    a, x = attr[present], omics[present]
    mean_abs = np.abs(a).mean(axis=0)
    rho = np.array([spearmanr(x[:, j], a[:, j]).statistic if x[:, j].std() > 0 else 0.0 for j in range(len(genes))])
    rho = np.nan_to_num(rho)
    df = pd.DataFrame(
        {
            "gene": genes,
            "mean_abs_ig": mean_abs,
            "mean_ig": a.mean(axis=0),
            "direction_rho": rho,
            "direction": np.where(rho >= 0, "higher expression -> higher risk", "higher expression -> lower risk"),
        }
    )
    df = df.sort_values("mean_abs_ig", ascending=False, kind="stable").reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


def write_gene_attributions(path: Path, attr: np.ndarray, ids: list[str], genes: list[str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id"] + genes)
        for pid, row in zip(ids, attr, strict=True):
            w.writerow([pid] + [f"{v:.6g}" for v in row])
