"""Cross-validation results: the folds table, each fold's test scores, the mean +- sd, out-of-fold risks;
the model against the best centralised baseline per fold; the spread over seeds.

Computes only; :func:`pipeline.crossval.run_cv` trains the folds and writes these tables through
:mod:`pipeline.files`. Folds are dealt by :func:`pipeline.training.splits.assign_folds` (or one per site,
:func:`~pipeline.training.splits.site_folds`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from data_specs.cohort import Cohort
from pipeline.training.data import CohortData

METRICS = ("cindex", "uno_cindex")  # per fold; their mean +- sd over folds (and over seeds) are reported


def folds_table(cohort: Cohort, folds: np.ndarray, risk: np.ndarray | None = None) -> pd.DataFrame:
    """``folds.csv`` (patient_id, site, event, fold) or, with ``risk`` (out-of-fold log hazard per patient),
    ``cv_risk_scores.csv`` (patient_id, site, fold, log_hz, time, event)."""
    pats = cohort.patients
    df = pd.DataFrame({"patient_id": [p.patient_id for p in pats], "site": [p.site for p in pats]})
    if risk is None:
        df["event"] = [int(p.event) for p in pats]
        df["fold"] = folds
        return df
    df["fold"] = folds
    df["log_hz"] = np.round(risk, 6)
    df["time"] = [p.time for p in pats]
    df["event"] = [int(p.event) for p in pats]
    return df


def score_fold(
    fold: int, data: CohortData, splits: dict[str, np.ndarray], log_hz: np.ndarray, n_boot: int = 0, seed: int = 0
) -> dict:
    """One fold's row of ``cv_results.json``: sizes, Harrell's C pooled and per site, Uno's C (censoring
    weights from the fold's training patients) on the test patients, whose ``log_hz [n_test]`` is given."""
    from pipeline.stats.metrics import bootstrap_ci, harrell_cindex, survival_y, uno_cindex

    te, tr = splits["test"], splits["train"]
    time, event, site = data.time[te], data.event[te], data.site[te]
    uno, why = uno_cindex(time, event, log_hz, survival_y(data.event[tr], data.time[tr]), None)
    per_site = {
        s: {
            "n": int((site == j).sum()),
            "events": int(event[site == j].sum()),
            "cindex": harrell_cindex(time[site == j], event[site == j], log_hz[site == j]),
        }
        for j, s in enumerate(data.sites)
        if (site == j).any()
    }
    row = {
        "fold": fold,
        "n_train": len(tr),
        "n_val": len(splits["val"]),
        "n_test": len(te),
        "test_events": int(event.sum()),
        "cindex": harrell_cindex(time, event, log_hz),
        "cindex_ci": None,
        "uno_cindex": uno,
        "per_site": per_site,
    }
    if n_boot:  # patient-bootstrap 95% CI of the fold's test C-index
        b = bootstrap_ci(lambda i: {"c": harrell_cindex(time[i], event[i], log_hz[i])}, len(te), n_boot, seed)
        row["cindex_ci"] = b["c"]["ci"]
    if why:
        row["notes"] = {"uno_cindex": why}
    return row


def mean_sd(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean and sd (ddof=1) of ``key`` over the folds with a finite value (NaN when too few)."""
    v = np.array([r[key] for r in rows], float)
    v = v[np.isfinite(v)]
    return (float(v.mean()) if len(v) else float("nan"), float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def without_modality(data: CohortData, m: str) -> CohortData:
    """A copy of ``data`` without modality ``m`` at all (``slides``, ``omics`` or ``clinical``), for retraining
    without it: a model built from it has no branch for ``m`` (unlike masking at inference)."""
    if m == "slides":
        return replace(data, bags=None, tiles=None, feature_dim=0, feature_attrs=None)
    if m == "omics":
        return replace(data, omics=None, omics_present=None, genes=[], pathways=[], pathway_genes=[], omics_norm=None)
    if m == "clinical":
        return replace(data, clinical=None, clinical_present=None, clinical_columns=[], clinical_norm=None)
    raise ValueError(f"modality '{m}': expected slides, omics or clinical")


def baseline_row(bl: dict) -> dict:
    """A fold's baselines in brief (from :func:`pipeline.outputs.baselines.fit_baselines` with the model's risks):
    each Coxnet's test C-index, the best one by CV on train+val, and model - best with its paired CI."""
    res = bl.get("baselines", {})
    out: dict = {"label": bl.get("label", "centralised"), "cindex": {k: v["cindex"] for k, v in res.items()}}
    if "model_minus_best" in bl:
        d = bl["model_minus_best"]
        out.update(best=bl["best"], best_cindex=res[bl["best"]]["cindex"], model_minus_best=d["diff"],
                   model_minus_best_ci=d.get("ci"), verdict=d["verdict"])  # fmt: skip
    if bl.get("notes"):
        out["notes"] = bl["notes"]
    return out


def _mean_sd(v: list[float]) -> dict[str, float | int]:
    a = np.asarray([x for x in v if x is not None], float)
    a = a[np.isfinite(a)]
    nan = float("nan")
    return {"mean": float(a.mean()) if len(a) else nan, "sd": float(a.std(ddof=1)) if len(a) > 1 else nan, "n": len(a)}


