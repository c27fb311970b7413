"""Survival metrics through scikit-survival, pooled and per site, with patient-bootstrap confidence intervals.

- Harrell's C (``concordance_index_censored``) and Uno's C (``concordance_index_ipcw``, censoring
  weights from the training patients, truncated at ``tau``);
- time-dependent cumulative/dynamic AUC at horizons (``cumulative_dynamic_auc``);
- integrated Brier score over a time range (``integrated_brier_score``; needs survival curves);
- Kaplan-Meier curves by risk group with the log-rank p-value (``compare_survival``).

Degenerate cases are a policy, not a crash: a metric that cannot be computed (no events, all
censored, fewer than two patients, no comparable pair, a horizon outside the follow-up, too few
patients for the censoring weights) is NaN, and ``notes[metric]`` says why.

Example::

    >>> m = evaluate_set(time, event, log_hz, curves=(times, surv), train=(t_train, e_train))
    >>> m["cindex"], m["uno_cindex"], m["ibs"], m["notes"]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

NAN = float("nan")


def survival_y(event: np.ndarray, time: np.ndarray) -> np.ndarray:
    """scikit-survival's structured outcome array ``[P]`` (fields ``event`` bool, ``time`` float).

    ``event`` is taken as truthy/falsy (so a subset with no events, or events only, is still accepted).
    """
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(event, bool), time)


def harrell_cindex(time: np.ndarray, event: np.ndarray, log_hz: np.ndarray) -> float:
    """Harrell's C (scikit-survival ``concordance_index_censored``); NaN when no pair is comparable."""
    from sksurv.metrics import concordance_index_censored

    event = np.asarray(event, bool)
    if event.sum() == 0 or len(time) < 2:
        return NAN
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 when no pair is comparable
            return float(concordance_index_censored(event, np.asarray(time, float), np.asarray(log_hz, float))[0])
    except ValueError:  # all samples censored / no comparable pairs
        return NAN


@dataclass
class Curves:
    """Predicted survival ``surv [P, T]`` at increasing ``times [T]`` (a step function; 1 before ``times[0]``)."""

    times: np.ndarray
    surv: np.ndarray

    def at(self, t: np.ndarray) -> np.ndarray:
        """``S(t) [P, len(t)]``."""
        k = np.searchsorted(self.times, np.atleast_1d(np.asarray(t, float)), side="right")
        full = np.concatenate([np.ones((len(self.surv), 1)), self.surv], axis=1)
        return full[:, k]

    def take(self, idx: np.ndarray) -> Curves:
        return Curves(self.times, self.surv[idx])


def _why_not(time: np.ndarray, event: np.ndarray) -> str | None:
    if len(time) < 2:
        return f"fewer than 2 patients (n={len(time)})"
    if not np.asarray(event, bool).any():
        return "no events (all censored)"
    return None


def uno_cindex(time, event, log_hz, train: np.ndarray, tau: float | None) -> tuple[float, str | None]:
    """Uno's C with censoring weights from ``train`` (a structured outcome array), truncated at ``tau``."""
    from sksurv.metrics import concordance_index_ipcw

    why = _why_not(time, event)
    if why:
        return NAN, why
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = concordance_index_ipcw(train, survival_y(event, time), np.asarray(log_hz, float), tau=tau)[0]
            return float(c), None
    except (ValueError, ZeroDivisionError) as e:
        return NAN, f"scikit-survival: {e}"


def td_auc(time, event, log_hz, train: np.ndarray, horizons: list[float]) -> tuple[dict[str, float], dict[str, str]]:
    """Cumulative/dynamic AUC at each horizon; a horizon without a case (event by t) and a control
    (still at risk after t) among these patients, or outside their follow-up, is NaN with a note."""
    from sksurv.metrics import cumulative_dynamic_auc

    time, event = np.asarray(time, float), np.asarray(event, bool)
    out: dict[str, float] = {}
    notes: dict[str, str] = {}
    ok = []
    for h in horizons:
        key = f"{h:g}"
        cases, controls = int(((time <= h) & event).sum()), int((time > h).sum())
        if cases == 0 or controls == 0:
            out[key] = NAN
            notes[key] = f"at t={h:g}: {cases} events by then and {controls} patients still at risk (need >= 1 each)"
        else:
            ok.append(h)
    if ok:  # one call: the censoring distribution is estimated once for every horizon
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                auc, _ = cumulative_dynamic_auc(train, survival_y(event, time), np.asarray(log_hz, float), ok)
            out.update({f"{h:g}": float(a) for h, a in zip(ok, auc, strict=True)})
        except (ValueError, ZeroDivisionError) as e:
            for h in ok:
                out[f"{h:g}"], notes[f"{h:g}"] = NAN, f"at t={h:g}: scikit-survival: {e}"
    out = {f"{h:g}": out[f"{h:g}"] for h in horizons}  # horizon order
    return out, notes


