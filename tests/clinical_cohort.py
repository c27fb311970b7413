"""A small clinical-only federated cohort for tests: 3 sites, survival from a Cox model on two clinical columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def write_clinical_cohort(
    out: Path,
    name: str,
    *,
    seed: int,
    split: tuple[int, int, int],
    censor: tuple[float, float],
    prefix: str,
    round_time: bool = True,
) -> Path:
    """Writes ``patients.csv``, ``clinical.csv`` (age, grade_score) and ``cohort.yaml`` into ``out``; returns the
    cohort file. ``split``: train, validation and test patients per site; times are exponential with hazard
    ``exp(0.8 grade + 0.03 (age - 60)) / 900`` days, censored uniformly in ``censor``."""
    rng = np.random.default_rng(seed)
    per_site = sum(split)
    n = 3 * per_site
    age, grade = rng.normal(60, 10, n).round(1), rng.normal(0, 1, n).round(3)
    t = rng.exponential(900 * np.exp(-0.8 * grade - 0.03 * (age - 60))) + 1.0
    c = rng.uniform(*censor, n)
    time = np.minimum(t, c).round(2) if round_time else np.minimum(t, c)
    splits = np.tile(["train"] * split[0] + ["val"] * split[1] + ["test"] * split[2], 3)
    ids, site = [f"{prefix}{i:03d}" for i in range(n)], np.repeat(["s1", "s2", "s3"], per_site)
    pts = pd.DataFrame({"patient_id": ids, "site": site, "time": time, "event": (t <= c).astype(int), "slides": "",
                        "split": splits})  # fmt: skip
    pts.to_csv(out / "patients.csv", index=False)
    pd.DataFrame({"patient_id": ids, "age": age, "grade_score": grade}).to_csv(out / "clinical.csv", index=False)
    (out / "cohort.yaml").write_text(
        f"name: {name}\ntime_unit: days\npatients: patients.csv\n"
        "clinical: {path: clinical.csv, id_column: patient_id}\n"
    )
    return out / "cohort.yaml"
