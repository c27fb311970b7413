"""The files other tools read: QuPath tile GeoJSON (object schema), the scanpy AnnData, the tidy CSVs."""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pandas as pd
import pytest

from pipeline.outputs.writers import (
    MEASUREMENTS,
    PALETTE,
    run_provenance,
    write_gene_attributions,
    write_gene_h5ad,
    write_geojson,
)


def _check_qupath_objects(gj: dict) -> list[dict]:
    """QuPath's GeoJSON object rules (what File > Import objects accepts), checked by hand: a FeatureCollection
    of Features with a UUID ``id``, a Polygon of closed rings of numeric [x, y] pairs, ``properties.objectType``
    one of QuPath's object types, a classification ``{name: str, color: [r, g, b] 0-255 ints}`` and finite
    numeric measurements keyed by name."""
    assert gj["type"] == "FeatureCollection" and isinstance(gj["features"], list)
    for f in gj["features"]:
        assert f["type"] == "Feature"
        uuid.UUID(f["id"])
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and geom["coordinates"]
        for ring in geom["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1], "rings are closed"
            assert all(len(p) == 2 and all(isinstance(v, int | float) for v in p) for p in ring)
        p = f["properties"]
        assert p["objectType"] in {"annotation", "detection", "tile", "cell", "tma_core"}
        if "classification" in p:
            c = p["classification"]
            assert isinstance(c["name"], str) and c["name"]
            assert len(c["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])
        m = p.get("measurements", {})
        assert isinstance(m, dict) and all(isinstance(k, str) and np.isfinite(v) for k, v in m.items())
    return gj["features"]


def test_tile_geojson_follows_qupath_object_schema(tmp_path):
    t = pd.DataFrame({"slide_id": "S1", "x": [0, 448, 896], "y": [224, 0, 0], "attn": [0.2, 0.5, 0.3],
                      "attn_rel": [0.6, 1.5, 0.9], "ig": [-0.1, 0.3, 0.0], "linear_share": [0.02, -0.04, 0.0],
                      "phenotype": [0, 1, 23]})  # fmt: skip
    write_geojson(t, 448, tmp_path / "s.geojson")
    feats = _check_qupath_objects(json.loads((tmp_path / "s.geojson").read_text()))
    assert len(feats) == 3 and {f["properties"]["objectType"] for f in feats} == {"tile"}
    f = feats[1]
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] == [448, 0] and ring[2] == [896, 448]  # level-0 pixels, tile side 448
    assert f["properties"]["measurements"] == {
        "Attention": 0.5,
        "Attention (relative to uniform)": 1.5,
        "Integrated gradients (log hazard)": 0.3,
        "Linear slide term share (log hazard)": -0.04,
    }
    assert set(f["properties"]["measurements"]) == set(MEASUREMENTS.values())
    names = [x["properties"]["classification"]["name"] for x in feats]
    colours = [tuple(x["properties"]["classification"]["color"]) for x in feats]
    assert names == ["P0", "P1", "P23"] and colours[0] != colours[1] and colours[2] == PALETTE[3]  # cycled
    ids = [x["id"] for x in feats]
    assert len(set(ids)) == 3
    # ids are derived from slide + coordinates: the same on a rerun, different on another slide
    write_geojson(t.iloc[::-1], 448, tmp_path / "again.geojson")
    assert sorted(x["id"] for x in json.loads((tmp_path / "again.geojson").read_text())["features"]) == sorted(ids)
    write_geojson(t.assign(slide_id="S2"), 448, tmp_path / "s2.geojson")
    assert not {x["id"] for x in json.loads((tmp_path / "s2.geojson").read_text())["features"]} & set(ids)


def test_tile_geojson_without_phenotypes_has_no_classification(tmp_path):
    t = pd.DataFrame({"slide_id": "S", "x": [0], "y": [0], "attn": [1.0], "attn_rel": [1.0]})
    write_geojson(t, 224, tmp_path / "s.geojson")
    (f,) = _check_qupath_objects(json.loads((tmp_path / "s.geojson").read_text()))
    assert "classification" not in f["properties"] and list(f["properties"]["measurements"]) == [
        "Attention",
        "Attention (relative to uniform)",
    ]


@pytest.fixture()
def gene_run(tmp_path):
    """An h5ad of 30 patients x 8 genes: log-normalised X, one patient without omics, two risk groups."""
    rng = np.random.default_rng(0)
    n, g = 30, 8
    genes = [f"G{j}" for j in range(g)]
    logx = np.log1p(rng.gamma(2.0, 20.0, size=(n, g))).astype(np.float32)
    logx[:15, 0] += 1.5  # G0 higher in the high-risk group
    mean, sd = logx.mean(0), logx.std(0)
    z = ((logx - mean) / sd).astype(np.float32)
    present = np.ones(n, bool)
    present[4] = False
    z[4], logx[4] = 0.0, mean  # what the normaliser gives a patient without omics
    attr = rng.normal(size=(n, g)).astype(np.float32)
    attr[4] = 0.0
    obs = pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)], "site": np.where(np.arange(n) % 2, "a", "b"),
                        "split": "test", "log_hz": rng.normal(size=n),
                        "risk_group": np.where(np.arange(n) < 15, "high", "low"), "time": rng.exponential(300, n),
                        "event": rng.random(n) < 0.6, "omics_present": present})  # fmt: skip
    rank = pd.DataFrame({"gene": genes[::-1], "rank": np.arange(1, g + 1), "mean_abs_ig": np.linspace(1, 0.1, g),
                         "direction": "higher expression -> higher risk"})  # fmt: skip
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    prov = run_provenance(model, {"train": {"seed": 0, "x": None}}, 32, "days")
    path = tmp_path / "g.h5ad"
    write_gene_h5ad(path, attr, z, obs, rank, genes, logx, prov)
    return path, logx, z, attr, present, genes


