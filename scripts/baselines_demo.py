"""Model vs the centralised Coxnet baselines on a finished run's own test split.

Usage::

    python scripts/baselines_demo.py RUN_FOLDER [--cohort COHORT_YAML] [--bootstrap 200]

``RUN_FOLDER`` is the output of ``histofuse run`` / ``histofuse demo`` (its ``config.yaml``, ``features/``
and ``risk_scores.csv``). The model's test risks come from ``risk_scores.csv``; the baselines are refitted
here on the same split and features. For a demo run, the oracle (planted log hazard) from the cohort's
``truth/patients.csv`` is printed too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    from data_specs.cohort import load_cohort
    from data_specs.config import resolve_config
    from pipeline.outputs.baseline_report import summary_lines
    from pipeline.outputs.baselines import BaselineSettings, fit_baselines
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.data import load_run_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--cohort", type=Path, help="cohort spec (default: the one in the run's config.yaml)")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--json", type=Path, help="also write the baselines dict here")
    ap.add_argument("--model", type=Path, help="model file: also the C-index with each modality masked at inference")
    ap.add_argument("--trust-pickle", action="store_true", help="allow a legacy model.pt pickle (your own file)")
    a = ap.parse_args(argv)
    cfg = resolve_config(a.run / "config.yaml", out=a.run)
    cohort_path = a.cohort or cfg.cohort
    if cohort_path is None:
        raise SystemExit(f"{a.run / 'config.yaml'}: no cohort; pass --cohort")
    cohort = load_cohort(cohort_path)
    data = load_run_data(cohort, cfg, out=a.run)
    risk = pd.read_csv(a.run / "risk_scores.csv", dtype={"patient_id": str}).set_index("patient_id")
    test = data.splits["test"]
    ids = [data.patient_ids[i] for i in test]
    if sorted(ids) != sorted(risk.index[risk.split == "test"]):
        raise SystemExit(f"{a.run / 'risk_scores.csv'}: its test split differs from the config's split")
    model_lh = risk.loc[ids, "log_hz"].to_numpy(float)
    t0 = time.perf_counter()
    bl_settings = BaselineSettings(n_boot=a.bootstrap, seed=cfg.evaluate.seed)
    bl = fit_baselines(data, model_lh, bl_settings)
    secs = time.perf_counter() - t0
    print(f"{len(data.patient_ids)} patients, test {len(test)} ({int(data.event[test].sum())} events)")
    print(f"model (risk_scores.csv)        test C {bl['model']['cindex']:.3f}")
    for k, v in bl["baselines"].items():
        d = v["model_minus_this"]
        ci = d["ci"] or [float("nan")] * 2
        print(
            f"Coxnet {k:<23} test C {v['cindex']:.3f}  (CV {v['cv_cindex']:.3f}, {v['nonzero']}/{v['features']} "
            f"nonzero)  model - this {d['diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        )
    truth = Path(cohort_path).parent / "truth" / "patients.csv"
    if truth.is_file():
        o = pd.read_csv(truth, dtype={"patient_id": str}).set_index("patient_id").loc[ids, "oracle_log_hz"]
        c = harrell_cindex(data.time[test], data.event[test], o.to_numpy())
        print(f"oracle (planted log hazard)    test C {c:.3f}")
    print("\n".join(summary_lines(bl)))
    print(f"baselines fitted in {secs:.1f} s")
    if a.model:
        from pipeline.outputs.baselines import bundle_predict_fn, modality_contributions

        mc = modality_contributions(data, bundle_predict_fn(a.model, a.trust_pickle), bl_settings)
        print(f"model (recomputed) test C {mc['full']['cindex']:.3f}; with a modality masked at inference:")
        for k, v in mc.items():
            if k.startswith("without_"):
                d = v["drop"]
                ci = d["ci"] or [float("nan")] * 2
                print(f"  {k:<17} C {v['cindex']:.3f}  drop {d['diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
        bl["modality_contributions"] = mc
    if a.json:
        from pipeline.files import write_json

        write_json(a.json, bl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
