"""Writers of the attribution files QuPath, scanpy and spreadsheets read: GeoJSON tiles, per-gene IG CSV, AnnData.

Nothing here computes a score: the callers pass finished tables and arrays. The GeoJSON follows QuPath's
object schema (``tile`` objects with a stable ``id``, the phenotype as a coloured ``classification``,
named measurements); the AnnData follows scanpy's conventions (log-normalised ``X``, other values in
layers, NaN where a patient has no omics, provenance in ``uns``). Every file is written through
:mod:`pipeline.files`, so a reader never sees a half-written one.
"""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.files import atomic_path, json_safe, write_text

# tiles.csv column -> QuPath measurement name (unit in brackets where the value has one)
MEASUREMENTS: dict[str, str] = {
    "attn": "Attention",
    "attn_rel": "Attention (relative to uniform)",
    "ig": "Integrated gradients (log hazard)",
    "linear_share": "Linear slide term share (log hazard)",
}
# a fixed palette for phenotypes P0, P1, ... (matplotlib's tab20, as QuPath's 0-255 RGB), cycled past 20
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip
_TILE_NS = uuid.uuid5(uuid.NAMESPACE_URL, "histofuse/tile")


def tile_id(slide_id: str, x: int, y: int) -> str:
    """A UUID for the tile at level-0 ``(x, y)`` of ``slide_id``: the same on every run (uuid5)."""
    return str(uuid.uuid5(_TILE_NS, f"{slide_id}:{int(x)}:{int(y)}"))


def phenotype_class(label: int) -> dict:
    """QuPath classification of phenotype ``label``: ``{"name": "P<label>", "color": [r, g, b]}``."""
    return {"name": f"P{int(label)}", "color": list(PALETTE[int(label) % len(PALETTE)])}


def write_geojson(tiles: pd.DataFrame, size0: int, path: Path) -> None:
    """A QuPath GeoJSON FeatureCollection of one slide's tiles (``tiles``: slide_id, x, y and any of attn,
    attn_rel, ig, linear_share, phenotype): one square ``tile`` object per row in level-0 pixels, with an ``id``, its
    scores as named measurements (:data:`MEASUREMENTS`) and its phenotype as a classification."""
    meas = [c for c in MEASUREMENTS if c in tiles.columns]
    feats = []
    for r in tiles.itertuples(index=False):
        x, y = int(r.x), int(r.y)
        ring = [[x, y], [x + size0, y], [x + size0, y + size0], [x, y + size0], [x, y]]
        props: dict[str, Any] = {
            "objectType": "tile",
            "name": f"tile {x},{y}",
            "measurements": {MEASUREMENTS[c]: float(getattr(r, c)) for c in meas},
        }
        if "phenotype" in tiles.columns:
            props["classification"] = phenotype_class(r.phenotype)
        feats.append(
            {
                "type": "Feature",
                "id": tile_id(r.slide_id, x, y),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": props,
            }
        )
    write_text(path, json.dumps({"type": "FeatureCollection", "features": feats}))


def write_gene_attributions(
    path: Path, attr: np.ndarray, ids: list[str], genes: list[str], present: np.ndarray | None = None
) -> None:
    """``gene_ig.csv``: one row per patient, one column per gene, the attributions ``attr [P, G]``; empty
    cells (NaN) for the patients without omics (``present [P]`` False)."""
    ok = np.ones(len(ids), bool) if present is None else np.asarray(present, bool)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id"] + genes)
        for pid, row, has in zip(ids, attr, ok, strict=True):
            w.writerow([pid] + ([f"{v:.6g}" for v in row] if has else [""] * len(genes)))


def run_provenance(model_path: Path, config: dict, ig_steps: int, time_unit: str) -> dict:
    """What made an attribution file: histofuse version, model file name and SHA-256, the resolved config
    (as JSON text), IG steps, the cohort's time unit and the UTC date (for ``AnnData.uns``)."""
    import hashlib
    from datetime import UTC, datetime
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("histofuse")
    except PackageNotFoundError:
        ver = "unknown"
    h = hashlib.sha256()
    with Path(model_path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {
        "histofuse_version": ver,
        "model_file": Path(model_path).name,
        "model_sha256": h.hexdigest(),
        "config": json.dumps(json_safe(config), sort_keys=True),
        "ig_steps": int(ig_steps),
        "time_unit": time_unit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_gene_h5ad(
    path: Path,
    attr: np.ndarray,
    zscore: np.ndarray,
    obs: pd.DataFrame,
    ranked: pd.DataFrame,
    genes: list[str],
    log_expression: np.ndarray | None = None,
    provenance: dict | None = None,
    values: str = "counts",
) -> None:
    """AnnData with patients as obs, genes (or pathway tokens) as var, for scanpy.

    Args:
        attr: ``[P, G]`` integrated gradients of the log hazard -> ``layers["ig"]``.
        zscore: ``[P, G]`` the model's standardised inputs -> ``layers["zscore"]``.
        obs: one row per patient: ``patient_id``, ``omics_present`` (bool) and e.g. site, split, log_hz,
            risk_group, time, event (text columns become categories).
        ranked: ``gene, rank, mean_abs_ig, direction, ...`` -> ``var`` (in the order of ``genes``).
        log_expression: ``[P, G]`` log1p-normalised expression -> ``X`` (non-negative, what
            ``sc.tl.rank_genes_groups`` expects); None (pathway tokens): ``X`` holds the z-scores.
        provenance: from :func:`run_provenance` -> ``uns["provenance"]``.
        values: how the expression file was normalised (``counts``: X is log1p of counts per 10k;
            ``log``: X is the file's values).

    Patients without omics keep their obs row, with NaN in ``X`` and every layer.
    """
    import anndata as ad

    present = obs["omics_present"].to_numpy(bool)

    def masked(a: np.ndarray) -> np.ndarray:
        return np.where(present[:, None], np.asarray(a, np.float32), np.float32(np.nan))

    o = obs.set_index("patient_id")
    for c in o.columns:
        if o[c].dtype == object:
            o[c] = o[c].astype(str).astype("category")
    x = log_expression if log_expression is not None else zscore
    a = ad.AnnData(
        X=masked(x),
        obs=o,
        var=ranked.set_index("gene").loc[genes],
        layers={"zscore": masked(zscore), "ig": masked(attr)},
    )
    a.obs_names, a.var_names = a.obs_names.astype(str), a.var_names.astype(str)
    if log_expression is None:
        a.uns["X"] = "pathway scores (mean gene z-score)"
    else:
        a.uns["X"] = "log1p(counts per 10k)" if values == "counts" else "log expression as supplied"
    a.uns["attribution"] = {
        "method": "integrated_gradients",
        "baseline": "training-mean expression",
        "target": "log_hz",
        "layers": {"ig": "attribution (log hazard)", "zscore": "model input (training mean 0, sd 1)"},
    }
    if provenance:
        a.uns["provenance"] = dict(provenance)
    with atomic_path(path) as tmp:
        a.write_h5ad(tmp)
