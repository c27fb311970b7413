"""One full histofuse run on TCGA-BRCA clinical data (FLamby's 6 centres and train/test split), with its
report: risk groups fixed on the training patients, Kaplan-Meier separation and log-rank p on the test set.

    python scripts/tcga_brca_report.py --data PATH/TO/tcga_brca [--out runs/tcga_brca_report] [--seed 42]
        [--centralised] [--set section.key=value ...]

The cohort is built exactly as ``scripts/tcga_brca.py`` builds it (15% of each centre's training
patients carved out for validation, seeded). Prints the test-set numbers and writes DIR/report.html.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with brca.csv and train_test_split.csv")
    ap.add_argument("--out", type=Path, default=Path("runs/tcga_brca_report"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--centralised", action="store_true", help="pooled training instead of FedAvg")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from data_specs import load_cohort, resolve_config
    from pipeline.cohorts.tcga_brca import build_cohort
    from pipeline.files import write_text
    from pipeline.outputs.evaluate import stage_evaluate
    from pipeline.outputs.report import build_report
    from pipeline.stages import stage_predict, stage_train
    from pipeline.training.data import load_run_data

    spec = build_cohort(args.data, args.out / "cohort", args.seed)
    cohort = load_cohort(spec)
    ov = [*args.overrides, f"train.seed={args.seed}", f"federated.enabled={str(not args.centralised).lower()}"]
    cfg = resolve_config(None, ov, cohort=spec, out=args.out)
    write_text(args.out / "config.yaml", cfg.to_yaml())
    data = load_run_data(cohort, cfg)
    model = stage_train(cohort, cfg, progress=False, data=data)
    risk = stage_predict(model, cohort, args.out, None, data=data)
    m = stage_evaluate(risk, args.out, "test", config=cfg)
    rep = build_report(
        args.out, f"TCGA-BRCA clinical ({'centralised' if args.centralised else 'FedAvg'}, seed {args.seed})"
    )
    p = m["pooled"]

    def ci(k: str) -> str:
        lo, hi = p.get(f"{k}_ci", [np.nan, np.nan])
        return f"{p[k]:.3f} [{lo:.3f}, {hi:.3f}]"

    print(f"test set: {p['n']} patients, {p['events']} events")
    print(f"Harrell C {ci('cindex')}; Uno C {ci('uno_cindex')}; mean td-AUC {ci('mean_td_auc')}; IBS {ci('ibs')}")
    print(f"log-rank p (risk groups, cut-point from training): {p['logrank_p']:.3g}")
    for g, d in p.get("km_by_group", {}).items():
        print(f"  KM survival, {g} risk: " + ", ".join(f"S({h}) = {v:.3f}" for h, v in d.items()))
    print(f"report: {rep} ({rep.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
