"""Risk-group cut-points from aggregates: the one rule the embedded run and a deployment share.

A site sends the count, sum and sum of squares of its training log hazards (only with at least ``min_count``
patients) and, once the server has pooled them into a mean and sd, the histogram of its standardised log
hazards on a pre-agreed grid (``stats.curves.RISK_EDGES``, bins under ``min_count`` merged by
``stats.curves.site_histogram``). :func:`pooled_mean_sd` and :func:`cutpoints_from_histogram` are the server's
half; ``stats.curves.risk_cutpoints`` runs both halves in one process. Imports nothing of ``pipeline``.
"""

from __future__ import annotations

import numpy as np


def pooled_mean_sd(parts: list[tuple[float, float, float]], min_count: int) -> tuple[float, float]:
    """The pooled ``(mean, sd)`` of log hazards from the sites' ``(n, sum, sum of squares)``; parts of fewer
    than ``min_count`` patients are left out. sd 1.0 when it is 0. ``ValueError`` when nothing is left."""
    n, s1, s2 = (sum(float(p[j]) for p in parts if p[0] >= min_count) for j in range(3))
    if n <= 0:
        raise ValueError(f"risk cut-points: no site sent the moments of {min_count} or more training patients")
    mean = s1 / n
    return mean, float(np.sqrt(max(s2 / n - mean**2, 0.0))) or 1.0


def cutpoints_from_histogram(
    hist: np.ndarray, edges: np.ndarray, mean: float, sd: float
) -> dict[str, float | list[float]]:
    """``median`` and ``tertiles`` of the log hazards whose standardised values have the summed histogram
    ``hist [K]`` on ``edges [K + 1]``. Each filled bin stands for a run of patients around it: the CDF passes
    through each filled bin's centre at the bin's midpoint count (linear between). ``ValueError`` when empty."""
    hist, edges = np.asarray(hist, float), np.asarray(edges, float)
    if hist.sum() <= 0:
        raise ValueError("risk cut-points: every site's log-hazard histogram is empty (all bins suppressed)")
    nz = np.flatnonzero(hist)
    cdf = (np.cumsum(hist[nz]) - hist[nz] / 2) / hist.sum()
    q = mean + sd * np.interp([0.5, 1 / 3, 2 / 3], cdf, (edges[nz] + edges[nz + 1]) / 2)
    return {"median": float(q[0]), "tertiles": [float(q[1]), float(q[2])]}
