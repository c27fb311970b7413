"""The TCGA-BRCA clinical cohort of FLamby (6 regional centres, fixed train/test split) as a histofuse cohort.

:func:`build_cohort` reads FLamby's preprocessed ``brca.csv`` (39 covariates, ``E``, ``T``) and
``train_test_split.csv`` (``fold2`` = ``train_K``/``test_K`` for centre K), carves a validation set
(15% of each centre's training patients, seeded) and writes ``patients.csv``, ``clinical.csv`` and
``cohort.yaml``. The benchmark scripts (``scripts/tcga_*.py``) import it from here.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import atomic_path, write_csv, write_text


def build_cohort(data: Path, out: Path, seed: int) -> Path:
    """Write the cohort (clinical only, one site per centre) into ``out``; returns the cohort YAML path."""
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
    with atomic_path(out / "patients.csv") as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "site", "time", "event", "slides", "split"])
        w.writerows(rows)
    covs = [c for c in df.columns if c not in ("pid", "E", "T")]
    write_csv(out / "clinical.csv", df[["pid", *covs]].rename(columns={"pid": "patient_id"}))
    spec = out / "cohort.yaml"
    write_text(spec, "name: tcga_brca\ntime_unit: days\npatients: patients.csv\nclinical: {path: clinical.csv}\n")
    return spec
