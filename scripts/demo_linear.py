"""The linear family on demo cohorts: federated (full-batch fit, penalty by federated CV) and pooled, beside Coxnet.

    python scripts/demo_linear.py DIR [DIR ...] [--set KEY=VALUE ...] [--out summary.json]

Each ``DIR`` holds a demo cohort and its tile features: ``histofuse demo --out DIR`` (or ``histofuse demo
--build-only --out DIR`` then ``histofuse extract --out DIR DIR/cohort/cohort.yaml``). With the default run
config on the demo's own split, this prints the test Harrell C-index of

- the federated linear Cox baseline every federated run reports (:func:`pipeline.outputs.federated_linear.
  fit_federated_linear`: summed full-batch site gradients, server L-BFGS, penalty by federated 5-fold CV within
  each site's non-test patients),
- the same linear family fitted pooled (site-stratified, penalty by 5-fold CV on the pooled non-test patients),
- centralised Coxnet on each modality and on all of them (:func:`pipeline.outputs.baselines.fit_baselines`:
  slides as PCs of mean-pooled tile features, alpha by CV on the non-test patients).

Test patients are only scored.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np


def one(run: Path, overrides: list[str] | None = None) -> dict:
    from data_specs import load_cohort, resolve_config
    from pipeline.outputs.baselines import fit_baselines
    from pipeline.outputs.federated_linear import fit_federated_linear
    from pipeline.outputs.scoring import BaselineSettings
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.data import load_run_data
    from pipeline.training.linear_fit import fit_linear_centralised
    from pipeline.training.module import new_model
    from pipeline.training.predict import predict

    spec = run / "cohort" / "cohort.yaml"
    cfg = resolve_config(None, overrides or [], out=run).model_copy(update={"cohort": spec})
    data = load_run_data(load_cohort(spec), cfg)
    t0 = time.perf_counter()
    fl = fit_federated_linear(data, cfg, settings=BaselineSettings(n_boot=200))
    t_fed = time.perf_counter() - t0
    lin_cfg = cfg.with_overrides(["model.family=linear"])
    model = new_model(data, lin_cfg)
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    pooled = fit_linear_centralised(model, data, idx, lin_cfg)["linear_fit"]
    te = data.splits["test"]
    c_pooled = float(harrell_cindex(data.time[te], data.event[te], predict(model, data, te).log_hz))
    bl = fit_baselines(data, None, BaselineSettings(n_boot=0))["baselines"]
    return {
        "run": run.name,
        "n_test": int(len(te)),
        "federated_linear": fl["cindex"],
        "federated_linear_ci": fl.get("cindex_ci"),
        "federated_penalty": fl["weight_decay"],
        "l1_ratio": cfg.train.linear_l1_ratio,
        "l1_ratio_chosen": fl.get("linear_fit", {}).get("l1_ratio"),
        "relax": cfg.train.linear_relax,
        "relax_chosen": fl.get("linear_fit", {}).get("relax"),
        "slide_pcs": cfg.model.linear_slide_pcs,
        "nonzero": fl.get("linear_fit", {}).get("nonzero"),
        "federated_cv_cindex": fl["val_cindex"],
        "sites_left_out": fl.get("linear_fit", {}).get("sites_left_out"),
        "federated_seconds": t_fed,
        "rounds": fl.get("linear_fit", {}).get("rounds"),
        "pooled_linear": c_pooled,
        "pooled_penalty": pooled["penalty"],
        "pooled_l1_ratio": pooled["l1_ratio"],
        "pooled_relax": pooled.get("relax"),
        "pooled_rounds": pooled["rounds"],
        **{f"coxnet_{k}": v["cindex"] for k, v in bl.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None, help="JSON summary")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override (repeatable)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    from pipeline.files import write_json

    rows = []
    for run in args.runs:
        rows.append(one(run, args.overrides))
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    if args.out is not None:
        write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
