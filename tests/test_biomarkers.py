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
