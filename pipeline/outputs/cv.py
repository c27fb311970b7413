"""Cross-validation results: the folds table, each fold's test scores, the mean +- sd, out-of-fold risks.

Computes only; :func:`pipeline.stages.run_cv` trains the folds and writes these tables through
:mod:`pipeline.files`. Folds are dealt by :func:`pipeline.training.splits.assign_folds`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_specs.cohort import Cohort
from pipeline.training.data import CohortData


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


def score_fold(fold: int, data: CohortData, splits: dict[str, np.ndarray], log_hz: np.ndarray) -> dict:
    """One fold's row of ``cv_results.json``: sizes, Harrell's C pooled and per site, Uno's C (censoring
    weights from the fold's training patients) on the test patients, whose ``log_hz [n_test]`` is given."""
    from pipeline.stats.metrics import harrell_cindex, survival_y, uno_cindex

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
        "uno_cindex": uno,
        "per_site": per_site,
    }
    if why:
        row["notes"] = {"uno_cindex": why}
    return row


def mean_sd(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean and sd (ddof=1) of ``key`` over the folds with a finite value (NaN when too few)."""
    v = np.array([r[key] for r in rows], float)
    v = v[np.isfinite(v)]
    return (float(v.mean()) if len(v) else float("nan"), float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def summarise(rows: list[dict], k: int, seed: int, mode: str) -> dict:
    """The ``cv_results.json`` content: ``k``, ``seed``, ``mode``, C-index and Uno's C mean +- sd, ``folds``."""
    c_mean, c_sd = mean_sd(rows, "cindex")
    u_mean, u_sd = mean_sd(rows, "uno_cindex")
    return {
        "k": k,
        "seed": seed,
        "mode": mode,
        "cindex_mean": c_mean,
        "cindex_sd": c_sd,
        "uno_cindex_mean": u_mean,
        "uno_cindex_sd": u_sd,
        "folds": rows,
    }
