"""Test C-index of each fusion / pooling / loss on the demo cohort, against the planted oracle.

    python -m pipeline.cli demo --build-only --out runs/demo      # cohort (or reuse one)
    python -m pipeline.cli extract runs/demo/cohort/cohort.yaml --out runs/demo
    python scripts/demo_fusions.py --cohort runs/demo/cohort/cohort.yaml --out runs/demo

Reuses the features extracted under ``--out`` (the config's encoder settings) and trains every variant
centralised on the same split with the same seed (validation loss picks the epoch; the test patients
are used only for the printed numbers). The oracle is the planted log-hazard from ``cohort/truth``
scored on the same test patients. Variants: ``--variants "concat" "bilinear" "coattention"``, each a
space-free list of ``key=value`` overrides joined by ``,`` (a bare name means ``model.fusion=NAME``).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import write_json

DEFAULT_VARIANTS = [
    "concat",
    "bilinear",
    "coattention",
    "concat,model.mil=transmil",
    "coattention,model.mil=transmil",
    "concat,train.loss=nll",
    "bilinear,train.loss=nll",
    "coattention,train.loss=nll",
]


def _overrides(variant: str) -> list[str]:
    return [v if "=" in v else f"model.fusion={v}" for v in variant.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, required=True, help="the demo cohort.yaml")
    ap.add_argument("--out", type=Path, required=True, help="run folder holding features/ (results written here)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="overrides for every variant")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    from data_specs import load_cohort, resolve_config
    from pipeline.slides.features import features_dir
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.data import load_run_data
    from pipeline.training.module import fit_local
    from pipeline.training.predict import predict

    cohort = load_cohort(args.cohort)
    base = resolve_config(None, [*args.overrides, "federated.enabled=false"], out=args.out)
    fdir = features_dir(args.out, base.extract)
    if not fdir.is_dir():
        raise SystemExit(f"no features in {fdir}: run `histofuse extract {args.cohort} --out {args.out}` first")
    data = load_run_data(cohort, base)
    truth = pd.read_csv(args.cohort.parent / "truth" / "patients.csv").set_index("patient_id")
    test = data.splits["test"]
    t, e = data.time[test], data.event[test]
    oracle = truth.loc[[data.patient_ids[i] for i in test], "oracle_log_hz"].to_numpy()
    c_oracle = harrell_cindex(t, e, oracle)
    print(f"demo cohort: {len(data.patient_ids)} patients, test {len(test)} ({int(e.sum())} events)")
    print(f"oracle (planted log-hazard) test C-index: {c_oracle:.3f}")
    print(f"{'variant':40s} {'test C':>7s} {'val C':>7s} {'best ep':>7s} {'train s':>8s}")
    rows = []
    for v in args.variants:
        cfg = resolve_config(None, [*args.overrides, "federated.enabled=false", *_overrides(v)], out=args.out)
        t0 = time.perf_counter()
        module, info = fit_local(data, cfg)
        secs = time.perf_counter() - t0
        lh = predict(module.model.eval(), data, test).log_hz
        c = harrell_cindex(t, e, lh)
        rows.append({"variant": v, "test_cindex": c, "oracle_test_cindex": c_oracle, "train_s": secs, **info})
        print(f"{v:40s} {c:7.3f} {info['best_val_cindex'] or float('nan'):7.3f} {info['best_epoch']:7d} {secs:8.0f}")
    write_json(args.out / "demo_fusions.json", rows)
    print(f"mean test C over variants: {np.mean([r['test_cindex'] for r in rows]):.3f}; oracle {c_oracle:.3f}")


if __name__ == "__main__":
    main()