def ibs(time, event, surv_at_times: np.ndarray, train: np.ndarray, times: np.ndarray) -> tuple[float, str | None]:
    """Integrated Brier score of ``surv_at_times [P, T]`` over ``times [T]`` (IPCW from ``train``)."""
    from sksurv.metrics import integrated_brier_score

    why = _why_not(time, event)
    if why:
        return NAN, why
    if len(times) < 2:
        return NAN, "fewer than 2 evaluation times within the follow-up"
    time = np.asarray(time, float)
    if times[0] < time.min() or times[-1] >= time.max():
        return NAN, f"evaluation times {times[0]:g}-{times[-1]:g} outside these patients' follow-up"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(integrated_brier_score(train, survival_y(event, time), surv_at_times, times)), None
    except (ValueError, ZeroDivisionError) as e:
        return NAN, f"scikit-survival: {e}"


def ibs_times(time: np.ndarray, n: int = 50) -> np.ndarray:
    """An integration grid from the 10th to the 80th percentile of follow-up (inside it, as IPCW needs).
    Bootstrap resamples keep the grid of the original set (a resample outside it counts as invalid)."""
    time = np.asarray(time, float)
    if len(time) < 2:
        return np.zeros(0)
    lo, hi = np.quantile(time, [0.1, 0.8])
    return np.unique(np.linspace(lo, hi, n)) if hi > lo else np.zeros(0)


def evaluate_set(
    time: np.ndarray,
    event: np.ndarray,
    log_hz: np.ndarray,
    curves: Curves | None,
    train: np.ndarray,
    horizons: list[float],
    times: np.ndarray,
    tau: float | None,
) -> dict:
    """Every point metric for one set of patients; ``notes`` explains each NaN."""
    time, event, log_hz = np.asarray(time, float), np.asarray(event, bool), np.asarray(log_hz, float)
    notes: dict[str, str] = {}
    why = _why_not(time, event)
    c = harrell_cindex(time, event, log_hz)
    if not np.isfinite(c):
        notes["cindex"] = why or "no comparable pair"
    u, why_u = uno_cindex(time, event, log_hz, train, tau)
    if why_u:
        notes["uno_cindex"] = why_u
    if why:
        auc, auc_notes = {f"{h:g}": NAN for h in horizons}, {}
    else:
        auc, auc_notes = td_auc(time, event, log_hz, train, horizons)
    if why and horizons:
        notes["td_auc"] = why
    elif auc_notes:
        notes["td_auc"] = "; ".join(auc_notes.values())
    finite = [v for v in auc.values() if np.isfinite(v)]
    mean_auc = float(np.mean(finite)) if finite else NAN
    if curves is None:
        b, why_b = NAN, "no survival curves (risk scores only)"
    else:
        b, why_b = ibs(time, event, curves.at(times), train, times)
    if why_b:
        notes["ibs"] = why_b
    return {
        "n": len(time),
        "events": int(event.sum()),
        "cindex": c,
        "uno_cindex": u,
        "td_auc": auc,
        "mean_td_auc": mean_auc,
        "ibs": b,
        "notes": notes,
    }


def bootstrap_ci(
    fn: Callable[[np.ndarray], dict[str, float]], n: int, n_boot: int, seed: int, level: float = 0.95
) -> dict[str, dict]:
    """Percentile CIs of each scalar ``fn(idx)`` returns, over ``n_boot`` patient resamples (seeded).

    Resamples where a metric is NaN are left out of its interval; ``valid`` counts the rest.
    """
    rng = np.random.default_rng(seed)
    vals: dict[str, list[float]] = {}
    for _ in range(n_boot):
        for k, v in fn(rng.integers(0, n, n)).items():
            vals.setdefault(k, []).append(v)
    a = (1 - level) / 2
    out = {}
    for k, v in vals.items():
        arr = np.asarray(v, float)
        arr = arr[np.isfinite(arr)]
        out[k] = {
            "ci": [float(np.quantile(arr, a)), float(np.quantile(arr, 1 - a))] if len(arr) >= 10 else [NAN, NAN],
            "valid": len(arr),
        }
    return out


def logrank_p(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, str | None]:
    """Log-rank test across risk groups (scikit-survival ``compare_survival``)."""
    from sksurv.compare import compare_survival

    group = np.asarray(group)
    if len(set(group)) < 2:
        return NAN, "fewer than 2 risk groups present"
    if not np.asarray(event, bool).any():
        return NAN, "no events (all censored)"
    try:
        _, p = compare_survival(survival_y(event, time), group)
        return float(p), None
    except ValueError as e:
        return NAN, f"scikit-survival: {e}"


