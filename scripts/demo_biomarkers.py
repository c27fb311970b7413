"""How well a demo run's attributions, phenotypes and biomarker table recover the planted truth, and
whether its report renders in headless Chromium.

    python scripts/demo_biomarkers.py [RUN_DIR]      (default runs/demo, after `make demo`)

Prints: the planted genes' attribution ranks and, for those among the top candidates, their Cox FDR;
tumour-vs-other AUC of tile attention and of tile integrated gradients (within slide, averaged);
the tumour share of each Leiden phenotype with its hazard ratio; deletion-curve gaps; the report's
size and the render check (noted as not run where Chromium is missing). Writes RUN_DIR/biomarker_check.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import write_json


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    truth, adir = out / "cohort" / "truth", out / "attributions"
    r: dict = {}
    planted = json.loads((truth / "genes.json").read_text())["planted"]
    genes = pd.read_csv(adir / "genes.csv").set_index("gene")
    bio = pd.read_csv(adir / "biomarkers.csv").set_index("name")
    r["planted_genes"] = {
        g: {
            "rank": int(genes.loc[g, "rank"]),
            "of": len(genes),
            "direction_correct": bool((genes.loc[g, "direction_rho"] > 0) == (beta > 0)),
            "univariate_hr": float(bio.loc[g, "uni_hr"]) if g in bio.index else None,
            "fdr": float(bio.loc[g, "uni_fdr"]) if g in bio.index else None,
        }
        for g, beta in planted.items()
        if g in genes.index
    }
    from sklearn.metrics import roc_auc_score

    t = pd.read_csv(adir / "tiles.csv").merge(pd.read_csv(truth / "tiles.csv"), on=["slide_id", "x", "y"])
    for col in ("attn", "ig"):
        aucs = [roc_auc_score(s.is_tumour, s[col]) for _, s in t.groupby("slide_id") if s.is_tumour.nunique() == 2]
        r[f"{col}_auc_tumour_vs_other"] = {"auc": float(np.mean(aucs)), "slides": len(aucs)}
    if "phenotype" in t:
        share = t.groupby("phenotype").is_tumour.mean()
        r["phenotypes"] = {
            f"P{k}": {
                "tumour_share": float(v),
                "tiles": int((t.phenotype == k).sum()),
                "univariate_hr": float(bio.loc[f"P{k}", "uni_hr"]) if f"P{k}" in bio.index else None,
                "fdr": float(bio.loc[f"P{k}", "uni_fdr"]) if f"P{k}" in bio.index else None,
            }
            for k, v in share.items()
        }
    f = json.loads((adir / "faithfulness.json").read_text())
    r["deletion"] = {
        k: {"mean_abs_delta": f[k]["auc"], "gap_vs_random": f[k]["gap"]} for k in ("tiles", "genes") if k in f
    }
    from pipeline.outputs.render_check import render_check

    rep = out / "report.html"
    try:
        r["report"] = {"bytes": rep.stat().st_size, **render_check(rep)}
    except FileNotFoundError as e:  # no headless Chromium here: the attribution checks above still stand
        r["report"] = {"bytes": rep.stat().st_size, "render_check": f"not run: {e}"}
    write_json(out / "biomarker_check.json", r)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
