"""Biomarker attributions: which tiles and which genes drive risk, and whether the attributions are faithful.

Tiles: attention per tile (the MIL weights) and integrated gradients (captum) of ``log_hz`` with respect
to each tile's features, summed over the feature dimension into one signed score per tile (baseline:
the training patients' mean tile). Both are mapped back to level-0 coordinates, drawn over the slide
thumbnail, written as a QuPath GeoJSON, and the top/bottom tiles are cut from the slide at full
resolution. Genes: integrated gradients per patient with the training-mean expression as baseline,
ranked with a direction (:mod:`pipeline.outputs.writers` puts them in an AnnData, layer ``ig``).
Where the model's log hazard has a linear slide term added as is (the linear family, or a ``model.skip=fitted``
network's frozen offset), each tile's exact share of that term (``linear_share``, :func:`tile_linear_shares`) is
written beside them, and the attention's role is named (:func:`attention_role`): in those models attention weighs
the tiles for the residual branch only (or is uniform), so the tile heatmap to read first is IG's.
Faithfulness: deletion curves (remove the top-attributed tiles or reset the top genes to baseline,
versus random ones) measure how much the risk moves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from models.linear import LinearSurvival
from models.survival import MultimodalSurvival
from pipeline.training.data import CohortData, make_loader, model_inputs


def tile_attention(data: CohortData, idx: np.ndarray, attn: list[np.ndarray]) -> pd.DataFrame:
    """One row per tile: patient_id, slide_id, x, y (level 0), attn, and attn x n_tiles (1 = uniform).

    Args:
        idx: the patients, in the order of ``attn``.
        attn: each patient's unpadded tile attention, as returned by ``predict(..., attention=True).attn``.
    """
    rows = []
    for i, a in zip(idx, attn, strict=True):
        tiles = data.tiles[i]  # type: ignore[index]
        assert len(tiles) == len(a), "attention and tile list out of step"
        for (sid, x, y), w in zip(tiles, a, strict=True):
            rows.append((data.patient_ids[i], sid, x, y, float(w), float(w) * len(a)))
    return pd.DataFrame(rows, columns=["patient_id", "slide_id", "x", "y", "attn", "attn_rel"])


def tile_integrated_gradients(
    model: MultimodalSurvival, data: CohortData, idx: np.ndarray, baseline: np.ndarray, n_steps: int = 32
) -> list[np.ndarray]:
    """Per patient, integrated gradients of ``log_hz`` w.r.t. ``features [N_i, D]`` summed over ``D``: a signed
    score per tile (``[N_i]``; positive raises risk). Their sum over tiles is ``log_hz(x) - log_hz(baseline)``
    (IG completeness) where every tile is replaced by ``baseline [D]``; other modalities stay the patient's.
    """
    from captum.attr import IntegratedGradients

    model.eval()
    base = torch.as_tensor(np.asarray(baseline, np.float32))
    out = []
    for batch in make_loader(data, idx, 1, train=False):  # one bag at a time: no padding
        inputs = model_inputs(batch)
        if not bool(inputs["mask"].any()):
            out.append(np.zeros(0, np.float32))
            continue
        others = [k for k in inputs if k != "features"]

        def f(features: torch.Tensor, *rest: torch.Tensor, _keys: list[str] = others) -> torch.Tensor:
            return model(features=features, **dict(zip(_keys, rest, strict=True))).log_hz

        x = inputs["features"]  # (1, N, D)
        attr = IntegratedGradients(f).attribute(
            x,
            baselines=base.expand_as(x).contiguous(),
            additional_forward_args=tuple(inputs[k] for k in others),
            n_steps=n_steps,
            internal_batch_size=max(1, min(n_steps, int(2e7 // max(1, x.numel())))),
        )
        out.append(attr[0].sum(dim=-1).detach().numpy())
    return out


def attention_role(model: nn.Module) -> str:
    """What the tile attention of ``model`` weighs: ``pooling`` (the whole slide pathway: a network without a linear
    part), ``residual`` (the gated residual branch only, beside a linear term: ``model.skip`` linear or fitted) or
    ``uniform`` (the linear family: the mean's weights)."""
    if isinstance(model, LinearSurvival):
        return "uniform"
    return "residual" if getattr(model, "residual_gate", None) is not None else "pooling"


def linear_slide_term(model: nn.Module) -> LinearSurvival | None:
    """The linear model whose slide term enters ``model``'s log hazard as is: the linear family's model itself or a
    ``model.skip=fitted`` network's frozen offset (Cox heads, with a slide term); None for any other model."""
    lin = model if isinstance(model, LinearSurvival) else getattr(model, "offset", None)
    if not isinstance(lin, LinearSurvival) or lin.slide_linear is None or lin.bin_bias is not None:
        return None
    return lin


@torch.inference_mode()
def tile_linear_shares(lin: LinearSurvival, data: CohortData, idx: np.ndarray) -> list[np.ndarray]:
    """Per patient of ``idx``, each tile's exact share ``[N_i]`` of the linear slide term of ``lin`` (log hazard;
    the shares of a patient's tiles sum to its slide term: :meth:`models.linear.LinearSurvival.tile_shares`)."""
    assert data.bags is not None
    lin.eval()
    return [lin.tile_shares(torch.as_tensor(np.asarray(data.bags[i], np.float32))).numpy() for i in idx]


def mean_tile_feature(data: CohortData, idx: np.ndarray) -> np.ndarray:
    """The mean tile feature ``[D]`` over the given patients' tiles (the IG baseline for tiles)."""
    assert data.bags is not None
    bags = [data.bags[i] for i in idx if len(data.bags[i])]
    if not bags:
        return np.zeros(data.feature_dim, np.float32)
    return np.concatenate(bags).mean(axis=0).astype(np.float32)


def read_tiles(slide_path: Path, xy: list[tuple[int, int]], size0: int, max_px: int = 256) -> list:
    """Tiles cut from the slide at full resolution (level 0, ``size0`` px), shrunk to ``max_px`` for display."""
    from PIL import Image

    from pipeline.slides.reader import open_slide

    slide = open_slide(slide_path)
    try:
        out = []
        for x, y in xy:
            img = slide.read_region((int(x), int(y)), 0, (size0, size0)).convert("RGB")
            if size0 > max_px:
                img = img.resize((max_px, max_px), Image.Resampling.LANCZOS)
            out.append(img)
        return out
    finally:
        slide.close()


def gene_integrated_gradients(
    model: MultimodalSurvival, data: CohortData, idx: np.ndarray, n_steps: int = 32
) -> np.ndarray:  # [len(idx), G]
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


def _fractions(steps: int) -> np.ndarray:
    return np.linspace(0.0, 0.9, steps)


@torch.inference_mode()
def tile_deletion_curves(
    model: MultimodalSurvival,
    data: CohortData,
    idx: np.ndarray,
    scores: dict[str, list[np.ndarray]],
    steps: int = 10,
    n_random: int = 5,
    seed: int = 0,
) -> dict:
    """Deletion curves for tiles: remove (mask) the top fraction of each patient's tiles by each score, or
    a random fraction, and record ``|log_hz - log_hz(all tiles)|`` averaged over patients.

    Args:
        scores: name -> per-patient tile scores aligned with ``idx`` (removed in descending order).

    Returns ``{"fraction": [...], "<name>": [...], "random": [...], "auc": {...}, "gap": {name: auc - random}}``.
    """
    rng = np.random.default_rng(seed)
    fr = _fractions(steps)
    curves: dict[str, list[np.ndarray]] = {k: [] for k in [*scores, "random"]}
    model.eval()
    for j, batch in enumerate(make_loader(data, idx, 1, train=False)):
        inputs = model_inputs(batch)
        n = int(inputs["mask"].sum())
        if n < 2:
            continue
        ref = float(model(**inputs).log_hz[0])
        orders = {k: np.argsort(-np.asarray(v[j]), kind="stable") for k, v in scores.items()}
        orders.update({f"random{r}": rng.permutation(n) for r in range(n_random)})
        rows = []
        for order in orders.values():
            for f in fr:
                m = np.ones(n, bool)
                m[order[: min(n - 1, int(round(f * n)))]] = False  # keep at least one tile
                rows.append(m)
        masks = torch.from_numpy(np.stack(rows))  # (R, N)
        rep = {k: v.expand(len(rows), *v.shape[1:]) for k, v in inputs.items() if k != "mask"}
        lh = model(**rep, mask=masks).log_hz.numpy().reshape(len(orders), len(fr))
        delta = np.abs(lh - ref)
        for k, d in zip(orders, delta, strict=True):
            curves["random" if k.startswith("random") else k].append(d)
    return _summarise(fr, curves, n_random)


@torch.inference_mode()
def gene_deletion_curves(
    model: MultimodalSurvival,
    data: CohortData,
    idx: np.ndarray,
    attr: np.ndarray,
    steps: int = 10,
    n_random: int = 5,
    seed: int = 0,
) -> dict:
    """Deletion curves for genes: reset each patient's top-|IG| genes (``attr [len(idx), G]``) to the
    baseline (training mean = 0 after standardisation), or random genes, and record ``|delta log_hz|``.
    The counts reset are 0 and a geometric grid from 1 to ``min(G, 50)`` genes (attributions matter
    for the first few genes; resetting most of a panel moves any model); ``fraction`` is of the panel."""
    rng = np.random.default_rng(seed)
    assert data.omics is not None
    n_genes = data.omics.shape[1]
    counts = np.unique(np.r_[0, np.round(np.geomspace(1, min(n_genes, 50), steps - 1))].astype(int))
    fr = counts / n_genes
    curves: dict[str, list[np.ndarray]] = {"ig": [], "random": []}
    model.eval()
    assert data.omics is not None and data.omics_present is not None
    for j, batch in enumerate(make_loader(data, idx, 1, train=False)):
        if not data.omics_present[idx[j]]:
            continue
        inputs = model_inputs(batch)
        g = n_genes
        ref = float(model(**inputs).log_hz[0])
        orders = {"ig": np.argsort(-np.abs(attr[j]), kind="stable")}
        orders.update({f"random{r}": rng.permutation(g) for r in range(n_random)})
        rows = []
        for order in orders.values():
            for c in counts:
                x = inputs["omics"][0].clone()
                x[torch.from_numpy(order[:c].copy())] = 0.0
                rows.append(x)
        om = torch.stack(rows)  # (R, G)
        rep = {k: v.expand(len(rows), *v.shape[1:]) for k, v in inputs.items() if k != "omics"}
        lh = model(**rep, omics=om).log_hz.numpy().reshape(len(orders), len(fr))
        for k, d in zip(orders, np.abs(lh - ref), strict=True):
            curves["random" if k.startswith("random") else k].append(d)
    out = _summarise(fr, curves, n_random)
    out["genes_reset"] = counts.tolist()
    return out


def _summarise(fr: np.ndarray, curves: dict[str, list[np.ndarray]], n_random: int) -> dict:
    out: dict = {"fraction": fr.tolist(), "patients": len(curves.get("random", [])) // max(1, n_random)}
    if not curves.get("random"):
        out["note"] = "no patient with at least two tiles / with omics"
        return out
    out["auc"], out["gap"] = {}, {}
    for k, v in curves.items():
        mean = np.mean(v, axis=0)
        out[k] = mean.tolist()
        out["auc"][k] = float(mean[1:].mean())  # mean |delta log_hz| over the curve's points (after the first, 0)
    for k in curves:
        if k != "random":
            out["gap"][k] = out["auc"][k] - out["auc"]["random"]
    return out
