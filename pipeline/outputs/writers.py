"""Writers of the attribution files QuPath, scanpy and spreadsheets read: GeoJSON tiles, per-gene IG CSV, AnnData.

Nothing here computes: the callers pass finished tables and arrays. Every file is written through
:mod:`pipeline.files`, so a reader never sees a half-written one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import atomic_path, write_text


def write_geojson(tiles: pd.DataFrame, size0: int, path: Path) -> None:
    """A QuPath-readable GeoJSON FeatureCollection: one square detection per tile in level-0 pixels,
    with the tile's scores as measurements."""
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
    write_text(path, json.dumps({"type": "FeatureCollection", "features": feats}))


def write_gene_attributions(path: Path, attr: np.ndarray, ids: list[str], genes: list[str]) -> None:
    """``gene_ig.csv``: one row per patient, one column per gene, the attributions ``attr [P, G]``."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
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
    with atomic_path(path) as tmp:
        a.write_h5ad(tmp)