def test_gene_h5ad_is_scanpy_native(gene_run):
    import anndata as ad
    import scanpy as sc

    path, logx, z, attr, present, genes = gene_run
    a = ad.read_h5ad(path)
    assert list(a.var_names) == genes and a.var["rank"].tolist() == list(range(8, 0, -1))
    assert np.isnan(a.X[4]).all() and np.isnan(a.layers["zscore"][4]).all() and np.isnan(a.layers["ig"][4]).all()
    ok = a.obs.omics_present.to_numpy(bool)
    np.testing.assert_allclose(a.X[ok], logx[present], rtol=1e-6)
    np.testing.assert_allclose(a.layers["zscore"][ok], z[present], rtol=1e-6)
    np.testing.assert_allclose(a.layers["ig"][ok], attr[present], rtol=1e-6)
    assert (a.X[ok] >= 0).all() and a.uns["X"] == "log1p(counts per 10k)"
    assert isinstance(a.obs.risk_group.dtype, pd.CategoricalDtype) and set(a.obs.risk_group) == {"high", "low"}
    p = a.uns["provenance"]
    assert p["model_sha256"] == hashlib.sha256(b"weights").hexdigest() and p["ig_steps"] == 32
    assert p["time_unit"] == "days" and p["date"][:2] == "20" and p["histofuse_version"]
    assert json.loads(p["config"]) == {"train": {"seed": 0, "x": None}}
    # differential expression by risk group, on the patients with omics (the one without is all NaN)
    b = a[ok].copy()
    sc.tl.rank_genes_groups(b, "risk_group", method="wilcoxon")
    lfc = sc.get.rank_genes_groups_df(b, group="high")
    assert np.isfinite(lfc.logfoldchanges).all() and np.isfinite(lfc.pvals).all()
    assert lfc.names.iloc[0] == "G0" and lfc.logfoldchanges.iloc[0] > 0


def test_gene_ig_csv_leaves_patients_without_omics_empty(tmp_path):
    write_gene_attributions(tmp_path / "ig.csv", np.ones((2, 2)), ["A", "B"], ["G1", "G2"], np.array([True, False]))
    df = pd.read_csv(tmp_path / "ig.csv")
    assert df.loc[0, "G1"] == 1.0 and df.iloc[1, 1:].isna().all()


