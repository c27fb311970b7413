"""The prediction tables of a run: ``risk_scores.csv`` rows and ``survival_curves.csv``, computed, not written.

The model's log hazards become risk groups with cut-points fixed on its training patients, and survival
probabilities at the model's horizons: from its discrete-time hazards, or from the Breslow baseline
saved in the model file (Cox heads). Horizon columns carry the cohort's time unit (``surv_365days``);
:func:`horizon_column` and :func:`horizon_of` are the one place that spells and parses them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # annotations only: the table helpers load without torch
    from pipeline.training.data import CohortData
    from pipeline.training.predict import Prediction


_HORIZON = re.compile(r"^surv_(\d+(?:\.\d+)?(?:e[+-]?\d+)?)([A-Za-z]+)$")


def horizon_column(horizon: float, time_unit: str) -> str:
    """The ``risk_scores.csv`` column of the survival probability at ``horizon``: ``surv_365days``."""
    unit = re.sub(r"[^A-Za-z]", "", time_unit) or "time"
    return f"surv_{horizon:g}{unit}"


def horizon_of(column: str) -> tuple[float, str] | None:
    """``(horizon, time unit)`` of a column spelled by :func:`horizon_column`; None for any other column."""
    m = _HORIZON.match(column)
    return (float(m.group(1)), m.group(2)) if m else None


def risk_groups(log_hz: np.ndarray, cutpoints: dict, scheme: str) -> np.ndarray:
    """``low``/``high`` (median) or ``low``/``intermediate``/``high`` (tertiles), cut-points from training."""
    if scheme == "tertiles":
        lo, hi = cutpoints["tertiles"]
        return np.where(log_hz > hi, "high", np.where(log_hz > lo, "intermediate", "low"))
    if scheme != "median":
        raise ValueError(f"unknown risk_groups '{scheme}': valid names are ['median', 'tertiles']")
    return np.where(log_hz > cutpoints["median"], "high", "low")


def modalities(data: CohortData, i: int) -> str:
    """Which inputs patient ``i`` has, e.g. ``slides+omics``."""
    m = []
    if data.bags is not None and len(data.bags[i]):
        m.append("slides")
    if data.omics_present is not None and data.omics_present[i]:
        m.append("omics")
    if data.clinical_present is not None and data.clinical_present[i]:
        m.append("clinical")
    return "+".join(m)


def survival_curves(pred: Prediction, baseline: dict | None, sites: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(times [T], surv [P, T])`` for the patients of ``pred``: from its discrete-time hazards, else from
    the model's Breslow baseline (at most 200 times; ``sites`` names each patient's site); None when the
    model has neither."""
    from pipeline.stats.curves import BreslowBaseline, survival_from_hazards

    if pred.hazards is not None and pred.bin_edges is not None:
        edges = pred.bin_edges.astype(np.float64)
        return edges[1:], survival_from_hazards(pred.hazards, edges, edges[1:])
    if baseline:
        base = BreslowBaseline.from_state(baseline)
        times = base.grid if len(base.grid) <= 200 else np.unique(np.quantile(base.grid, np.linspace(0, 1, 200)))
        return times, base.survival(pred.log_hz, times, sites)
    return None


def risk_table(
    data: CohortData,
    log_hz: np.ndarray,
    cutpoints: dict,
    scheme: str,
    horizons: list[float],
    curves: tuple[np.ndarray, np.ndarray] | None,
    time_unit: str = "days",
) -> pd.DataFrame:
    """``risk_scores.csv``: patient_id, site, split, log_hz (the model's log hazard; higher = higher risk),
    risk_group, ``surv_<h><time_unit>`` per horizon (e.g. ``surv_365days``), modalities, time, event; one row
    per patient of ``data``, in its order."""
    from pipeline.stats.metrics import Curves

    labels = {data.patient_ids[i]: s for s, ix in data.splits.items() for i in ix}
    df = pd.DataFrame(
        {
            "patient_id": data.patient_ids,
            "site": [data.sites[k] for k in data.site],
            "split": [labels[p] for p in data.patient_ids],
            "log_hz": np.round(log_hz, 6),
            "risk_group": risk_groups(log_hz, cutpoints, scheme),
        }
    )
    if curves is not None:
        times, surv = curves
        at = Curves(times, surv).at(np.asarray(horizons, float)) if horizons else np.zeros((len(log_hz), 0))
        for j, h in enumerate(horizons):
            df[horizon_column(h, time_unit)] = np.round(at[:, j], 5)
    df["modalities"] = [modalities(data, i) for i in range(len(data.patient_ids))]
    df["time"], df["event"] = data.time, data.event.astype(int)
    return df


def curves_table(patient_ids: list[str], curves: tuple[np.ndarray, np.ndarray]) -> pd.DataFrame:
    """``survival_curves.csv`` in long (tidy) form: ``patient_id, time, survival``, one row per patient and
    time of ``curves = (times [T], surv [P, T])``, patients in the order of ``patient_ids``, times ascending."""
    times, surv = curves
    return pd.DataFrame(
        {
            "patient_id": np.repeat(np.asarray(patient_ids, dtype=object), len(times)),
            "time": np.tile(np.asarray(times, np.float64), len(patient_ids)),
            "survival": np.round(np.asarray(surv, np.float64), 5).reshape(-1),
        }
    )
