"""Survival metrics through scikit-survival: Harrell's C-index pooled and per site, Kaplan-Meier by risk group."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def harrell_cindex(time: np.ndarray, event: np.ndarray, log_hz: np.ndarray) -> float:
    """Harrell's C (scikit-survival ``concordance_index_censored``); NaN when no pair is comparable."""
    from sksurv.metrics import concordance_index_censored

    event = np.asarray(event, bool)
    if event.sum() == 0 or len(time) < 2:
        return float("nan")
    try:
        return float(concordance_index_censored(event, np.asarray(time, float), np.asarray(log_hz, float))[0])
    except ValueError:  # all samples censored / no comparable pairs
        return float("nan")


def survival_metrics(
    time: np.ndarray, event: np.ndarray, log_hz: np.ndarray, site: np.ndarray, sites: list[str]
) -> dict:
    """``{"pooled": {...}, "per_site": {site: {...}}}`` with n, events and Harrell's C-index."""

    def one(m: np.ndarray) -> dict:
        return {
            "n": int(m.sum()),
            "events": int(event[m].sum()),
            "cindex": harrell_cindex(time[m], event[m], log_hz[m]),
        }

    out = {"pooled": one(np.ones(len(time), bool)), "per_site": {}}
    for k, s in enumerate(sites):
        m = site == k
        if m.any():
            out["per_site"][s] = one(m)
    return out


def km_by_group(time: np.ndarray, event: np.ndarray, group: np.ndarray, path, title: str = "") -> float:
    """Kaplan-Meier curves per risk group (PNG at ``path``); returns the log-rank p-value (NaN if one group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    for g in sorted(set(group)):
        m = group == g
        if m.sum() == 0:
            continue
        t, s = kaplan_meier_estimator(event[m].astype(bool), time[m].astype(float))
        ax.step(t, s, where="post", label=f"{g} (n={m.sum()})")
    p = float("nan")
    if len(set(group)) > 1 and event.sum() > 0:
        y = np.array(list(zip(event.astype(bool), time.astype(float), strict=True)), dtype=[("e", bool), ("t", float)])
        _, p = compare_survival(y, np.asarray(group))
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title} log-rank p = {p:.3g}" if np.isfinite(p) else title)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return float(p)
