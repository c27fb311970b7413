"""The evaluate stage: ``risk_scores.csv`` (+ ``survival_curves.csv``) in, ``metrics.json`` and plots out.

The metrics themselves live in :mod:`pipeline.stats`; this module reads the tables, picks the split,
hands the arrays over, and writes the results (through :mod:`pipeline.files`) and the plots.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from data_specs.artifacts import RunFiles
from data_specs.config import RunConfig
from pipeline.files import write_json

log = logging.getLogger(__name__)


def read_curves(path: Path, ids: list[str]):
    """Survival curves for ``ids`` from the long-form ``survival_curves.csv`` (``patient_id, time,
    survival``) as :class:`~pipeline.stats.metrics.Curves` (``surv [len(ids), T]`` on the shared time grid);
    None, with a warning, when the file is absent, lacks a patient or the patients' grids differ."""
    from pipeline.stats.metrics import Curves

    if not path.is_file():
        return None
    c = pd.read_csv(path, dtype={"patient_id": str})
    need = {"patient_id", "time", "survival"}
    if not need <= set(c.columns):
        raise ValueError(f"{path}: missing columns {sorted(need - set(c.columns))} (a long-form table is expected)")
    wide = c.pivot_table(index="patient_id", columns="time", values="survival", aggfunc="first", dropna=False)
    missing = [p for p in ids if p not in wide.index]
    if missing:
        log.warning("%s: no curves for %d patients (e.g. %s); no Brier score", path, len(missing), missing[0])
        return None
    surv = wide.loc[ids].to_numpy(float)
    if np.isnan(surv).any():
        log.warning("%s: the patients' curves are not on one time grid; no Brier score", path)
        return None
    return Curves(wide.columns.to_numpy(float), surv)


def horizons_of(columns: list[str]) -> list[float] | None:
    """The horizons of the ``surv_<h><unit>`` columns of ``risk_scores.csv``, in column order (None: no column)."""
    from pipeline.outputs.predictions import horizon_of

    return [h[0] for h in map(horizon_of, columns) if h is not None] or None


def stage_evaluate(
    risk_csv: Path, out: Path, split: str = "test", overrides: list[str] | None = None, config: RunConfig | None = None
) -> dict:
    """Metrics for one split (``all``: every patient) of ``risk_scores.csv``, pooled and per site:
    Harrell and Uno C, td-AUC, integrated Brier score (from ``survival_curves.csv`` beside it), each
    with a patient-bootstrap CI, log-rank p by risk group; ``metrics.json`` and PNG plots. Settings: the
    ``evaluate`` section of ``config`` (default: the defaults), then ``overrides``."""
    from pipeline.outputs.plots import km_by_group, km_per_site, plot_td_auc, time_unit_of
    from pipeline.stats.metrics import survival_metrics

    ev = (config or RunConfig()).with_overrides(overrides).evaluate
    risk_csv = Path(risk_csv)
    df = pd.read_csv(risk_csv, dtype={"patient_id": str})
    need = {"patient_id", "site", "split", "log_hz", "risk_group", "time", "event"}
    if not need <= set(df.columns):
        old = " (an older run's `risk` column is the log hazard: rename it log_hz)" if "risk" in df.columns else ""
        raise ValueError(f"{risk_csv}: missing columns {sorted(need - set(df.columns))}{old}")
    d = df[df.split == split] if split != "all" else df
    if d.empty:
        raise ValueError(f"{risk_csv}: no patients in split '{split}' (splits: {sorted(df.split.unique())})")
    tr = df[df.split == "train"]
    horizons = ev.horizons
    if horizons is None:
        horizons = horizons_of(list(df.columns))
    sites = sorted(d.site.unique())
    curves = read_curves(RunFiles(root=risk_csv.parent).survival_curves, d.patient_id.tolist())
    m = survival_metrics(
        d.time.to_numpy(float),
        d.event.to_numpy(bool),
        d.log_hz.to_numpy(float),
        np.array([sites.index(s) for s in d.site]),
        sites,
        group=d.risk_group.to_numpy(str),
        curves=curves,
        train=(tr.time.to_numpy(float), tr.event.to_numpy(bool)) if split not in ("train", "all") else None,
        horizons=horizons,
        n_boot=ev.bootstrap,
        seed=ev.seed,
    )
    m["split"] = split
    m["logrank_p"] = m["pooled"].get("logrank_p", float("nan"))
    rf = RunFiles(root=Path(out))
    rf.root.mkdir(parents=True, exist_ok=True)
    unit = time_unit_of(df.columns)
    km_by_group(d.time.to_numpy(), d.event.to_numpy(), d.risk_group.to_numpy(), rf.km_plot(split),
                title=f"{split} set:", time_unit=unit)  # fmt: skip
    km_per_site(d.time.to_numpy(), d.event.to_numpy(), d.risk_group.to_numpy(), d.site.to_numpy(),
                rf.km_plot(split, by_site=True), time_unit=unit)  # fmt: skip
    if m["horizons"]:
        plot_td_auc(m, rf.td_auc_plot(split), time_unit=unit)
    write_json(rf.metrics, m)
    return m
