"""Cross-validation by patient: site- and event-stratified folds, seeded and deterministic.

    histofuse cv COHORT.yaml --folds 5 [--out DIR] [--federated] [--set train.seed=1 ...]

:func:`assign_folds` deals each (site, event) stratum's patients, shuffled with ``seed``, round-robin
over the ``k`` folds (continuing the deal across strata, so fold sizes differ by at most one and every
site's events spread over the folds). For fold ``f``: test = the patients of fold ``f``; from the rest,
``train.val_fraction`` of each (site, event) stratum is carved (seeded) for validation / model
selection; the rest trains. Normalisation (omics panel, clinical categories) is refitted on each
fold's training patients, from per-site summaries, as in a normal run. Each fold trains through
:func:`pipeline.run.stage_train` (centralised by default; federated with ``federated.enabled``), and
its test patients are scored with Harrell's and Uno's C-index (:mod:`pipeline.evaluate`).

Outputs in ``DIR/``::

    folds.csv            patient_id, site, event, fold
    fold_<f>/            the fold's model.pt, train_summary.json, config.yaml
    cv_risk_scores.csv   out-of-fold log hazard of every patient (each from the model that did not see it)
    cv_results.json      per fold (n, events, C-index pooled and per site, Uno's C) and mean +- sd

The cohort's own ``split`` column is ignored: every patient is tested exactly once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from data_specs.cohort import Cohort
from data_specs.config import RunConfig
from pipeline.training.splits import assign_folds, fold_splits

log = logging.getLogger(__name__)


def run_cv(cohort: Cohort, cfg: RunConfig, k: int = 5, progress: bool = False) -> dict:
    """Train and test ``k`` folds; writes the files listed in the module docstring under ``cfg.out``.

    Returns the ``cv_results.json`` content: ``folds`` (list of per-fold dicts), ``cindex_mean``,
    ``cindex_sd`` (ddof=1), ``uno_cindex_mean``/``_sd``, ``k``, ``seed``, ``mode``.
    """
    from pipeline.slides.features import features_dir
    from pipeline.stages import stage_train
    from pipeline.stats.metrics import _y, harrell_cindex, uno_cindex
    from pipeline.training.bundle import load_bundle
    from pipeline.training.data import build_data
    from pipeline.training.predict import predict_log_hz

    t = cfg.train
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if any(p.split for p in cohort.patients):
        log.info("cross-validation ignores the cohort's split column: every patient is tested once")
    folds = assign_folds(cohort, k, t.seed)
    pids = [p.patient_id for p in cohort.patients]
    pd.DataFrame(
        {
            "patient_id": pids,
            "site": [p.site for p in cohort.patients],
            "event": [int(p.event) for p in cohort.patients],
            "fold": folds,
        }
    ).to_csv(out / "folds.csv", index=False)
    fdir = features_dir(out, cfg.extract) if any(p.slides for p in cohort.patients) else None
    oof = np.full(len(pids), np.nan)
    rows = []
    for f in range(k):
        splits = fold_splits(cohort, folds, f, t.val_fraction, t.seed)
        data = build_data(
            cohort,
            fdir,
            splits=splits,
            seed=t.seed,
            gene_panel=cfg.omics.gene_panel,
            max_genes=cfg.omics.max_genes,
            gene_sets=cfg.omics.gene_sets,
            min_pathway_genes=cfg.omics.min_pathway_genes,
        )
        fcfg = cfg.model_copy(update={"out": out / f"fold_{f}"})
        fcfg.save(fcfg.out / "config.yaml")
        model_path = stage_train(cohort, fcfg, progress=progress, data=data)
        model, _ = load_bundle(model_path)
        te, tr = splits["test"], splits["train"]
        lh, _ = predict_log_hz(model, data, te)
        oof[te] = lh
        time, event, site = data.time[te], data.event[te], data.site[te]
        uno, why = uno_cindex(time, event, lh, _y(data.event[tr], data.time[tr]), None)
        per_site = {
            s: {
                "n": int((site == j).sum()),
                "events": int(event[site == j].sum()),
                "cindex": harrell_cindex(time[site == j], event[site == j], lh[site == j]),
            }
            for j, s in enumerate(data.sites)
            if (site == j).any()
        }
        row = {
            "fold": f,
            "n_train": len(tr),
            "n_val": len(splits["val"]),
            "n_test": len(te),
            "test_events": int(event.sum()),
            "cindex": harrell_cindex(time, event, lh),
            "uno_cindex": uno,
            "per_site": per_site,
        }
        if why:
            row["notes"] = {"uno_cindex": why}
        rows.append(row)
        log.info(
            "fold %d/%d: test C-index %.3f (n=%d, events=%d)", f + 1, k, row["cindex"], len(te), row["test_events"]
        )

    def stat(key: str) -> tuple[float, float]:
        v = np.array([r[key] for r in rows], float)
        v = v[np.isfinite(v)]
        return (float(v.mean()) if len(v) else float("nan"), float(v.std(ddof=1)) if len(v) > 1 else float("nan"))

    c_mean, c_sd = stat("cindex")
    u_mean, u_sd = stat("uno_cindex")
    res = {
        "k": k,
        "seed": t.seed,
        "mode": "federated" if cfg.federated.enabled else "centralised",
        "cindex_mean": c_mean,
        "cindex_sd": c_sd,
        "uno_cindex_mean": u_mean,
        "uno_cindex_sd": u_sd,
        "folds": rows,
    }
    pd.DataFrame(
        {
            "patient_id": pids,
            "site": [p.site for p in cohort.patients],
            "fold": folds,
            "risk": np.round(oof, 6),
            "time": [p.time for p in cohort.patients],
            "event": [int(p.event) for p in cohort.patients],
        }
    ).to_csv(out / "cv_risk_scores.csv", index=False)
    tmp = out / ".cv_results.json.tmp"
    tmp.write_text(json.dumps(res, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    tmp.replace(out / "cv_results.json")
    return res
