"""The planted genes in a cross-validation's cross-fitted gene tests (``cv_biomarkers.csv``), and a null cohort
to measure the tests' false discoveries.

    python scripts/demo_crossfit.py check CV_DIR DEMO_DIR       planted genes' folds, rank, HR and FDR
    python scripts/demo_crossfit.py null DEMO_DIR NULL_DIR [SEED]
        copy DEMO_DIR's cohort with (time, event) permuted among the patients of each site: outcomes that carry
        no signal, so every gene with FDR < 0.05 in `histofuse cv NULL_DIR/cohort.yaml` is a false discovery

DEMO_DIR is a `histofuse demo --build-only --out DEMO_DIR` folder (its cohort/ and cohort/truth/genes.json);
``check`` writes CV_DIR/crossfit_check.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import write_json


def check(cv_dir: Path, demo_dir: Path) -> dict:
    planted = json.loads((demo_dir / "cohort" / "truth" / "genes.json").read_text())["planted"]
    b = pd.read_csv(cv_dir / "cv_biomarkers.csv").set_index("name")
    info = json.loads((cv_dir / "cv_results.json").read_text())["biomarkers"]
    genes = {}
    for g, beta in planted.items():
        if g not in b.index:
            genes[g] = {"tested": False}
            continue
        r = b.loc[g]
        up = str(r.attribution_direction).endswith("higher risk")
        genes[g] = {
            "tested": True,
            "folds_chosen": r.folds_chosen,
            "mean_attribution_rank": float(r.mean_attribution_rank),
            "direction_correct": bool(up == (beta > 0)),
            "hr": float(r.uni_hr),
            "hr_direction_correct": bool((r.uni_hr > 1) == (beta > 0)),
            "fdr": float(r.uni_fdr),
        }
    hits = [g for g, v in genes.items() if v.get("fdr", 1.0) < 0.05 and v["hr_direction_correct"]]
    others = [h["gene"] for h in info["fdr_below_0.05"] if h["gene"] not in planted]
    out = {"tests": info["tests"], "patients": info["patients"], "events": info["events"], "planted": genes,
           "planted_fdr_below_0.05": hits, "other_genes_fdr_below_0.05": others}  # fmt: skip
    write_json(cv_dir / "crossfit_check.json", out)
    return out


def null_cohort(demo_dir: Path, null_dir: Path, seed: int = 0) -> Path:
    src = demo_dir / "cohort"
    if null_dir.exists():
        shutil.rmtree(null_dir)
    shutil.copytree(src, null_dir, ignore=shutil.ignore_patterns("truth"), symlinks=True)
    pt = pd.read_csv(src / "patients.csv")
    rng = np.random.default_rng(seed)
    for _, idx in pt.groupby("site").groups.items():
        perm = rng.permutation(np.asarray(idx))
        pt.loc[idx, ["time", "event"]] = pt.loc[perm, ["time", "event"]].to_numpy()
    pt.to_csv(null_dir / "patients.csv", index=False)
    slides = null_dir / "slides"
    if slides.is_dir() and not slides.is_symlink():  # the slides are the same files: link them, do not copy
        shutil.rmtree(slides)
        slides.symlink_to((src / "slides").resolve(), target_is_directory=True)
    return null_dir / "cohort.yaml"


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "check":
        print(json.dumps(check(Path(rest[0]), Path(rest[1])), indent=1))
    elif cmd == "null":
        print(null_cohort(Path(rest[0]), Path(rest[1]), int(rest[2]) if len(rest) > 2 else 0))
    else:
        raise SystemExit(__doc__)
