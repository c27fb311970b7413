"""TCGA-BRCA clinical survival: histofuse pooled training against scikit-survival baselines, FLamby's split.

    python scripts/tcga_baselines.py --data ../shared/data/tcga_brca [--out runs/tcga_baselines] \\
        [--seeds 42 43 44 45 46] [--skip-histofuse] [--set train.epochs=60 ...]

For each seed, the cohort is built exactly as ``scripts/tcga_brca.py`` builds it (FLamby's fixed
train/test split; 15% of each centre's training patients carved out, seeded, as a validation set).
Every method is fitted on the training patients only, its hyperparameters are chosen on the
validation patients only, and the test patients are scored once:

- ``CoxnetSurvivalAnalysis`` (scikit-survival; features standardised on the training patients): the
  whole alpha path for each ``l1_ratio`` in {0.1, 0.5, 0.9, 1.0}; the (l1_ratio, alpha) with the best
  validation C-index wins.
- ``RandomSurvivalForest`` (scikit-survival, 300 trees): ``min_samples_leaf`` in {5, 15, 30} x
  ``max_features`` in {sqrt, 0.5}; the best validation C-index wins.
- histofuse, pooled (centralised) training with the run config (defaults <- ``--set``), through the
  same ``stage_train``/``stage_predict`` functions as the CLI.

Metric: FLamby's, lifelines ``concordance_index(T, -risk, E)`` on the pooled test set; mean +- sd
over seeds, beside FLamby's published pooled-training 0.704.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cohorts.tcga_brca import build_cohort
from pipeline.files import write_json

FLAMBY_POOLED = 0.704
COXNET_L1 = (0.1, 0.5, 0.9, 1.0)
RSF_GRID = [{"min_samples_leaf": m, "max_features": f} for m in (5, 15, 30) for f in ("sqrt", 0.5)]


def _cindex(time_: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    from lifelines.utils import concordance_index

    return float(concordance_index(time_, -np.asarray(risk, float), event))


def load_split(cohort_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{split: (X [n, C], time [n], event [n])}`` from the cohort folder ``build_cohort`` wrote."""
    pts = pd.read_csv(cohort_dir / "patients.csv", dtype={"patient_id": str})
    clin = pd.read_csv(cohort_dir / "clinical.csv", dtype={"patient_id": str}).set_index("patient_id")
    out = {}
    for s in ("train", "val", "test"):
        p = pts[pts.split == s]
        out[s] = (clin.loc[p.patient_id].to_numpy(float), p.time.to_numpy(float), p.event.to_numpy(bool))
    return out


def _y(t: np.ndarray, e: np.ndarray):
    from sksurv.util import Surv

    return Surv.from_arrays(event=e, time=t)


