"""TCGA-BRCA clinical survival (FLamby's 6 regional centres and fixed train/test split) through histofuse.

    python scripts/tcga_brca.py --data PATH/TO/tcga_brca [--out runs/tcga_brca] [--seeds 42 43 44 45 46]

Builds a clinical-only cohort spec from FLamby's preprocessed ``brca.csv`` (39 covariates, ``E``,
``T``) and ``train_test_split.csv`` (``fold2`` = ``train_K``/``test_K`` for centre K), carves a
validation set (15% of each centre's training patients, seeded) for model selection, then trains
centralised and federated (FedAvg) models with the default config and prints the pooled test
C-index in FLamby's metric (lifelines ``concordance_index(T, -risk, E)``), mean +- sd over seeds.
The test set is never used for any choice.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def build_cohort(data: Path, out: Path, seed: int) -> Path:
    df = pd.read_csv(data / "brca.csv")
    split = pd.read_csv(data / "train_test_split.csv").set_index("pid")
    df = df[df.pid.isin(split.index)]
    rng = np.random.default_rng(seed)
    rows = []
    for centre, grp in df.groupby(df.pid.map(lambda p: split.loc[p, "fold2"].split("_")[1])):
        tr = [p for p in grp.pid if split.loc[p, "fold"] == "train"]
        val = set(rng.choice(tr, size=int(round(0.15 * len(tr))), replace=False).tolist())
        for _, r in grp.iterrows():
            s = "test" if split.loc[r.pid, "fold"] == "test" else ("val" if r.pid in val else "train")
            rows.append((r.pid, f"centre_{centre}", float(r["T"]), int(r["E"]), "", s))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "patients.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "site", "time", "event", "slides", "split"])
        w.writerows(rows)
    covs = [c for c in df.columns if c not in ("pid", "E", "T")]
    df[["pid", *covs]].rename(columns={"pid": "patient_id"}).to_csv(out / "clinical.csv", index=False)
    spec = out / "cohort.yaml"
    spec.write_text("name: tcga_brca\ntime_unit: days\npatients: patients.csv\nclinical: {path: clinical.csv}\n")
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with brca.csv and train_test_split.csv")
    ap.add_argument("--out", type=Path, default=Path("runs/tcga_brca"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from lifelines.utils import concordance_index

    from data_specs import load_cohort, resolve_config
    from pipeline.run import stage_predict, stage_train

    results: dict[str, list[float]] = {"centralised": [], "federated": []}
    for seed in args.seeds:
        spec = build_cohort(args.data, args.out / f"cohort_seed{seed}", seed)
        cohort = load_cohort(spec)
        for mode in results:
            out = args.out / f"{mode}_seed{seed}"
            ov = [*args.overrides, f"train.seed={seed}", f"federated.enabled={str(mode == 'federated').lower()}"]
            cfg = resolve_config(None, ov, cohort=spec, out=out)
            stage_train(cohort, cfg, progress=False)
            rs = pd.read_csv(stage_predict(out / "model.pt", cohort, out, None))
            te = rs[rs.split == "test"]
            c = concordance_index(te.time, -te.risk, te.event)
            results[mode].append(c)
            print(f"seed {seed} {mode:12s} pooled test C-index {c:.3f} (n={len(te)})", flush=True)
    summary = {m: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "runs": v}
               for m, v in results.items()}  # fmt: skip
    for m, s in summary.items():
        print(f"{m:12s}: {s['mean']:.3f} +- {s['sd']:.3f} over {len(s['runs'])} seeds")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
