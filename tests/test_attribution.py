"""Attributions (captum IG completeness), GeoJSON, AnnData export, deletion curves, phenotypes and the
biomarker table against lifelines / statsmodels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models import build_model
from pipeline.outputs.attribution import (
    gene_deletion_curves,
    gene_integrated_gradients,
    mean_tile_feature,
    rank_genes,
    tile_deletion_curves,
    tile_integrated_gradients,
)
from pipeline.outputs.biomarkers import cox_table, fit_phenotypes
from pipeline.outputs.writers import write_gene_h5ad
from pipeline.training.data import CohortData, make_loader, model_inputs


@pytest.fixture(scope="module")
def toy():
    """12 patients with 3-9 tiles (D=8), 6 genes and 2 clinical covariates; one without omics, one without tiles."""
    rng = np.random.default_rng(0)
    n, d, g = 12, 8, 6
    bags = [rng.normal(size=(int(rng.integers(3, 10)), d)).astype(np.float32) for _ in range(n)]
    bags[5] = np.zeros((0, d), np.float32)
    tiles = [[(f"S{i:02d}", 224 * j, 0) for j in range(len(b))] for i, b in enumerate(bags)]
    omics = rng.normal(size=(n, g)).astype(np.float32)
    present = np.ones(n, bool)
    present[3] = False
    data = CohortData(
        patient_ids=[f"P{i}" for i in range(n)],
        sites=["a", "b"],
        site=np.arange(n) % 2,
        time=rng.uniform(1, 10, n).astype(np.float32),
        event=rng.random(n) < 0.6,
        splits={"train": np.arange(8), "val": np.zeros(0, int), "test": np.arange(8, 12)},
        bags=bags,
        tiles=tiles,
        feature_dim=d,
        omics=omics,
        omics_present=present,
        genes=[f"G{j}" for j in range(g)],
        clinical=rng.normal(size=(n, 2)).astype(np.float32),
        clinical_present=np.ones(n, bool),
    )
    torch.manual_seed(0)
    model = build_model(d, g, 2, hidden=16, omics_hidden=8, clinical_hidden=4, dropout=0.0).eval()
    return data, model


def _lh(model, data, i, **replace):
    batch = model_inputs(next(iter(make_loader(data, np.array([i]), 1, train=False))))
    batch.update(replace)
    with torch.no_grad():
        return float(model(**batch).log_hz[0])


def test_tile_ig_completeness_and_shapes(toy):
    data, model = toy
    idx = np.arange(12)
    base = mean_tile_feature(data, data.splits["train"])
    ig = tile_integrated_gradients(model, data, idx, base, n_steps=64)
    assert [len(a) for a in ig] == [len(b) for b in data.bags]
    for i in (0, 7):  # sum over tiles = log_hz(x) - log_hz(every tile at the baseline)
        x = torch.from_numpy(data.bags[i])[None]
        ref = _lh(model, data, i) - _lh(model, data, i, features=torch.from_numpy(base).expand_as(x)[None][0])
        assert ig[i].sum() == pytest.approx(ref, abs=2e-3)


def test_gene_ig_completeness_and_missing_omics(toy):
    data, model = toy
    idx = np.arange(12)
    attr = gene_integrated_gradients(model, data, idx, n_steps=64)
    assert attr.shape == (12, 6)
    assert np.all(attr[3] == 0)  # no omics: no attribution
    ref = _lh(model, data, 0) - _lh(model, data, 0, omics=torch.zeros(1, 6))
    assert attr[0].sum() == pytest.approx(ref, abs=2e-3)


def test_gene_h5ad_round_trip(toy, tmp_path):
    import anndata as ad

    data, model = toy
    idx = data.splits["test"]
    attr = gene_integrated_gradients(model, data, idx)
    rank = rank_genes(attr, data.omics[idx], data.omics_present[idx], data.genes)
    present = data.omics_present[idx]
    obs = pd.DataFrame({"patient_id": [data.patient_ids[i] for i in idx], "site": "a",
                        "log_hz": [0.1, 0.2, 0.3, 0.4], "omics_present": present})  # fmt: skip
    write_gene_h5ad(tmp_path / "g.h5ad", attr, data.omics[idx], obs, rank, data.genes)
    a = ad.read_h5ad(tmp_path / "g.h5ad")
    np.testing.assert_allclose(a.layers["ig"][present], attr[present], rtol=1e-6)
    assert np.isnan(a.layers["ig"][~present]).all() and np.isnan(a.X[~present]).all()
    assert list(a.obs_names) == obs.patient_id.tolist() and list(a.var_names) == data.genes
    assert {"rank", "mean_abs_ig", "direction"} <= set(a.var.columns) and a.obs.log_hz.iloc[2] == 0.3


def test_deletion_curves_start_at_zero_and_favour_attributed_inputs():
    """A model whose risk depends on genes 0-1 only: resetting the top-IG genes moves the risk more than
    random genes; removing the tiles that carry the signal moves it more than random tiles."""
    rng = np.random.default_rng(1)
    n, g, d = 10, 20, 4
    bags = [np.concatenate([rng.normal(size=(1, d)) + 5, rng.normal(size=(9, d)) * 0.01]).astype(np.float32)
            for _ in range(n)]  # fmt: skip
    data = CohortData(
        [f"P{i}" for i in range(n)], ["a"], np.zeros(n, int), np.ones(n, np.float32), np.ones(n, bool),
        {"train": np.arange(n)}, bags=bags, tiles=[[("S", j, 0) for j in range(10)] for _ in range(n)],
        feature_dim=d, omics=rng.normal(size=(n, g)).astype(np.float32), omics_present=np.ones(n, bool),
        genes=[f"G{j}" for j in range(g)],
    )  # fmt: skip

    class Lin(torch.nn.Module):
        def forward(self, features, mask, omics, omics_mask):
            from models.survival import SurvivalOutput

            tile = (features.sum(-1) * mask).sum(1)  # sum over the real tiles
            return SurvivalOutput(2 * omics[:, 0] - 3 * omics[:, 1] + 0.1 * tile)

    m = Lin()
    idx = np.arange(n)
    attr = gene_integrated_gradients(m, data, idx)
    gc = gene_deletion_curves(m, data, idx, attr, steps=5)
    assert gc["ig"][0] == pytest.approx(0, abs=1e-6) and gc["gap"]["ig"] > 0.5
    scores = [b.sum(1) for b in bags]  # the first tile carries the signal
    tc = tile_deletion_curves(m, data, idx, {"signal": scores}, steps=5)
    assert tc["gap"]["signal"] > 0 and tc["patients"] == n


def test_phenotypes_recover_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 16)) * 6
    bags, truth = [], []
    for _ in range(20):
        lab = rng.integers(0, 3, 60)
        bags.append((centres[lab] + rng.normal(size=(60, 16))).astype(np.float32))
        truth.append(lab)
    tiles = [[("S", j, 0) for j in range(60)] for _ in range(20)]
    ph = fit_phenotypes(bags, tiles, np.arange(10), max_tiles=400, resolution=0.2, seed=0)
    assert adjusted_rand_score(np.concatenate(truth), np.concatenate(ph.labels)) > 0.95
    np.testing.assert_allclose(ph.fractions.sum(1), 1.0)
    assert ph.n_fit_tiles == 400 and all(len(v) == 6 for v in ph.examples.values())
    with pytest.raises(ValueError, match="too few training tiles"):
        fit_phenotypes([np.zeros((3, 4), np.float32)], [[("S", 0, 0)] * 3], np.arange(1))


def test_cox_table_matches_lifelines_and_statsmodels():
    from lifelines import CoxPHFitter
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(3)
    n = 150
    x = pd.DataFrame(rng.normal(size=(n, 5)), columns=[f"G{j}" for j in range(5)])
    t = rng.exponential(np.exp(-0.8 * x.G0.to_numpy()))
    e = rng.random(n) < 0.7
    site = np.where(np.arange(n) < 75, "a", "b")
    tab = cox_table(x, t, e, site, ranked=["G0", "G1", "G2"])
    z = (x - x.mean()) / x.std(ddof=0)
    ref = CoxPHFitter().fit(z[["G0"]].assign(time=t, event=e.astype(int), site=site), "time", "event", strata=["site"])
    r0 = tab.set_index("name").loc["G0"]
    assert r0.uni_hr == pytest.approx(ref.summary.loc["G0", "exp(coef)"], rel=1e-6)
    assert r0.uni_p == pytest.approx(ref.summary.loc["G0", "p"], rel=1e-6) and r0.uni_hr > 1.5
    np.testing.assert_allclose(tab.uni_fdr, multipletests(tab.uni_p, method="fdr_bh")[1])
    assert tab.in_multivariable.sum() == 3  # 100+ events allow all three ranked candidates
    few = cox_table(x.head(30), t[:30], np.r_[np.ones(12, bool), np.zeros(18, bool)], site[:30], ["G0", "G1"])
    assert few.in_multivariable.sum() == 1  # 12 events: one variable (10 events per variable)
    none = cox_table(x.head(10), t[:10], np.r_[True, np.zeros(9, bool)], site[:10], ["G0"])
    assert none.uni_hr.isna().all() and none.note.str.contains("fewer than 2 events").all()
