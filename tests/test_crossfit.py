"""Cross-fitted gene tests (pipeline.outputs.biomarkers.crossfit_gene_table): each fold's candidates tested on
that fold's patients only, pooled over folds in one fold-stratified Cox fit, calibrated under null outcomes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.outputs.biomarkers import FoldGenes, crossfit_gene_table


def _folds(rng, k=5, n=40, g=30, beta=None, ranks=None, sites=("a", "b")):
    """``k`` folds of ``n`` patients with ``g`` genes; hazard exp(x @ beta); ranks[f] orders fold f's genes."""
    beta = np.zeros(g) if beta is None else beta
    names = [f"G{j}" for j in range(g)]
    out = []
    for f in range(k):
        x = rng.normal(size=(n, g)) * 2.0 + 5.0  # unstandardised: the table standardises within each fold
        time = rng.exponential(np.exp(-((x - 5.0) / 2.0) @ beta))
        held = pd.DataFrame({"patient_id": [f"F{f}P{i}" for i in range(n)], "site": rng.choice(sites, n),
                             "time": time, "event": (rng.random(n) < 0.75).astype(int)})  # fmt: skip
        order = ranks[f] if ranks is not None else rng.permutation(g)
        rank = pd.DataFrame({"rank": range(1, g + 1), "gene": [names[j] for j in order], "direction": "up"})
        out.append(FoldGenes(held, pd.DataFrame(x, columns=names), rank))
    return out


def test_a_gene_is_tested_on_the_folds_that_chose_it_with_fold_strata():
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(0)
    g = 12
    beta = np.zeros(g)
    beta[0] = 0.7
    # G0 is in the top 3 of folds 0-2 only; G1 of every fold
    ranks = [[0, 1, *range(2, g)] if f < 3 else [1, *range(2, g), 0] for f in range(5)]
    folds = _folds(rng, g=g, beta=beta, ranks=ranks, sites=("a",))
    folds[4].expression.iloc[:5] = np.nan  # five patients of fold 4 have no omics
    table, info = crossfit_gene_table(folds, top_genes=3)
    t = table.set_index("name")
    assert set(t.index) == {"G0", "G1", "G2", "G3"}  # each fold's top 3: G0 G1 G2 (folds 0-2), G1 G2 G3 (3-4)
    assert t.loc["G0", "folds_chosen"] == "3/5" and t.loc["G0", "n"] == 120
    assert t.loc["G1", "folds_chosen"] == "5/5" and t.loc["G1", "n"] == 195
    assert info["patients"] == 195 and info["stratified_by"] == "fold" and info["tests"] == 4
    assert t.loc["G0", "uni_hr"] > 1 and t.loc["G0", "uni_fdr"] < 0.05
    # the same fit done directly: G0 standardised within each of folds 0-2, strata = fold
    parts = []
    for f in range(3):
        x = folds[f].expression.G0
        parts.append(folds[f].held_out.assign(G0=(x - x.mean()) / x.std(ddof=0), fold=f))
    d = pd.concat(parts)[["G0", "time", "event", "fold"]]
    s = CoxPHFitter().fit(d, "time", "event", strata=["fold"]).summary.loc["G0"]
    np.testing.assert_allclose([t.loc["G0", "uni_hr"], t.loc["G0", "uni_p"]], [s["exp(coef)"], s["p"]], rtol=1e-6)


@pytest.mark.slow
def test_null_outcomes_give_uniform_p_values():
    """Outcomes that carry no signal: about 5% of the tests have p < 0.05 (over 40 cohorts x 10 genes)."""
    rng = np.random.default_rng(3)
    p = []
    for _ in range(40):
        table, _ = crossfit_gene_table(_folds(rng, n=30, g=20), top_genes=4)
        p += table.uni_p.tolist()
    p = np.asarray(p)
    assert np.isfinite(p).all() and len(p) >= 400
    assert 0.025 <= (p < 0.05).mean() <= 0.085, (p < 0.05).mean()
    assert 0.4 <= np.median(p) <= 0.6


def test_degenerate_folds_give_notes_not_crashes():
    rng = np.random.default_rng(1)
    folds = _folds(rng, k=2, n=10, g=4)
    for f in folds:
        f.held_out["event"] = 0
    folds[0].held_out.loc[0, "event"] = 1
    table, info = crossfit_gene_table(folds, top_genes=2)
    assert info["tests"] == 0 and table.uni_p.isna().all()
    assert table.note.str.contains("fewer than 2 events").all()
    assert crossfit_gene_table([], 5)[0].empty