def fit_coxnet(d: dict, seed: int) -> tuple[float, dict]:
    """Elastic-net Cox: best (l1_ratio, alpha) on validation; returns (test C-index, choice)."""
    from sklearn.preprocessing import StandardScaler
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    (xtr, ttr, etr), (xva, tva, eva), (xte, tte, ete) = d["train"], d["val"], d["test"]
    sc = StandardScaler().fit(xtr)
    xtr, xva, xte = sc.transform(xtr), sc.transform(xva), sc.transform(xte)
    best: tuple[float, float, float, object] | None = None
    for l1 in COXNET_L1:
        m = CoxnetSurvivalAnalysis(l1_ratio=l1, alpha_min_ratio=0.01, n_alphas=60, max_iter=200_000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.fit(xtr, _y(ttr, etr))
        for a in m.alphas_:
            c = _cindex(tva, eva, m.predict(xva, alpha=a))
            if best is None or c > best[0]:
                best = (c, l1, float(a), m)
    assert best is not None
    c_val, l1, a, m = best
    test = _cindex(tte, ete, m.predict(xte, alpha=a))  # type: ignore[attr-defined]
    return test, {"l1_ratio": l1, "alpha": a, "val_cindex": c_val}


def fit_rsf(d: dict, seed: int) -> tuple[float, dict]:
    """Random survival forest: best grid point on validation; returns (test C-index, choice)."""
    from sksurv.ensemble import RandomSurvivalForest

    (xtr, ttr, etr), (xva, tva, eva), (xte, tte, ete) = d["train"], d["val"], d["test"]
    best: tuple[float, dict, object] | None = None
    for hp in RSF_GRID:
        m = RandomSurvivalForest(n_estimators=300, n_jobs=2, random_state=seed, **hp).fit(xtr, _y(ttr, etr))
        c = _cindex(tva, eva, m.predict(xva))
        if best is None or c > best[0]:
            best = (c, hp, m)
    assert best is not None
    c_val, hp, m = best
    return _cindex(tte, ete, m.predict(xte)), {**hp, "val_cindex": c_val}  # type: ignore[attr-defined]


def fit_histofuse(spec: Path, out: Path, seed: int, overrides: list[str]) -> tuple[float, dict]:
    """Pooled (centralised) histofuse training through the CLI's stage functions."""
    from data_specs import load_cohort, resolve_config
    from data_specs.artifacts import RunFiles
    from pipeline.stages import stage_predict, stage_train

    cohort = load_cohort(spec)
    cfg = resolve_config(None, [*overrides, f"train.seed={seed}", "federated.enabled=false"], cohort=spec, out=out)
    stage_train(cohort, cfg, progress=False)
    rs = pd.read_csv(stage_predict(RunFiles(root=out).model, cohort, out, None))
    te = rs[rs.split == "test"]
    info = json.loads((out / "train_summary.json").read_text())
    return _cindex(te.time.to_numpy(), te.event.to_numpy(bool), te.log_hz.to_numpy()), {
        "best_epoch": info.get("best_epoch")
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with brca.csv and train_test_split.csv")
    ap.add_argument("--out", type=Path, default=Path("runs/tcga_baselines"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    ap.add_argument("--skip-histofuse", action="store_true", help="only the scikit-survival baselines")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="histofuse config overrides")
    args = ap.parse_args(argv)
    for f in ("brca.csv", "train_test_split.csv"):
        if not (args.data / f).is_file():
            raise SystemExit(f"error: {args.data / f} not found (give --data the TCGA-BRCA folder)")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    methods = {"coxnet": fit_coxnet, "rsf": fit_rsf}
    results: dict[str, list[float]] = {m: [] for m in methods}
    if not args.skip_histofuse:
        results["histofuse_pooled"] = []
    choices: dict[str, list[dict]] = {m: [] for m in results}
    seconds: dict[str, float] = dict.fromkeys(results, 0.0)
    for seed in args.seeds:
        cdir = args.out / f"cohort_seed{seed}"
        spec = build_cohort(args.data, cdir, seed)
        d = load_split(cdir)
        for name in results:
            t0 = time.perf_counter()
            if name == "histofuse_pooled":
                c, ch = fit_histofuse(spec, args.out / f"histofuse_seed{seed}", seed, args.overrides)
            else:
                c, ch = methods[name](d, seed)
            seconds[name] += time.perf_counter() - t0
            results[name].append(c)
            choices[name].append(ch)
            print(f"seed {seed} {name:17s} pooled test C-index {c:.3f} (n={len(d['test'][1])}) {ch}", flush=True)
    summary = {
        m: {
            "mean": float(np.mean(v)),
            "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "runs": v,
            "choices": choices[m],
            "seconds_per_seed": seconds[m] / len(args.seeds),
        }
        for m, v in results.items()
    }
    print(f"\npooled test C-index (lifelines, FLamby's metric) over seeds {args.seeds}:")
    for m, s in summary.items():
        print(f"  {m:17s} {s['mean']:.3f} +- {s['sd']:.3f}   ({s['seconds_per_seed']:.1f} s per seed)")
    print(f"  {'FLamby pooled':17s} {FLAMBY_POOLED:.3f}   (published)")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
