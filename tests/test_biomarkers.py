"""The planted genes' entries of a demo run's biomarker table (pipeline.cohorts.demo_check)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_specs.artifacts import RunFiles
from pipeline.cohorts.demo_check import _biomarker_check
from pipeline.outputs.biomarkers import biomarker_table


def test_planted_genes_in_the_biomarker_table(tmp_path):
    rng = np.random.default_rng(0)
    n, g = 80, 30
    x = rng.normal(size=(n, g))
    names = ["MKI67", "ESR1", "PGR"] + [f"G{j}" for j in range(g - 3)]
    time = rng.exponential(np.exp(-(1.0 * x[:, 0] - 1.0 * x[:, 1])))
    held = pd.DataFrame({"patient_id": range(n), "site": "a", "time": time, "event": rng.random(n) < 0.8})
    # PGR (column 2, no effect) is ranked last, outside the top 5 candidates: not tested
    order = [0, 1, *range(3, g), 2]
    rank = pd.DataFrame({"rank": range(1, g + 1), "gene": [names[j] for j in order], "direction": "up"})
    table, _ = biomarker_table(held, pd.DataFrame(x, columns=names), rank, None, top_genes=5)
    rf = RunFiles(root=tmp_path)
    rf.attributions.mkdir()
    table.to_csv(rf.biomarkers, index=False)
    r = _biomarker_check(rf, {"MKI67": 0.8, "ESR1": -0.7, "PGR": -0.5})
    assert r["tests"] == 5 and r["gene_tests"] == 5 and r["patients"] == n
    assert r["events"] == int(held.event.sum())
    mki, esr, pgr = (r["genes"][k] for k in ("MKI67", "ESR1", "PGR"))
    assert mki["candidate"] and mki["uni_hr"] > 1 and mki["uni_fdr"] < 0.05
    assert esr["candidate"] and esr["uni_hr"] < 1 and esr["uni_fdr"] < 0.05
    assert not pgr["candidate"] and pgr["uni_fdr"] is None and pgr["uni_hr"] is None
    assert r["fdr_below_0.05"] == ["MKI67", "ESR1"]


def test_the_tests_made_do_not_depend_on_the_outcomes_and_bh_covers_exactly_them():
    """Candidates come from the attribution ranks, never from the held-out outcomes, and the FDR is
    Benjamini-Hochberg over exactly the univariate tests in the table (no more, no fewer)."""
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(1)
    n, g = 70, 40
    x = pd.DataFrame(rng.normal(size=(n, g)), columns=[f"G{j}" for j in range(g)])
    rank = pd.DataFrame({"rank": range(1, g + 1), "gene": x.columns[::-1], "direction": "up"})  # G39 first
    phenos = pd.DataFrame(rng.dirichlet(np.ones(3), size=n), columns=["P0", "P1", "P2"])
    for k in range(2):
        time = rng.exponential(np.exp(-0.8 * x["G39"].to_numpy())) if k == 0 else rng.exponential(1.0, n)
        held = pd.DataFrame({"patient_id": range(n), "site": rng.choice(["a", "b"], n), "time": time,
                             "event": rng.random(n) < 0.7})  # fmt: skip
        t, _ = biomarker_table(held, x, rank, phenos, top_genes=8)
        assert sorted(t.name) == sorted(  # the same rows whatever the outcomes: the top 8 by rank + phenotypes
            [f"G{j}" for j in range(39, 31, -1)] + ["P0", "P1", "P2"]
        )
        p = t.uni_p.to_numpy(float)
        assert np.isfinite(p).all()
        np.testing.assert_allclose(t.uni_fdr.to_numpy(float), false_discovery_control(p, method="bh"))
        if k == 0:
            assert t.loc[t.name == "G39", "uni_fdr"].iloc[0] < 0.05  # the planted gene is found
