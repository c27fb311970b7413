"""Omics and clinical ingestion: orientation, gene harmonisation, missing values, HVG, pathways,
cohort-level statistics from per-site summaries (equal to pooled fitting, no patient axis)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from data_specs import load_cohort
from data_specs.cohort import ClinicalSource, OmicsSource
from pipeline.omics.clinical import ClinicalNormaliser
from pipeline.omics.normalise import OmicsNormaliser
from pipeline.omics.readers import harmonise_gene_ids, read_gmt, read_omics
from pipeline.training.data import build_data
from pipeline.training.splits import assign_splits

N, G = 60, 120
SITES = ["A", "B", "C"]


def _counts(seed: int = 0, n: int = N, g: int = G) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.negative_binomial(4, rng.uniform(0.05, 0.9, g), size=(n, g)).astype(float)


def _cohort(tmp_path, x: np.ndarray | None = None, orientation: str = "patients", extra: str = "", clin=None):
    """A slide-less cohort of N patients at 3 sites with an omics CSV (and optional clinical CSV)."""
    rng = np.random.default_rng(1)
    pids = [f"P{i:03d}" for i in range(N)]
    x = _counts() if x is None else x
    genes = [f"G{j:03d}" for j in range(x.shape[1])]
    pd.DataFrame(
        {
            "patient_id": pids,
            "site": [SITES[i % 3] for i in range(N)],
            "time": rng.uniform(10, 1000, N).round(1),
            "event": (np.arange(N) % 2).astype(int),
            "split": ["test" if i % 5 == 0 else "val" if i % 5 == 1 else "train" for i in range(N)],
        }
    ).to_csv(tmp_path / "patients.csv", index=False)
    df = pd.DataFrame(x, index=pd.Index(pids, name="patient_id"), columns=genes)
    (df if orientation == "patients" else df.T.rename_axis("gene")).to_csv(tmp_path / "omics.csv")
    y = f"name: t\npatients: patients.csv\nomics: {{path: omics.csv{extra}}}\n"
    if clin is not None:
        clin.to_csv(tmp_path / "clinical.csv", index=False)
        y += "clinical: {path: clinical.csv}\n"
    (tmp_path / "cohort.yaml").write_text(y)
    return tmp_path / "cohort.yaml", pids, genes, x


def _adata(x: np.ndarray, pids: list[str], genes: list[str]) -> ad.AnnData:
    return ad.AnnData(
        X=x.astype(np.float32), obs=pd.DataFrame(index=pd.Index(pids)), var=pd.DataFrame(index=pd.Index(genes))
    )


def _scanpy_log(x: np.ndarray) -> np.ndarray:
    import scanpy as sc

    a = ad.AnnData(X=x.astype(np.float64))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return np.asarray(a.X)


# ---------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("orientation", ["patients", "genes"])
def test_csv_orientation_detected_and_values_identical(tmp_path, orientation):
    spec, pids, genes, x = _cohort(tmp_path, orientation=orientation)
    cohort = load_cohort(spec)  # patient coverage checked on the detected axis
    assert cohort.omics_ids == frozenset(pids)
    a = read_omics(cohort.omics, pids)
    assert list(a.obs_names) == pids and list(a.var_names) == genes
    np.testing.assert_allclose(a.X, x)


def test_declared_orientation_and_undetectable_orientation(tmp_path):
    spec, pids, genes, x = _cohort(tmp_path, orientation="genes", extra=", orientation: genes_by_patients")
    a = read_omics(load_cohort(spec).omics)  # declared: no patient ids needed
    assert list(a.obs_names) == pids
    src = OmicsSource(path=tmp_path / "omics.csv")
    with pytest.raises(ValueError, match="cannot tell the orientation.*set orientation"):
        read_omics(src, ["X1", "X2"])


def test_h5ad_gene_column_harmonised_and_duplicates_merged(tmp_path, caplog):
    x = _counts(g=4)[:5]
    a = ad.AnnData(
        X=x.astype(np.float32),
        obs=pd.DataFrame(index=[f"P{i}" for i in range(5)]),
        var=pd.DataFrame({"symbol": ["tp53", "TP53 ", "Brca1", "ENSG00000141510.16"]}, index=["e1", "e2", "e3", "e4"]),
    )
    a.write_h5ad(tmp_path / "o.h5ad")
    with caplog.at_level(logging.WARNING):
        b = read_omics(OmicsSource(path=tmp_path / "o.h5ad", gene_column="symbol"))
    assert list(b.var_names) == ["TP53", "BRCA1", "ENSG00000141510"]
    np.testing.assert_allclose(b.X[:, 0], x[:, :2].mean(1), rtol=1e-6)
    assert "1 gene identifier(s) occur more than once" in caplog.text and "TP53 x2" in caplog.text
    with pytest.raises(ValueError, match="gene_column 'nope' is not a var column"):
        read_omics(OmicsSource(path=tmp_path / "o.h5ad", gene_column="nope"))


def test_harmonise_gene_ids():
    assert harmonise_gene_ids(["ENSG00000141510.16", " tp53", "ENSG00000002586.20_PAR_Y", "HLA-A"]) == [
        "ENSG00000141510",
        "TP53",
        "ENSG00000002586_PAR_Y",
        "HLA-A",
    ]


def test_missing_values_error_by_default_and_imputation(tmp_path):
    x = _counts()
    x[3, 5] = x[3, 7] = x[10, 5] = np.nan
    spec, pids, genes, _ = _cohort(tmp_path, x)
    with pytest.raises(ValueError) as ei:
        build_data(load_cohort(spec), None)
    msg = str(ei.value)
    assert "omics.csv" in msg and "3 missing value(s) in 2 patient(s)" in msg and "2 gene(s)" in msg
    assert "impute: mean" in msg
    # zero: filled with 0 counts before normalisation
    spec, *_ = _cohort(tmp_path, x, extra=", impute: zero")
    d0 = build_data(load_cohort(spec), None)
    x0 = np.nan_to_num(x)
    s = d0.omics_norm
    np.testing.assert_allclose(d0.omics[3], (_scanpy_log(x0)[3] - s.mean) / s.std, atol=1e-5)
    # mean: the standardised value is 0 (= training mean) where missing; other genes as observed
    spec, *_ = _cohort(tmp_path, x, extra=", impute: mean")
    dm = build_data(load_cohort(spec), None)
    assert dm.omics[3, 5] == 0 and dm.omics[3, 7] == 0 and dm.omics[10, 5] == 0
    assert np.isfinite(dm.omics).all()


def test_counts_normalisation_matches_scanpy_and_log_is_as_is(tmp_path):
    spec, pids, genes, x = _cohort(tmp_path)
    d = build_data(load_cohort(spec), None)
    tr = d.splits["train"]
    ref = _scanpy_log(x)
    mu, sd = ref[tr].mean(0), ref[tr].std(0)
    np.testing.assert_allclose(d.omics, (ref - mu) / sd, atol=2e-5)
    assert d.genes == genes
    spec, *_ = _cohort(tmp_path, np.log1p(x), extra=", values: log")
    d2 = build_data(load_cohort(spec), None)
    lx = np.log1p(x)
    np.testing.assert_allclose(d2.omics, (lx - lx[tr].mean(0)) / lx[tr].std(0), atol=2e-5)


# ---------------------------------------------------------------------------------- site summaries


def test_omics_summaries_equal_pooled_fit_and_have_no_patient_axis():
    x = _counts()
    pids, genes = [f"P{i}" for i in range(N)], [f"G{j}" for j in range(G)]
    a = _adata(x, pids, genes)
    site_ids = [pids[:25], pids[25:33], pids[33:50]]
    sums = [OmicsNormaliser.site_summary(a, ids) for ids in site_ids]
    for s, ids in zip(sums, site_ids, strict=True):
        assert s.n_patients == len(ids)
        for k, v in s.model_dump().items():
            if isinstance(v, np.ndarray):
                assert v.shape == (G,), (k, v.shape)  # one value per gene, never one per patient
    fed = OmicsNormaliser.from_summaries(sums)
    pooled = OmicsNormaliser().fit(a, pids[:50])
    ref = _scanpy_log(x[:50])
    assert fed.genes == pooled.genes == genes
    np.testing.assert_allclose(fed.mean, ref.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fed.std, ref.std(0), rtol=1e-8)
    np.testing.assert_allclose(fed.mean, pooled.mean, rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2 training patients"):
        OmicsNormaliser.site_summary(a, pids[:1])


def test_hvg_from_summaries_matches_scanpy_on_pooled_data():
    import scanpy as sc

    x = _counts(seed=5, n=90, g=400)
    pids, genes = [f"P{i}" for i in range(90)], [f"G{j}" for j in range(400)]
    a = _adata(x, pids, genes)
    sums = [OmicsNormaliser.site_summary(a, ids) for ids in (pids[:30], pids[30:45], pids[45:80])]
    fed = OmicsNormaliser.from_summaries(sums, n_top_genes=50)
    b = a[pids[:80]].copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.pp.highly_variable_genes(b, flavor="seurat", n_top_genes=50)
    assert fed.genes == list(b.var_names[b.var["highly_variable"]])
    assert len(fed.genes) == 50


def test_panel_and_gene_sets_to_pathway_tokens(tmp_path):
    x = _counts()
    pids, genes = [f"P{i}" for i in range(N)], [f"G{j:03d}" for j in range(G)]
    a = _adata(x, pids, genes)
    (tmp_path / "sets.gmt").write_text(
        "HALLMARK_A\tdesc\tg000\tG001\tG002\n"
        "HALLMARK_B\thttp://x\tG010\tG011\tG012\tG013\tNOT_MEASURED\n"
        "TINY\t-\tG050\n"
    )
    sets = read_gmt(tmp_path / "sets.gmt")
    assert sets["HALLMARK_A"] == ["G000", "G001", "G002"]
    n = OmicsNormaliser.from_summaries(
        [OmicsNormaliser.site_summary(a, pids[:40])], gene_sets=sets, min_pathway_genes=2
    )
    assert n.pathways == ["HALLMARK_A", "HALLMARK_B"] and n.features == n.pathways
    assert n.genes == ["G000", "G001", "G002", "G010", "G011", "G012", "G013"]
    tok, present = n.transform(a, pids)
    z, _ = n.transform_genes(a, pids)
    assert tok.shape == (N, 2) and present.all()
    np.testing.assert_allclose(tok[:, 0], z[:, :3].mean(1), rtol=1e-6)
    np.testing.assert_allclose(tok[:, 1], z[:, 3:].mean(1), rtol=1e-6)
    back = OmicsNormaliser.from_state(n.state())
    np.testing.assert_array_equal(back.transform(a, pids)[0], tok)
    with pytest.raises(ValueError, match="panel gene"):
        OmicsNormaliser.from_summaries([OmicsNormaliser.site_summary(a, pids[:40])], panel=["G000", "XYZ"])
    with pytest.raises(ValueError, match="line 1"):
        (tmp_path / "bad.gmt").write_text("only_a_name\n")
        read_gmt(tmp_path / "bad.gmt")


def test_build_data_fits_from_per_site_summaries_only(tmp_path, monkeypatch):
    clin = pd.DataFrame(
        {
            "patient_id": [f"P{i:03d}" for i in range(N)],
            "age": np.random.default_rng(2).normal(60, 10, N).round(),
            "grade": [["G1", "G2", "G3"][i % 3] if i % 7 else None for i in range(N)],
        }
    )
    spec, pids, genes, x = _cohort(tmp_path, clin=clin)
    cohort = load_cohort(spec)
    calls: dict[str, list[list[str]]] = {"omics": [], "clinical": []}
    o_orig, c_orig = OmicsNormaliser.site_summary, ClinicalNormaliser.site_summary

    def o_spy(adata, ids, *a, **k):
        calls["omics"].append(list(ids))
        return o_orig(adata, ids, *a, **k)

    def c_spy(df, ids, *a, **k):
        calls["clinical"].append(list(ids))
        return c_orig(df, ids, *a, **k)

    monkeypatch.setattr(OmicsNormaliser, "site_summary", staticmethod(o_spy))
    monkeypatch.setattr(ClinicalNormaliser, "site_summary", staticmethod(c_spy))
    d = build_data(cohort, None, max_genes=30)
    site_of = {p.patient_id: p.site for p in cohort.patients}
    train = {pids[i] for i in d.splits["train"]}
    for kind in calls:
        assert len(calls[kind]) == 3  # one summary per site
        for ids in calls[kind]:
            assert len({site_of[i] for i in ids}) == 1 and set(ids) <= train
    monkeypatch.undo()
    tr = [pids[i] for i in d.splits["train"]]
    pooled = OmicsNormaliser().fit(read_omics(cohort.omics, pids), tr, max_genes=30)
    assert d.genes == pooled.genes
    np.testing.assert_allclose(d.omics_norm.mean, pooled.mean, rtol=1e-10)
    np.testing.assert_allclose(d.omics_norm.std, pooled.std, rtol=1e-10)
    cp = ClinicalNormaliser().fit(ClinicalNormaliser.read(cohort.clinical), tr)
    assert d.clinical_columns == cp.columns == ["age", "grade=G1", "grade=G2", "grade=G3", "grade__missing"]
    np.testing.assert_allclose(d.clinical_norm.mean, cp.mean, rtol=1e-12)
    np.testing.assert_allclose(d.clinical_norm.std, cp.std, rtol=1e-12)


# ---------------------------------------------------------------------------------------- clinical


def _clin_csv(tmp_path, rows: list[tuple]) -> ClinicalSource:
    pd.DataFrame(rows, columns=["patient_id", "age", "stage", "er"]).to_csv(tmp_path / "c.csv", index=False)
    return ClinicalSource(path=tmp_path / "c.csv", categorical=("stage", "er"))


def test_clinical_categorical_missing_and_unseen(tmp_path, caplog):
    src = _clin_csv(
        tmp_path,
        [("a", 50, "II", 1), ("b", 70, "I", 0), ("c", None, "II", 1), ("d", 60, None, 0), ("e", 40, "IV", 1)],
    )
    df = ClinicalNormaliser.read(src)
    n = ClinicalNormaliser().fit(df, ["a", "b", "c", "d"])
    assert n.categories == {"stage": ["I", "II"], "er": ["0", "1"]}
    assert n.columns == ["age", "stage=I", "stage=II", "er=0", "er=1", "age__missing", "stage__missing"]
    with caplog.at_level(logging.WARNING):
        x, present = n.transform(df, ["a", "c", "d", "e", "zz"])
    assert present.tolist() == [True, True, True, True, False]
    ages = np.array([50.0, 70.0, 60.0])
    np.testing.assert_allclose(x[0, 0], (50 - ages.mean()) / ages.std(), rtol=1e-6)
    assert x[1, 0] == 0 and x[1, 5] == 1  # missing age: training mean + indicator
    assert x[2, 1:3].tolist() == [0, 0] and x[2, 6] == 1  # missing stage: no category + indicator
    assert x[3, 1:3].tolist() == [0, 0] and x[3, 6] == 0  # unseen stage IV: all-zero, not "missing"
    assert "'stage': 1 patient(s) with a category unseen in training" in caplog.text
    assert (x[4] == 0).all()
    back = ClinicalNormaliser.from_state(n.state())
    np.testing.assert_array_equal(back.transform(df, ["a", "c", "d", "e"])[0], x[:4])


def test_clinical_summaries_equal_pooled_and_have_no_patient_axis(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        (f"p{i}", float(rng.normal(60, 9)) if i % 9 else None, ["I", "II", "III"][i % 3], int(rng.integers(2)))
        for i in range(40)
    ]
    df = ClinicalNormaliser.read(_clin_csv(tmp_path, rows))
    ids = [r[0] for r in rows]
    parts = [ids[:12], ids[12:20], ids[20:40]]
    sums = [ClinicalNormaliser.site_summary(df, p) for p in parts]
    for s in sums:
        for k, v in s.numeric.model_dump().items():
            if isinstance(v, np.ndarray):
                assert v.shape == (1,), k
        assert all(isinstance(c, int) for cats in s.categorical.values() for c in cats.values())
    fed, pooled = ClinicalNormaliser.from_summaries(sums), ClinicalNormaliser().fit(df, ids)
    assert fed.columns == pooled.columns
    np.testing.assert_allclose(fed.mean, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(fed.std, pooled.std, rtol=1e-12)
    np.testing.assert_array_equal(fed.transform(df, ids)[0], pooled.transform(df, ids)[0])
    a = np.array([r[1] for r in rows if r[1] is not None])
    np.testing.assert_allclose(fed.mean, [a.mean()]) and np.testing.assert_allclose(fed.std, [a.std()])


def test_clinical_non_numeric_in_numeric_column_is_named(tmp_path):
    pd.DataFrame({"patient_id": ["a", "b"], "age": ["50", "old"], "stage": ["I", "II"]}).to_csv(
        tmp_path / "c.csv", index=False
    )
    with pytest.raises(ValueError, match=r"c\.csv, row 2: field 'age' = 'old' \(patient 'b'\)"):
        ClinicalNormaliser.read(ClinicalSource(path=tmp_path / "c.csv", categorical=("stage",)))
    df = ClinicalNormaliser.read(ClinicalSource(path=tmp_path / "c.csv"))  # auto: age becomes categorical
    assert df["age"].dtype == object


def test_assign_splits_unchanged_by_omics(tmp_path):
    spec, *_ = _cohort(tmp_path)
    c = load_cohort(spec)
    s = assign_splits(c, 0.2, 0.25, 0)
    assert sum(len(v) for v in s.values()) == N


def test_prediction_reuses_the_saved_panel(tmp_path):
    spec, pids, genes, x = _cohort(tmp_path)
    d = build_data(load_cohort(spec), None, max_genes=20)
    state = d.omics_norm.state()
    # a new cohort file with the genes in another order and one extra gene: same features, same values
    other = pd.DataFrame(x[:, ::-1], index=pd.Index(pids, name="patient_id"), columns=genes[::-1])
    other["EXTRA"] = 1.0
    other.to_csv(tmp_path / "omics.csv")
    d2 = build_data(load_cohort(spec), None, omics_norm=OmicsNormaliser.from_state(state))
    assert d2.genes == d.genes
    lib_ratio = x.sum(1) / (x.sum(1) + 1.0)  # library size now includes EXTRA
    assert np.isfinite(d2.omics).all() and d2.omics.shape == d.omics.shape
    assert np.corrcoef(d2.omics.ravel(), d.omics.ravel())[0, 1] > 0.999 and lib_ratio.min() > 0.99
    other.drop(columns=[d.genes[0]]).to_csv(tmp_path / "omics.csv")
    with pytest.raises(ValueError, match="lack 1 gene\\(s\\) of the model's panel"):
        build_data(load_cohort(spec), None, omics_norm=OmicsNormaliser.from_state(state))


def test_real_gse7390_summaries_match_pooled_and_scanpy(tmp_path):
    """Real microarray + clinical data (scikit-survival's GSE7390 breast cancer cohort), 3 pseudo-sites."""
    import scanpy as sc
    from sksurv.datasets import load_breast_cancer

    X, _ = load_breast_cancer()
    ids = [f"S{i:03d}" for i in range(len(X))]
    gcols = [c for c in X.columns if c.startswith("X")]
    a = _adata(X[gcols].to_numpy(), ids, gcols)
    train = ids[:150]
    parts = [train[0::3], train[1::3], train[2::3]]
    fed = OmicsNormaliser.from_summaries(
        [OmicsNormaliser.site_summary(a, p, values="log") for p in parts], n_top_genes=20
    )
    b = a[train].copy()
    sc.pp.highly_variable_genes(b, flavor="seurat", n_top_genes=20)
    assert fed.genes == list(b.var_names[b.var["highly_variable"]]) and len(fed.genes) == 20
    ref = X.iloc[:150][fed.genes].to_numpy().astype(np.float32).astype(float)  # AnnData holds float32
    np.testing.assert_allclose(fed.mean, ref.mean(0), rtol=1e-10)
    np.testing.assert_allclose(fed.std, ref.std(0), rtol=1e-7)
    clin = X[["age", "size", "er", "grade"]].astype({"er": str, "grade": str}).assign(patient_id=ids)
    clin.to_csv(tmp_path / "c.csv", index=False)
    df = ClinicalNormaliser.read(ClinicalSource(path=tmp_path / "c.csv"))
    cf = ClinicalNormaliser.from_summaries([ClinicalNormaliser.site_summary(df, p) for p in parts])
    cp = ClinicalNormaliser().fit(df, train)
    assert cf.categories == cp.categories and set(cf.categories) == {"er", "grade"}
    assert cf.categories["er"] == ["negative", "positive"]
    np.testing.assert_allclose(cf.transform(df, ids)[0], cp.transform(df, ids)[0], atol=1e-6)


def test_tsv_genes_as_rows_with_a_symbol_column(tmp_path):
    (tmp_path / "o.tsv").write_text(
        "ensembl\tsymbol\tP1\tP2\tP3\n"
        "ENSG00000141510.16\ttp53\t1\t2\t3\n"
        "ENSG00000012048.2\tBRCA1\t4\t5\t6\n"
        "ENSG00000012048.9\tbrca1\t6\t7\t8\n"
    )
    a = read_omics(OmicsSource(path=tmp_path / "o.tsv", gene_column="symbol"), ["P1", "P2", "P3"])
    assert list(a.obs_names) == ["P1", "P2", "P3"] and list(a.var_names) == ["TP53", "BRCA1"]
    np.testing.assert_allclose(a.X[:, 1], [5, 6, 7])
    (tmp_path / "e.tsv").write_text("ensembl\tP1\tP2\nENSG00000141510.16\t1\t2\nENSG00000012048.2\t4\t5\n")
    b = read_omics(OmicsSource(path=tmp_path / "e.tsv", gene_column="ensembl"), ["P1", "P2", "P3"])
    assert list(b.var_names) == ["ENSG00000141510", "ENSG00000012048"] and list(b.obs_names) == ["P1", "P2"]
    with pytest.raises(ValueError, match="patient column 'symbol' is not numeric.*name it as gene_column"):
        read_omics(OmicsSource(path=tmp_path / "o.tsv"), ["P1", "P2", "P3"])


def test_site_summaries_round_trip_the_wire_exactly_and_bad_ones_are_refused(tmp_path):
    """summary -> wire (JSON) -> summary -> fitted normaliser identical, bit for bit; malformed ones refused."""
    import json

    from data_specs.summaries import ClinicalSiteSummary, OmicsSiteSummary, site_summaries_from_wire

    pids, genes = [f"P{i}" for i in range(N)], [f"G{j}" for j in range(G)]
    a = _adata(_counts(), pids, genes)
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"age": rng.normal(60, 9, N), "grade": rng.choice(["1", "2", "3"], N)}, index=pids)
    df.loc[pids[:5], "age"] = np.nan
    parts = [pids[: N // 3], pids[N // 3 : N // 2], pids[N // 2 :]]
    sums = [
        {"omics": OmicsNormaliser.site_summary(a, p), "clinical": ClinicalNormaliser.site_summary(df, p)} for p in parts
    ]
    back = [site_summaries_from_wire(json.loads(json.dumps({k: v.to_wire() for k, v in s.items()})), "x") for s in sums]
    for s, b in zip(sums, back, strict=True):
        for k in ("n", "sum", "sumsq", "sum_expm1", "sumsq_expm1"):
            x, y = getattr(s["omics"], k), getattr(b["omics"], k)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    for kw in ({}, {"n_top_genes": 10}):
        f0 = OmicsNormaliser.from_summaries([s["omics"] for s in sums], **kw)
        f1 = OmicsNormaliser.from_summaries([s["omics"] for s in back], **kw)
        assert f0.genes == f1.genes and f0.mean.tobytes() == f1.mean.tobytes() and f0.std.tobytes() == f1.std.tobytes()
    c0 = ClinicalNormaliser.from_summaries([s["clinical"] for s in sums])
    c1 = ClinicalNormaliser.from_summaries([s["clinical"] for s in back])
    assert c0.mean.tobytes() == c1.mean.tobytes() and c0.std.tobytes() == c1.std.tobytes()
    assert (c0.numeric, c0.categories, c0.columns) == (c1.numeric, c1.categories, c1.columns)

    w = sums[0]["omics"].to_wire()
    with pytest.raises(ValueError, match=r"site s1: omics summary: rows: Extra inputs"):
        OmicsSiteSummary.from_wire({**w, "rows": [[1.0]]}, "s1")
    with pytest.raises(ValueError, match=r"site s1: omics summary: .*sum has length 119; declared \[120\]"):
        OmicsSiteSummary.from_wire({**w, "sum": w["sum"][:-1]}, "s1")
    with pytest.raises(ValueError, match=r"site s1: omics summary: sum: .*no patient axis"):
        OmicsSiteSummary.from_wire({**w, "sum": [w["sum"]] * 2}, "s1")
    with pytest.raises(ValueError, match=r"site s1: clinical summary: n_patients"):
        ClinicalSiteSummary.from_wire({**sums[0]["clinical"].to_wire(), "n_patients": 1}, "s1")
    with pytest.raises(ValueError, match=r"site s1: undeclared summary part"):
        site_summaries_from_wire({"slides": {}}, "s1")
