"""How well a run on the demo cohort recovered the planted truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_specs.artifacts import RunFiles
from pipeline.cohorts.demo import TRUTH_DIR, TRUTH_GENES, TRUTH_PATIENTS, TRUTH_TILES
from pipeline.files import write_json
from pipeline.stats.metrics import harrell_cindex


def check_demo(out: Path) -> dict:
    """Oracle C-index on the run's test patients, planted genes' ranks, attention on tumour vs other tiles.

    Writes ``truth_check.json`` in ``out`` (:attr:`RunFiles.truth_check`) and returns it.
    """
    rf = RunFiles(root=Path(out))
    truth = rf.demo_cohort / TRUTH_DIR
    risk = pd.read_csv(rf.risk_scores)
    oracle = pd.read_csv(truth / TRUTH_PATIENTS)[["patient_id", "oracle_log_hz"]]
    test = risk[risk.split == "test"].merge(oracle, on="patient_id")
    r: dict = {
        "test_cindex": harrell_cindex(test.time.to_numpy(), test.event.to_numpy(bool), test.log_hz.to_numpy()),
        "oracle_test_cindex": harrell_cindex(
            test.time.to_numpy(), test.event.to_numpy(bool), test.oracle_log_hz.to_numpy()
        ),
        "n_test": len(test),
    }
    planted = json.loads((truth / TRUTH_GENES).read_text())["planted"]
    genes = rf.genes
    if genes.is_file():
        g = pd.read_csv(genes)
        r["n_genes"] = len(g)
        r["planted_gene_ranks"] = {k: int(g.loc[g.gene == k, "rank"].iloc[0]) for k in planted if (g.gene == k).any()}
        r["planted_gene_direction_correct"] = {
            k: bool((g.loc[g.gene == k, "direction_rho"].iloc[0] > 0) == (beta > 0))
            for k, beta in planted.items()
            if (g.gene == k).any()
        }
    tiles = rf.tiles
    if tiles.is_file():
        from sklearn.metrics import roc_auc_score

        t = pd.read_csv(tiles).merge(pd.read_csv(truth / TRUTH_TILES), on=["slide_id", "x", "y"], how="left")
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
    write_json(rf.truth_check, r)
    return r