def summarise(rows: list[dict], k: int, seed: int, mode: str, folds_by: str = "patient") -> dict:
    """The ``cv_results.json`` content: ``k``, ``seed``, ``mode``, ``folds_by`` (``patient`` or ``site``), C-index
    and Uno's C mean +- sd, ``folds``; with baselines, the mean (model - best baseline) over folds; with the
    modality ablation, the mean C-index drop when each modality is left out of training."""
    c_mean, c_sd = mean_sd(rows, "cindex")
    u_mean, u_sd = mean_sd(rows, "uno_cindex")
    out = {
        "k": k,
        "seed": seed,
        "mode": mode,
        "folds_by": folds_by,
        "cindex_mean": c_mean,
        "cindex_sd": c_sd,
        "uno_cindex_mean": u_mean,
        "uno_cindex_sd": u_sd,
    }
    if any("model_minus_best" in r.get("baselines", {}) for r in rows):
        out["model_minus_best"] = _mean_sd([r.get("baselines", {}).get("model_minus_best") for r in rows])
    ablated = sorted({m for r in rows for m in r.get("retrained_without", {})})
    if ablated:
        out["retrained_without"] = {m: _mean_sd([r["retrained_without"].get(m, {}).get("drop") for r in rows])
                                    for m in ablated}  # fmt: skip
    return {**out, "folds": rows}


def summarise_seeds(runs: list[dict]) -> dict:
    """``cv_summary.json``: each seed's cross-validation (:func:`summarise`) reduced to every metric's mean +- sd
    over seeds (``sd`` NaN for one seed): the folds' mean C-index and Uno's C, model - best baseline, each
    ablation's drop, and per fold (per held-out site with ``folds_by: site``) the test C-index."""
    first = runs[0]
    out: dict = {k: first[k] for k in ("k", "mode", "folds_by")}
    out["seeds"] = [r["seed"] for r in runs]
    for key in METRICS:
        out[key] = _mean_sd([r[f"{key}_mean"] for r in runs])
    if "model_minus_best" in first:
        out["model_minus_best"] = _mean_sd([r.get("model_minus_best", {}).get("mean") for r in runs])
    if "retrained_without" in first:
        out["retrained_without"] = {m: _mean_sd([r["retrained_without"].get(m, {}).get("mean") for r in runs])
                                    for m in first["retrained_without"]}  # fmt: skip
    per_fold = []
    for f, row in enumerate(first["folds"]):
        cs = [r["folds"][f]["cindex"] for r in runs]
        rec = {"fold": f, **({"site": row["site"]} if "site" in row else {}), "cindex": _mean_sd(cs), "by_seed": cs}
        if len(runs) == 1:
            rec["cindex_ci"] = row.get("cindex_ci")
        if "model_minus_best" in row.get("baselines", {}):
            rec["model_minus_best"] = _mean_sd([r["folds"][f]["baselines"].get("model_minus_best") for r in runs])
        per_fold.append(rec)
    out["per_fold"] = per_fold
    return out


def _pm(d: dict | None, signed: bool = False) -> str:
    if not d or not np.isfinite(d.get("mean", np.nan)):
        return "-"
    m = f"{d['mean']:+.3f}" if signed else f"{d['mean']:.3f}"
    return m if not np.isfinite(d.get("sd", np.nan)) else f"{m} +- {d['sd']:.3f}"


def _fold_line(r: dict) -> str:
    ci = r.get("cindex_ci") or [np.nan, np.nan]
    ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if np.isfinite(ci).all() else ""
    held = f"site {r['site']} held out" if "site" in r else f"fold {r['fold']}"
    line = f"  {held}: C-index {r['cindex']:.3f}{ci_s} (n={r['n_test']}, events={r['test_events']})"
    b = r.get("baselines", {})
    if "best" in b:
        line += f"; best Coxnet ({b['best']}) {b['best_cindex']:.3f}, model - baseline {b['model_minus_best']:+.3f}"
    for m, v in r.get("retrained_without", {}).items():
        line += f"; without {m} {v['cindex']:.3f}"
    return line


def cv_lines(runs: list[dict], summary: dict) -> list[str]:
    """The console summary of a cross-validation: each fold of the first seed (C-index with its 95% CI, the best
    centralised baseline), then every metric's mean +- sd over folds and, with several seeds, over seeds."""
    first = runs[0]
    how = "leave-site-out" if first.get("folds_by") == "site" else f"{first['k']}-fold"
    lines = [f"{how} {first['mode']} cross-validation, seed {first['seed']}:", *map(_fold_line, first["folds"])]
    over = "over folds" if len(runs) == 1 else f"over {len(runs)} seeds (each seed's mean over folds)"
    key = "mean" if len(runs) > 1 else None

    def stat(r: dict, name: str) -> dict:  # mean +- sd over folds (one seed) or over seeds
        return summary[name] if key else {"mean": r[f"{name}_mean"], "sd": r[f"{name}_sd"]}

    lines.append(f"C-index {_pm(stat(first, 'cindex'))} (Uno {_pm(stat(first, 'uno_cindex'))}), {over}")
    mmb = summary.get("model_minus_best") if key else first.get("model_minus_best")
    if mmb:
        lines.append(f"model - best centralised Coxnet baseline: {_pm(mmb, True)} {over}")
    for m, d in (summary if key else first).get("retrained_without", {}).items():
        lines.append(f"retrained without {m}: C-index drop {_pm(d, True)} {over}")
    if len(runs) > 1:
        per = [f"{p.get('site', p['fold'])} {_pm(p['cindex'])}" for p in summary["per_fold"]]
        lines.append(f"held-out C-index per {'site' if first.get('folds_by') == 'site' else 'fold'}, mean +- sd over "
                     f"{len(runs)} seeds: " + ", ".join(per))  # fmt: skip
    return lines
