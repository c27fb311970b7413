"""How well a run on the demo cohort recovered the planted truth.

For every demo: the oracle C-index on the run's test patients, the planted genes' ranks, attention on
tumour vs other tiles. For the local-morphology demo (truth tiles with ``is_carrier``) also whether the
tile attributions find the carrier tiles (attention and integrated-gradient AUC, carrier vs other tiles
within each carrier slide; the share of carrier slides whose top tile is a carrier), the tile deletion
curves' gaps against random (from ``faithfulness.json``) and the centralised Coxnet baselines of the run
(``metrics.json``), whose slide block is mean-pooled tile features.

Where the run wrote a biomarker table, ``planted_gene_biomarkers`` says for each planted gene whether it was a
tested candidate and its Cox hazard ratio, p and FDR on the held-out patients.
"""

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
    """Oracle C-index on the run's test patients, planted genes' ranks, attention on tumour vs other tiles;
    on the local-morphology demo also ``local_morphology`` (see the module docstring).

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
    if rf.genes.is_file():
        r.update(_gene_check(pd.read_csv(rf.genes), planted))
    if rf.biomarkers.is_file():
        r["planted_gene_biomarkers"] = _biomarker_check(rf, planted)
    if rf.tiles.is_file():
        t = pd.read_csv(rf.tiles).merge(pd.read_csv(truth / TRUTH_TILES), on=["slide_id", "x", "y"], how="left")
        if t.is_tumour.isna().any():
            raise ValueError(f"{rf.tiles}: some attended tiles are not in the demo's tile truth: grid misaligned")
        r["attention_tumour_vs_other"] = {
            "tumour": float(t.attn_rel[t.is_tumour == 1].mean()),
            "other": float(t.attn_rel[t.is_tumour == 0].mean()),
            **_within_slide_auc(t, "is_tumour", "attn"),
        }
        for col in ("ig", "linear_share"):  # signed: tumour tiles raise the planted risk
            if col in t.columns:
                r[f"{col}_tumour_vs_other"] = _within_slide_auc(t, "is_tumour", col)
        if "is_carrier" in t.columns:
            r["local_morphology"] = _local_check(t, rf)
    write_json(rf.truth_check, r)
    return r


def _gene_check(g: pd.DataFrame, planted: dict[str, float]) -> dict:
    """Planted genes' ranks in ``genes.csv`` and whether each one's direction is the planted one."""
    return {
        "n_genes": len(g),
        "planted_gene_ranks": {k: int(g.loc[g.gene == k, "rank"].iloc[0]) for k in planted if (g.gene == k).any()},
        "planted_gene_direction_correct": {
            k: bool((g.loc[g.gene == k, "direction_rho"].iloc[0] > 0) == (beta > 0))
            for k, beta in planted.items()
            if (g.gene == k).any()
        },
    }


def _biomarker_check(rf: RunFiles, planted: dict[str, float]) -> dict:
    """The planted genes in the biomarker table (``biomarkers.csv``): whether each is a tested candidate, its
    univariate hazard ratio, p and FDR on the held-out patients (None where not tested), and the table's size."""
    b = pd.read_csv(rf.biomarkers)
    tested = b[b.uni_p.notna()]
    cols = ("uni_hr", "uni_p", "uni_fdr", "multi_hr", "multi_fdr")
    genes = {}
    for g in planted:
        row = b[b.name == g]
        genes[g] = {"candidate": bool(len(row) and row.top_candidate.iloc[0])} | {
            k: (float(row[k].iloc[0]) if len(row) and pd.notna(row[k].iloc[0]) else None) for k in cols
        }
    return {
        "genes": genes,
        "tests": int(len(tested)),
        "gene_tests": int((tested.kind == "gene").sum()),
        "events": int(b.events.max()) if len(b) else 0,
        "patients": int(b.n.max()) if len(b) else 0,
        "fdr_below_0.05": [g for g, v in genes.items() if v["uni_fdr"] is not None and v["uni_fdr"] < 0.05],
    }


