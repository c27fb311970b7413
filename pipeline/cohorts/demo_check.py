"""How well a run on the demo cohort recovered the planted truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import write_json
from pipeline.stats.metrics import harrell_cindex


def check_demo(out: Path) -> dict:
    """Oracle C-index on the run's test patients, planted genes' ranks, attention on tumour vs other tiles.

    Writes ``truth_check.json`` in ``out`` and returns it.
    """
    out = Path(out)
    truth = out / "cohort" / "truth"
    risk = pd.read_csv(out / "risk_scores.csv")
    oracle = pd.read_csv(truth / "patients.csv")[["patient_id", "oracle_log_hz"]]
    test = risk[risk.split == "test"].merge(oracle, on="patient_id")
    r: dict = {
        "test_cindex": harrell_cindex(test.time.to_numpy(), test.event.to_numpy(bool), test.risk.to_numpy()),
        "oracle_test_cindex": harrell_cindex(
            test.time.to_numpy(), test.event.to_numpy(bool), test.oracle_log_hz.to_numpy()
        ),
        "n_test": len(test),
    }
    planted = json.loads((truth / "genes.json").read_text())["planted"]
    genes = out / "attributions" / "genes.csv"
    if genes.is_file():
        g = pd.read_csv(genes)
        r["n_genes"] = len(g)
        r["planted_gene_ranks"] = {k: int(g.loc[g.gene == k, "rank"].iloc[0]) for k in planted if (g.gene == k).any()}
        r["planted_gene_direction_correct"] = {
            k: bool((g.loc[g.gene == k, "direction_rho"].iloc[0] > 0) == (beta > 0))
            for k, beta in planted.items()
            if (g.gene == k).any()
        }
    tiles = out / "attributions" / "tiles.csv"
    if tiles.is_file():
        from sklearn.metrics import roc_auc_score

        t = pd.read_csv(tiles).merge(pd.read_csv(truth / "tiles.csv"), on=["slide_id", "x", "y"], how="left")
        lab = t.is_tumour.to_numpy()
        if np.isnan(lab).any():
            raise ValueError("some attended tiles are not in the demo's tile truth: grid misaligned")
        # AUC within each slide (attention is relative within a bag), averaged over slides with both kinds.
        aucs = [roc_auc_score(s.is_tumour, s.attn) for _, s in t.groupby("slide_id") if s.is_tumour.nunique() == 2]
        r["attention_tumour_vs_other"] = {
            "tumour": float(t.attn_rel[lab == 1].mean()),
            "other": float(t.attn_rel[lab == 0].mean()),
            "auc": float(np.mean(aucs)) if aucs else float("nan"),
            "slides": len(aucs),
        }
    write_json(out / "truth_check.json", r)
    return r