def km_at(time: np.ndarray, event: np.ndarray, group: np.ndarray, horizons: list[float]) -> dict[str, dict[str, float]]:
    """Kaplan-Meier survival of each risk group at each horizon (NaN past the group's last follow-up)."""
    from sksurv.nonparametric import kaplan_meier_estimator

    out: dict[str, dict[str, float]] = {}
    for g in group_order(np.asarray(group).astype(str)):
        m = np.asarray(group).astype(str) == g
        t, s = kaplan_meier_estimator(np.asarray(event, bool)[m], np.asarray(time, float)[m])
        k = np.searchsorted(t, np.asarray(horizons, float), side="right")
        vals = np.concatenate([[1.0], s])[k]
        out[g] = {f"{h:g}": float(v) if h <= time[m].max() else NAN for h, v in zip(horizons, vals, strict=True)}
    return out


def _subset_metrics(
    idx: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    log_hz: np.ndarray,
    group: np.ndarray | None,
    curves: Curves | None,
    ytr: np.ndarray,
    horizons: list[float],
    tau: float | None,
    n_boot: int,
    seed: int,
) -> dict:
    """:func:`survival_metrics` of the patients ``idx``: metrics, log-rank and KM by group, bootstrap CIs."""
    t, e, lh = time[idx], event[idx], log_hz[idx]
    cv = curves.take(idx) if curves is not None else None
    times = ibs_times(t)  # each set's own follow-up
    r = evaluate_set(t, e, lh, cv, ytr, horizons, times, tau)
    r["ibs_range"] = [float(times[0]), float(times[-1])] if len(times) else None
    if group is not None:
        r["logrank_p"], why = logrank_p(t, e, group[idx])
        if why:
            r["notes"]["logrank_p"] = why
        if len(t) and horizons:
            r["km_by_group"] = km_at(t, e, group[idx], horizons)
    if n_boot > 0 and not _why_not(t, e):

        def stat(b: np.ndarray) -> dict[str, float]:
            s = evaluate_set(t[b], e[b], lh[b], cv.take(b) if cv else None, ytr, horizons, times, tau)
            return {k: s[k] for k in ("cindex", "uno_cindex", "mean_td_auc", "ibs")}

        for k, v in bootstrap_ci(stat, len(idx), n_boot, seed).items():
            r[f"{k}_ci"] = v["ci"]
    return r


def survival_metrics(
    time: np.ndarray,
    event: np.ndarray,
    log_hz: np.ndarray,
    site: np.ndarray,
    sites: list[str],
    group: np.ndarray | None = None,
    curves: Curves | None = None,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    horizons: list[float] | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> dict:
    """``{"pooled": {...}, "per_site": {site: {...}}, ...}``: every metric of :func:`evaluate_set`,
    bootstrap CIs (``<metric>_ci``) and, given risk groups, the log-rank p-value.

    Args:
        time, event, log_hz: ``[P]``; site ``[P]`` int index into ``sites``; group ``[P]`` risk group labels.
        curves: survival curves of these patients (for the Brier score).
        train: ``(time, event)`` of the training patients for the censoring weights (default: these patients).
        horizons: td-AUC times (default: quartiles of these patients' event times).
    """
    time, event, log_hz, site = np.asarray(time, float), np.asarray(event, bool), np.asarray(log_hz, float), site
    if train is not None and len(train[0]) > 1:
        ytr = survival_y(train[1], train[0])
        censoring_from = f"training patients (n={len(train[0])})"
    else:
        ytr = survival_y(event, time)
        censoring_from = f"the evaluated patients (n={len(time)})"
    if horizons is None:
        from pipeline.stats.curves import default_horizons

        horizons = default_horizons(time, event)
    # Uno's C truncation: inside the training follow-up (IPCW needs G(t) > 0)
    tau = float(min(np.quantile(ytr["time"], 0.9), time.max())) if len(time) else None

    def one(m: np.ndarray) -> dict:
        return _subset_metrics(np.flatnonzero(m), time, event, log_hz, group, curves, ytr, horizons, tau, n_boot, seed)

    out: dict = {
        "pooled": one(np.ones(len(time), bool)),
        "per_site": {},
        "horizons": list(horizons),
        "uno_tau": tau,
        "censoring_from": censoring_from,
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": 0.95, "unit": "patient"},
    }
    for k, s in enumerate(sites):
        m = np.asarray(site) == k
        if m.any():
            out["per_site"][s] = one(m)
    return out


def concordant_pairs(time: np.ndarray, event: np.ndarray, log_hz: np.ndarray) -> tuple[float, float]:
    """(concordant + 0.5 * tied, comparable) Harrell pairs: sums over sites give a pooled C without pooling data."""
    from sksurv.metrics import concordance_index_censored

    if event.sum() == 0 or len(time) < 2:
        return 0.0, 0.0
    try:
        _, conc, disc, tied, _ = concordance_index_censored(
            event.astype(bool), time.astype(float), log_hz.astype(float)
        )
    except ValueError:
        return 0.0, 0.0
    return conc + 0.5 * tied, float(conc + disc + tied)


def group_order(group: np.ndarray) -> list[str]:
    """Risk-group labels in reading order: low, intermediate, high, then any others sorted."""
    known = ["low", "intermediate", "high"]
    return [g for g in known if g in set(group)] + sorted(set(map(str, group)) - set(known))
