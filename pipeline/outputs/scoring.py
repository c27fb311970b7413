"""Scoring shared by the baselines: settings, the C-index with its bootstrap CI and the paired difference
from the model, and the verdict in plain words (:mod:`pipeline.outputs.baselines`,
:mod:`pipeline.outputs.federated_linear`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.stats.metrics import bootstrap_ci, harrell_cindex


@dataclass(frozen=True)
class BaselineSettings:
    """How the baselines are fitted and scored (defaults follow issue 11's measurement)."""

    l1_ratio: float = 0.5
    n_folds: int = 5  # stratified by event, over train + val patients
    n_pcs: int = 10  # principal components of mean-pooled tile features (fitted on training slides)
    alpha_min_ratio: float = 0.01
    n_alphas: int = 50
    n_boot: int = 200
    seed: int = 0


def scored(time: np.ndarray, event: np.ndarray, lh: np.ndarray, ref: np.ndarray | None, s: BaselineSettings) -> dict:
    """Harrell C of ``lh`` with its bootstrap CI and, given ``ref``, the paired CI of ``C(ref) - C(lh)``."""

    def stat(i: np.ndarray) -> dict[str, float]:
        c = harrell_cindex(time[i], event[i], lh[i])
        return {"c": c} if ref is None else {"c": c, "d": harrell_cindex(time[i], event[i], ref[i]) - c}

    out: dict = {"cindex": harrell_cindex(time, event, lh), "n": len(time), "events": int(event.sum())}
    b = bootstrap_ci(stat, len(time), s.n_boot, s.seed) if s.n_boot else {}
    out["cindex_ci"] = b.get("c", {}).get("ci")
    if ref is not None:
        d = harrell_cindex(time, event, ref) - out["cindex"]
        out["model_minus_this"] = {"diff": d, "ci": b.get("d", {}).get("ci"), "valid": b.get("d", {}).get("valid")}
    return out


def verdict(d: dict) -> str:
    """Plain words for (model - baseline): loses / wins when the paired CI excludes 0."""
    ci = d.get("ci") or [None, None]
    diff = d.get("diff")
    if diff is None or not np.isfinite(diff):
        return "not comparable (no C-index on these test patients)"
    if ci[0] is None or not (np.isfinite(ci[0]) and np.isfinite(ci[1])):
        word = "loses" if diff < 0 else "wins" if diff > 0 else "ties"
        return f"the model {word} on the point estimate (too few test patients for a CI)"
    if ci[1] < 0:
        return "the model loses"
    if ci[0] > 0:
        return "the model wins"
    return f"the model is {'lower' if diff < 0 else 'higher' if diff > 0 else 'equal'}, within noise (CI contains 0)"