def _within_slide_auc(t: pd.DataFrame, label: str, score: str) -> dict:
    """ROC AUC of ``score`` for ``label`` within each slide (attributions are relative within a bag),
    averaged over the slides holding both kinds of tile; ``slides`` counts them."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(s[label], s[score]) for _, s in t.groupby("slide_id") if s[label].nunique() == 2]
    return {"auc": float(np.mean(aucs)) if aucs else float("nan"), "slides": len(aucs)}


def _local_check(t: pd.DataFrame, rf: RunFiles) -> dict:
    """Carrier vs other tiles by attention and IG, deletion gaps, and the run's mean-pool Coxnet baselines."""
    car = t[t.groupby("slide_id").is_carrier.transform("max") == 1]  # the test slides that hold carriers
    top = car.loc[car.groupby("slide_id").attn.idxmax()]
    r: dict = {
        "carrier_slides": int(car.slide_id.nunique()),
        "test_slides": int(t.slide_id.nunique()),
        "attn_rel_carrier": float(car.attn_rel[car.is_carrier == 1].mean()) if len(car) else float("nan"),
        "attn_rel_other": float(car.attn_rel[car.is_carrier == 0].mean()) if len(car) else float("nan"),
        "attention": _within_slide_auc(car, "is_carrier", "attn"),
        "top_attended_is_carrier": float(top.is_carrier.mean()) if len(top) else float("nan"),
    }
    if "ig" in t.columns:
        r["ig"] = _within_slide_auc(car, "is_carrier", "ig")  # signed: carriers raise the planted risk
        r["abs_ig"] = _within_slide_auc(car.assign(abs_ig=car.ig.abs()), "is_carrier", "abs_ig")
    if "linear_share" in t.columns:
        r["linear_share"] = _within_slide_auc(car, "is_carrier", "linear_share")
    if rf.faithfulness.is_file():
        f = json.loads(rf.faithfulness.read_text()).get("tiles", {})
        r["deletion"] = {"auc": f.get("auc", {}), "gap_vs_random": f.get("gap", {}), "patients": f.get("patients")}
    if rf.metrics.is_file():
        b = json.loads(rf.metrics.read_text()).get("baselines", {}).get("baselines", {})
        r["coxnet_test_cindex"] = {k: v.get("cindex") for k, v in b.items()}
    return r


def summary_lines(r: dict) -> list[str]:
    """The console lines for a :func:`check_demo` result."""
    lines = [f"oracle C-index on the same test patients: {r['oracle_test_cindex']:.3f}"]
    if "planted_gene_ranks" in r:
        lines.append(f"planted gene ranks (of {r['n_genes']}): {r['planted_gene_ranks']}")
    if "attention_tumour_vs_other" in r:
        a = r["attention_tumour_vs_other"]
        lines.append(
            f"mean relative attention: tumour tiles {a['tumour']:.2f}, other tiles {a['other']:.2f}; AUC {a['auc']:.3f}"
        )
        more = [
            f"{k} {r[f'{k}_tumour_vs_other']['auc']:.3f}" for k in ("ig", "linear_share") if f"{k}_tumour_vs_other" in r
        ]
        if more:
            lines.append("tumour vs other tiles within a slide, AUC: " + ", ".join(more))
    bio = r.get("planted_gene_biomarkers")
    if bio:
        fdr = {g: "not tested" if v["uni_fdr"] is None else f"{v['uni_fdr']:.3g}" for g, v in bio["genes"].items()}
        lines.append(f"planted genes' FDR in the biomarker table ({bio['tests']} tests, {bio['events']} events): {fdr}")
    loc = r.get("local_morphology")
    if loc:
        ig = loc.get("ig", {}).get("auc", float("nan"))
        lines.append(
            f"carrier tiles ({loc['carrier_slides']} of {loc['test_slides']} test slides): attention AUC "
            f"{loc['attention']['auc']:.3f}, IG AUC {ig:.3f}"
            + (f", linear_share AUC {loc['linear_share']['auc']:.3f}" if "linear_share" in loc else "")
            + f", top-attended tile a carrier in "
            f"{loc['top_attended_is_carrier']:.0%}; relative attention {loc['attn_rel_carrier']:.2f} vs "
            f"{loc['attn_rel_other']:.2f}"
        )
        gap = loc.get("deletion", {}).get("gap_vs_random", {})
        if gap:
            lines.append("tile deletion gap vs random: " + ", ".join(f"{k} {v:+.3f}" for k, v in gap.items()))
        if loc.get("coxnet_test_cindex"):
            cox = ", ".join(f"{k} {v:.3f}" for k, v in loc["coxnet_test_cindex"].items() if v is not None)
            lines.append(f"Coxnet test C-index (slides = mean-pooled tiles): {cox}")
    return lines