def test_survival_curves_long_form_round_trip(tmp_path):
    from pipeline.outputs.evaluate import read_curves
    from pipeline.outputs.predictions import curves_table

    times = np.array([10.0, 20.0, 35.5])
    surv = np.array([[0.9, 0.8, 0.5], [0.95, 0.9, 0.7]])
    df = curves_table(["a", "b"], (times, surv))
    assert list(df.columns) == ["patient_id", "time", "survival"] and len(df) == 6
    df.to_csv(tmp_path / "survival_curves.csv", index=False)
    c = read_curves(tmp_path / "survival_curves.csv", ["b", "a"])
    np.testing.assert_allclose(c.times, times)
    np.testing.assert_allclose(c.surv, surv[::-1])
    assert read_curves(tmp_path / "survival_curves.csv", ["a", "z"]) is None  # a patient without a curve
    df.iloc[:-1].to_csv(tmp_path / "survival_curves.csv", index=False)
    assert read_curves(tmp_path / "survival_curves.csv", ["a", "b"]) is None  # grids differ


def test_horizon_columns_carry_the_time_unit():
    from pipeline.outputs.evaluate import horizons_of
    from pipeline.outputs.predictions import horizon_column, horizon_of

    assert [horizon_column(h, "days") for h in (365, 1095.5)] == ["surv_365days", "surv_1095.5days"]
    assert horizon_of("surv_1095.5days") == (1095.5, "days") and horizon_of(horizon_column(3, "years")) == (3, "years")
    assert horizon_of("survival") is None and horizon_of("surv_days") is None
    assert horizons_of(["log_hz", "surv_365days", "surv_730days"]) == [365.0, 730.0] and horizons_of(["x"]) is None


def test_biomarker_ranks_are_integers(tmp_path):
    from pipeline.outputs.biomarkers import biomarker_table

    rng = np.random.default_rng(3)
    n = 60
    x = rng.normal(size=(n, 2))
    time = rng.exponential(np.exp(-x[:, 0]))
    held = pd.DataFrame({"patient_id": range(n), "site": "a", "time": time, "event": rng.random(n) < 0.8})
    genes = pd.DataFrame(x, columns=["G1", "G2"])
    rank = pd.DataFrame({"rank": [1, 2], "gene": ["G1", "G2"], "direction": ["up", "down"]})
    phenos = pd.DataFrame({"P0": rng.random(n)})
    t, _ = biomarker_table(held, genes, rank, phenos)
    t.to_csv(tmp_path / "b.csv", index=False)
    back = pd.read_csv(tmp_path / "b.csv")
    assert (tmp_path / "b.csv").read_text().splitlines()[1].split(",")[:3] == ["gene", "1", "G1"]
    assert back.attribution_rank.iloc[:2].tolist() == [1, 2] and np.isnan(back.attribution_rank.iloc[2])


def test_normaliser_gives_back_the_log_normalised_expression():
    import anndata as ad

    from pipeline.omics.normalise import OmicsNormaliser
    from pipeline.omics.readers import log_normalise

    rng = np.random.default_rng(2)
    counts = rng.poisson(5.0, size=(20, 6)).astype(np.float64)
    counts[:, 0] = 0.0  # a gene never seen: log1p(0) = 0 must not come back as -1e-8
    a = ad.AnnData(X=counts)
    a.obs_names = [f"P{i}" for i in range(20)]
    a.var_names = [f"G{j}" for j in range(6)]
    ids = list(a.obs_names)
    norm = OmicsNormaliser().fit(a, ids)
    z, present = norm.transform_genes(a, ids)
    x = norm.log_expression(z)
    pos = [list(a.var_names).index(g) for g in norm.genes]
    np.testing.assert_allclose(x, log_normalise(a, "counts")[:, pos], atol=1e-5)
    assert present.all() and (x >= 0).all()


def test_evaluate_names_the_renamed_risk_column(tmp_path):
    from pipeline.outputs.evaluate import stage_evaluate

    pd.DataFrame({"patient_id": ["a"], "site": "s", "split": "test", "risk": [0.1], "risk_group": "low",
                  "time": [1.0], "event": [1]}).to_csv(tmp_path / "risk_scores.csv", index=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"missing columns \['log_hz'\] \(an older run's `risk` column"):
        stage_evaluate(tmp_path / "risk_scores.csv", tmp_path)
