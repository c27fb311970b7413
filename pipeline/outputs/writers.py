"""TODO outputs.writers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd


def write_geojson(tiles: pd.DataFrame, size0: int, path: Path) -> None:
    """A QuPath-readable GeoJSON FeatureCollection: one square detection per tile in level-0 pixels,
    with the tile's scores as measurements."""
    import json

    meas = [c for c in ("attn", "attn_rel", "ig", "phenotype") if c in tiles.columns]
    feats = []
    for r in tiles.itertuples(index=False):
        x, y = int(r.x), int(r.y)
        ring = [[x, y], [x + size0, y], [x + size0, y + size0], [x, y + size0], [x, y]]
        m = {c: float(getattr(r, c)) for c in meas}
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "detection", "name": f"tile {x},{y}", "measurements": m},
            }
        )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    tmp.replace(path)


def write_gene_attributions(path: Path, attr: np.ndarray, ids: list[str], genes: list[str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id"] + genes)
        for pid, row in zip(ids, attr, strict=True):
            w.writerow([pid] + [f"{v:.6g}" for v in row])


def write_gene_h5ad(
    path: Path, attr: np.ndarray, omics: np.ndarray, obs: pd.DataFrame, ranked: pd.DataFrame, genes: list[str]
) -> None:
    """AnnData with patients as obs (``obs``: site, split, risk, ...), genes as var (rank, mean |IG|,
    direction); ``X`` the model's standardised expression, ``layers["ig"]`` the attributions ``[P, G]``."""
    import anndata as ad

    var = ranked.set_index("gene").loc[genes]
    a = ad.AnnData(
        X=np.asarray(omics, np.float32),
        obs=obs.set_index("patient_id"),
        var=var,
        layers={"ig": attr.astype(np.float32)},
    )
    a.obs_names, a.var_names = a.obs_names.astype(str), a.var_names.astype(str)
    a.uns["attribution"] = {
        "method": "integrated_gradients",
        "baseline": "training-mean expression",
        "target": "log_hz",
    }
    tmp = path.with_name(f".{path.name}.tmp.h5ad")
    a.write_h5ad(tmp)
    tmp.replace(path)


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    tmp.replace(path)


def risk_groups(log_hz: np.ndarray, cutpoints: dict, scheme: str) -> np.ndarray:
    """``low``/``high`` (median) or ``low``/``intermediate``/``high`` (tertiles), cut-points from training."""
    if scheme == "tertiles":
        lo, hi = cutpoints["tertiles"]
        return np.where(log_hz > hi, "high", np.where(log_hz > lo, "intermediate", "low"))
    if scheme != "median":
        raise ValueError(f"unknown risk_groups '{scheme}': valid names are ['median', 'tertiles']")
    return np.where(log_hz > cutpoints["median"], "high", "low")


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def _nan_to_none(o):
    """Standard JSON: NaN becomes null (the reason is in the neighbouring ``notes``)."""
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_nan_to_none(v) for v in o]
    if isinstance(o, float | np.floating) and not np.isfinite(o):
        return None
    return o
