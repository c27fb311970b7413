"""Survival curves: a Breslow baseline for Cox models (built from per-site summaries) and curves from
discrete-time hazards.

Breslow's estimator of the cumulative baseline hazard of a Cox model is

    H0(t) = sum_{event times t_k <= t} d_k / sum_{j : t_j >= t_k} exp(log_hz_j)

with ``d_k`` the number of events at ``t_k``. Both sums split over sites: each site sends, on a shared grid
``g [K]``, ``events [K]`` (events in ``(g_{k-1}, g_k]``) and ``risk_sum [K]`` (``exp(log_hz)`` summed over its
patients at risk at ``g_k``, ``time >= g_k``); the server adds and divides. On a grid holding every event time
this is exactly Breslow's estimator on the pooled patients (tested against scikit-survival). A trained model
keeps its baseline on a coarse grid (:func:`coarse_grid`: ``K`` evenly spaced times up to the largest follow-up
rounded up to two significant digits, agreed before training): events charged to their interval's right end,
the risk set taken at its start (``risk_at_start``), and each site's steps merged to >= k events
(``pipeline.stats.coarsen``). ``S(t | x) = exp(-H0(t) * exp(log_hz))``; the baseline is kept per site and
pooled (an unseen site, or one with fewer than k = 10 training events, gets the pooled one). Discrete time
(bin hazards ``h_k``, edges ``e_0 < ... < e_K``): ``S(e_k) = prod_{i<=k} (1 - h_i)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class SiteSummary:
    """What one site contributes to the baseline: ``events [K]`` and ``risk_sum [K]`` on ``grid [K]``."""

    grid: np.ndarray
    events: np.ndarray
    risk_sum: np.ndarray


def event_grid(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """The exact grid: the distinct event times (sorted). Empty when there is no event."""
    return np.unique(np.asarray(time, float)[np.asarray(event, bool)])


COARSE_GRID_POINTS = 40  # baseline grid points of a trained model (one per 2.5% of the follow-up range)


def nice_ceil(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (3652.3 -> 3700.0); 1.0 for ``x <= 0``."""
    if not np.isfinite(x) or x <= 0:
        return 1.0
    step = 10.0 ** (np.floor(np.log10(x)) - (digits - 1))
    return float(np.ceil(x / step) * step)


def coarse_grid(max_follow_up: float, k: int = COARSE_GRID_POINTS) -> np.ndarray:
    """The pre-agreed baseline grid ``[k]``: ``k`` evenly spaced times up to the largest follow-up rounded up
    (:func:`nice_ceil`). Each site can send its own rounded maximum; the consortium takes the largest, so
    no exact time is needed, and the grid is fixed before any risk is computed."""
    return nice_ceil(max_follow_up) * np.arange(1, k + 1) / k


def site_summary(
    grid: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    log_hz: np.ndarray,
    risk_at_start: bool = False,
    min_events: int = 1,
) -> SiteSummary:
    """One site's summaries on a shared ``grid [K]`` (increasing).

    Args:
        time, event, log_hz: ``[P]`` the site's patients.
        risk_at_start: the risk set of interval ``(g_{k-1}, g_k]`` is ``time > g_{k-1}`` (every patient for the
            first), for a coarse grid; default ``time >= g_k`` (Breslow's, exact on the event grid).
        min_events: k > 1: adjacent intervals merged until each released step holds >= k events or none
            (:func:`pipeline.stats.coarsen.merge_small_steps`); zeros for a site of fewer than k events.

    Events after the last grid point are dropped (the curve ends there).
    """
    grid = np.asarray(grid, float)
    if grid.ndim != 1 or (len(grid) > 1 and np.any(np.diff(grid) <= 0)):
        raise ValueError("the time grid must be one-dimensional and strictly increasing")
    time = np.asarray(time, float)
    event = np.asarray(event, bool)
    r = np.exp(np.asarray(log_hz, float))
    k = np.searchsorted(grid, time[event], side="left")  # interval (g_{k-1}, g_k] holding each event
    keep = k < len(grid)
    events = np.bincount(k[keep], minlength=len(grid)).astype(float)
    # at risk at g_k: time >= g_k. Sort once, suffix sums.
    order = np.argsort(time)
    ts, rs = time[order], r[order]
    suffix = np.concatenate([np.cumsum(rs[::-1])[::-1], [0.0]])
    if risk_at_start:
        starts = np.concatenate([[0], np.searchsorted(ts, grid[:-1], side="right")])
    else:
        starts = np.searchsorted(ts, grid, side="left")
    if min_events > 1:
        from pipeline.stats.coarsen import merge_small_steps

        return SiteSummary(grid, *merge_small_steps(events, suffix[starts], len(ts) - starts, min_events))
    return SiteSummary(grid, events, suffix[starts])


def combine(summaries: list[SiteSummary]) -> np.ndarray:
    """Cumulative baseline hazard ``H0 [K]`` on the shared grid from sites' summaries.

    Grid points with no patient at risk add nothing (the hazard is not estimable there).
    """
    if not summaries:
        raise ValueError("no site summaries to combine")
    grid = summaries[0].grid
    for s in summaries[1:]:
        if len(s.grid) != len(grid) or not np.allclose(s.grid, grid):
            raise ValueError("site summaries are on different time grids")
    d = np.sum([s.events for s in summaries], axis=0)
    rsum = np.sum([s.risk_sum for s in summaries], axis=0)
    inc = np.divide(d, rsum, out=np.zeros_like(d), where=rsum > 0)
    return np.cumsum(inc)


@dataclass
class BreslowBaseline:
    """Cumulative baseline hazard on ``grid [K]``, pooled and per site (JSON-able via :meth:`state`)."""

    grid: np.ndarray
    cumhaz: np.ndarray
    cumhaz_by_site: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        time: np.ndarray,
        event: np.ndarray,
        log_hz: np.ndarray,
        site: np.ndarray,
        sites: list[str],
        grid: np.ndarray | None = None,
        min_site_events: int = 10,
        risk_at_start: bool = False,
    ) -> BreslowBaseline:
        """Per-site summaries combined into pooled and per-site baselines.

        Args:
            time, event, log_hz: ``[P]`` training patients; site ``[P]`` int index into ``sites``.
            grid: shared time grid; default the distinct event times (exact Breslow).
            min_site_events: k: a site gets its own baseline only with at least k training events (fewer give a
                jagged curve and single patients' events); its patients otherwise use the pooled one.
            risk_at_start: see :func:`site_summary` (use with a :func:`coarse_grid`). This is a trained model's
                released baseline: each site's summary has steps of >= k events (``site_summary(min_events=k)``),
                and a site with fewer sends none (warning).
        """
        time, event, site, lh = np.asarray(time, float), np.asarray(event, bool), np.asarray(site), np.asarray(log_hz)
        grid = event_grid(time, event) if grid is None else np.asarray(grid, float)
        if len(grid) == 0:
            raise ValueError("no events among the training patients: the baseline hazard cannot be estimated")
        k = max(1, min_site_events) if risk_at_start else 1
        m = {s: site == i for i, s in enumerate(sites) if (site == i).any()}
        summ = {s: site_summary(grid, time[x], event[x], lh[x], risk_at_start, k) for s, x in m.items()}
        if k > 1 and (off := [s for s, v in summ.items() if not v.risk_sum.any()]):
            msg = "baseline: site(s) %s with fewer than %d training events: no summary sent%s"
            log.warning(msg, off, k, "; none left: the baseline is empty (survival 1)" * (len(off) == len(summ)))
        by_site = {s: combine([v]) for s, v in summ.items() if v.events.sum() >= max(1, min_site_events)}
        return cls(grid, combine(list(summ.values())), by_site)

    def cumhaz_at(self, t: np.ndarray, site: str | None = None) -> np.ndarray:
        """``H0(t)`` (step function, 0 before the first grid point, flat after the last)."""
        h = self.cumhaz_by_site.get(site, self.cumhaz) if site is not None else self.cumhaz
        k = np.searchsorted(self.grid, np.asarray(t, float), side="right")
        return np.concatenate([[0.0], h])[k]

    def survival(self, log_hz: np.ndarray, t: np.ndarray, sites: list[str] | None = None) -> np.ndarray:
        """``S(t | x) [P, T]`` for ``log_hz [P]`` at times ``t [T]``; ``sites [P]`` picks each patient's baseline."""
        log_hz = np.asarray(log_hz, float)
        t = np.atleast_1d(np.asarray(t, float))
        if sites is None:
            h0 = np.broadcast_to(self.cumhaz_at(t), (len(log_hz), len(t)))
        else:
            h0 = np.stack([self.cumhaz_at(t, s) for s in sites]) if len(sites) else np.zeros((0, len(t)))
        return np.exp(-h0 * np.exp(log_hz)[:, None])

    def state(self) -> dict:
        return {
            "kind": "breslow",
            "grid": self.grid.tolist(),
            "cumhaz": self.cumhaz.tolist(),
            "cumhaz_by_site": {k: v.tolist() for k, v in self.cumhaz_by_site.items()},
        }

    @classmethod
    def from_state(cls, d: dict) -> BreslowBaseline:
        if d.get("kind") != "breslow":
            raise ValueError(f"not a Breslow baseline state (kind {d.get('kind')!r})")
        return cls(
            np.asarray(d["grid"], float),
            np.asarray(d["cumhaz"], float),
            {k: np.asarray(v, float) for k, v in d.get("cumhaz_by_site", {}).items()},
        )


def survival_from_hazards(hazards: np.ndarray, edges: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Discrete-time survival ``S(t) [P, T]`` from bin hazards ``hazards [P, K]`` and bin edges ``edges [K+1]``.

    ``S`` is 1 before the end of the first bin and ``prod_{i<=k}(1 - h_i)`` from the end of bin ``k``
    (the right edge ``edges[k+1]``) on, i.e. a step function with steps at the right edges.
    """
    hazards = np.asarray(hazards, float)
    edges = np.asarray(edges, float)
    if hazards.ndim != 2 or len(edges) != hazards.shape[1] + 1:
        raise ValueError(f"hazards {hazards.shape} and {len(edges)} bin edges do not match (need K+1 edges)")
    surv = np.concatenate([np.ones((len(hazards), 1)), np.cumprod(1.0 - hazards, axis=1)], axis=1)  # (P, K+1)
    k = np.searchsorted(edges[1:], np.atleast_1d(np.asarray(t, float)), side="right")  # completed bins
    return surv[:, k]


YEAR_IN_UNIT = {"day": 365.0, "d": 365.0, "month": 12.0, "mo": 12.0, "year": 1.0, "yr": 1.0, "y": 1.0}


def years_per_unit(time_unit: str | None) -> float | None:
    """How many of ``time_unit`` make one year (``days`` -> 365, ``months`` -> 12, ``years`` -> 1); None if unknown."""
    u = (time_unit or "").strip().lower()
    return YEAR_IN_UNIT.get(u[:-1] if u.endswith("s") and u[:-1] in YEAR_IN_UNIT else u)


def default_horizons(time: np.ndarray, event: np.ndarray, time_unit: str | None = None) -> list[float]:
    """Default horizons of one set of patients held in one process (an evaluation's test patients): 1, 3 and 5
    years in the cohort's ``time_unit`` (``days`` -> 365, 1095, 1825; ``months`` -> 12, 36, 60; ``years`` -> 1,
    3, 5) up to the largest follow-up ``time [P]``; if the unit is unknown or none fits, the quartiles of the
    event times (``event [P]``) rounded to 2 significant digits. A trained model's horizons come from site
    aggregates instead (:mod:`pipeline.training.survival_summary`). Put them into a baseline grid with
    :func:`grid_with`."""
    t = np.asarray(time, float)
    per_year = years_per_unit(time_unit)
    if per_year is not None and len(t):
        fit = [float(per_year * y) for y in (1, 3, 5) if per_year * y <= t.max()]
        if fit:
            return fit
    ev = np.asarray(event, bool)
    if not ev.any():
        return []
    return sorted({float(f"{v:.2g}") for v in np.quantile(t[ev], [0.25, 0.5, 0.75])})


def grid_with(grid: np.ndarray, points: list[float]) -> np.ndarray:
    """``grid [K]`` snapped so that it holds each of ``points`` exactly: the nearest free grid point of each
    (or a neighbour of it) is moved onto it, keeping ``[K]`` increasing; a point that fits nowhere is added."""
    g, n = np.asarray(grid, float).copy(), len(grid)
    extra, taken = [], set()
    for p in sorted(float(v) for v in points):
        if p in taken:
            continue
        k = int(np.argmin(np.abs(g - p))) if n else 0
        ok = [c for c in (k, k + 1, k - 1) if 0 <= c < n and g[c] not in taken]
        ok = [c for c in ok if (c == 0 or g[c - 1] < p) and (c == n - 1 or p < g[c + 1])]
        if ok:
            g[ok[0]] = p
            taken.add(p)
        else:
            extra.append(p)
    return np.union1d(g, extra) if extra else g


# Quantiles from aggregates. A site never sends a patient's value for a cut-point, a horizon or a bin edge: it
# sends a histogram on a grid agreed before anyone looks at the data (:func:`site_histogram`; bins of 1..k-1
# patients merged into their right neighbours), the server sums them and reads quantiles off the sum
# (:func:`histogram_quantiles`, linear within a bin).

RISK_EDGES = np.round(np.linspace(-4.0, 4.0, 161), 10)  # standardised log-hazard bins (0.05 sd); tails clamped
TIME_BINS = 100  # event-time histogram bins on [0, nice_ceil(largest follow-up)]


def site_histogram(values: np.ndarray, edges: np.ndarray, min_count: int = 1) -> np.ndarray:
    """Counts ``[K]`` of ``values [P]`` in the bins of ``edges [K + 1]`` (values outside go to the end bins),
    with the minimum-count rule: consecutive bins are merged left to right into ``P // min_count`` runs of
    about equal size (each >= ``min_count`` patients), each run's count reported in the bin holding its middle
    patient (its median bin, so quantiles read off the sum are not pulled towards a run's end); a remainder
    joins the last run (all zeros when fewer than ``min_count`` values in all). No bin holds 1..min_count-1."""
    edges = np.asarray(edges, float)
    k = np.clip(np.searchsorted(edges, np.asarray(values, float), side="right") - 1, 0, len(edges) - 2)
    raw = np.bincount(k, minlength=len(edges) - 1).astype(np.int64)
    if min_count <= 1:
        return raw
    n_all = int(raw.sum())
    m = n_all // min_count  # runs of about n_all / m patients each (>= min_count), so no run is lopsided
    targets = np.round(np.arange(1, m + 1) * n_all / max(m, 1))
    runs: list[tuple[int, int]] = []  # (first bin, last bin) of each run of >= min_count patients
    run, start, cum = 0, 0, 0
    for i, c in enumerate(raw):
        run, cum = run + int(c), cum + int(c)
        if run >= min_count and len(runs) < m and cum >= targets[len(runs)]:
            runs.append((start, i))
            run, start = 0, i + 1
    if run and runs:
        runs[-1] = (runs[-1][0], len(raw) - 1)
    out = np.zeros_like(raw)
    for a, b in runs:
        n = int(raw[a : b + 1].sum())
        mid = a + int(np.searchsorted(np.cumsum(raw[a : b + 1]), (n + 1) // 2))  # the bin of the run's middle patient
        out[mid] = n
    return out


def histogram_quantiles(edges: np.ndarray, counts: np.ndarray, q: np.ndarray | list[float]) -> np.ndarray:
    """Quantiles ``q`` of the distribution whose histogram is ``counts [K]`` on ``edges [K + 1]`` (uniform
    within each bin: the empirical CDF interpolated linearly). ``ValueError`` for an empty histogram."""
    edges, counts = np.asarray(edges, float), np.asarray(counts, float)
    total = counts.sum()
    if total <= 0:
        raise ValueError("an empty histogram has no quantiles (every site's bins were suppressed or empty)")
    cdf = np.concatenate([[0.0], np.cumsum(counts) / total])  # at each edge
    q = np.clip(np.asarray(q, float), 0.0, 1.0)
    i = np.clip(np.searchsorted(cdf, q, side="left"), 1, len(counts))  # bin i holds the q-th quantile
    i = np.where((q == 0) & (counts[i - 1] == 0), np.argmax(counts > 0) + 1, i)  # q = 0: the first filled bin
    frac = (q - cdf[i - 1]) / np.maximum(counts[i - 1] / total, 1e-300)
    return edges[i - 1] + np.clip(frac, 0.0, 1.0) * (edges[i] - edges[i - 1])


def pooled_histogram(values: np.ndarray, site: np.ndarray, edges: np.ndarray, min_count: int) -> np.ndarray:
    """The server's sum of every site's :func:`site_histogram` (``site [P]``: each value's site)."""
    values, site = np.asarray(values, float), np.asarray(site)
    total = np.zeros(len(edges) - 1, np.int64)
    for s in np.unique(site):
        total += site_histogram(values[site == s], edges, min_count)
    return total


def risk_cutpoints(log_hz: np.ndarray, site: np.ndarray, min_count: int) -> dict[str, float | list[float]]:
    """Risk-group cut-points (``median``, ``tertiles``) of training log hazards ``[P]`` from the sum of the
    sites' histograms of standardised log hazards on :data:`RISK_EDGES` (mean and sd from the sites' count, sum
    and sum of squares): never a patient's own log hazard."""
    if len(log_hz) == 0:
        return {"median": 0.0, "tertiles": []}
    log_hz, site = np.asarray(log_hz, float), np.asarray(site)
    k = min_count
    if not any((site == s).sum() >= k for s in np.unique(site)):
        # no site has k patients (a federation would not have trained): one process holds them all
        log.warning("risk cut-points: no site has %d training patients; histogram bins are not merged", k)
        k = 1
    from pipeline.stats.risk_cuts import cutpoints_from_histogram, pooled_mean_sd

    # a Cox log hazard has an arbitrary offset and scale: standardise it with the pooled mean and sd, from each
    # site's (n, sum, sum of squares) over at least k patients, so the pre-agreed grid fits any model
    parts = [(m.sum(), log_hz[m].sum(), (log_hz[m] ** 2).sum()) for m in (site == s for s in np.unique(site))]
    mean, sd = pooled_mean_sd(parts, k)
    hist = pooled_histogram((log_hz - mean) / sd, site, RISK_EDGES, k)
    return cutpoints_from_histogram(hist, RISK_EDGES, mean, sd)  # a deployment's server runs the same two steps


def time_edges(end: float, k: int = TIME_BINS) -> np.ndarray:
    """The pre-agreed event-time histogram edges ``[k + 1]`` on ``[0, end]`` (``end``: :func:`nice_ceil` of the
    largest follow-up, which each site can send rounded)."""
    return np.linspace(0.0, float(end), k + 1)


def follow_up_ceiling(time: np.ndarray, min_count: int) -> float:
    """What a site says about its follow-up: the ``min_count``-th largest of its times ``[P]`` rounded up to two
    significant digits (:func:`nice_ceil`), i.e. "at least k patients were followed up to about here"; 0.0
    with fewer than ``min_count`` patients. The consortium's time grids end at the largest of these."""
    t = np.sort(np.asarray(time, float))
    return nice_ceil(float(t[-min_count])) if len(t) >= max(1, min_count) else 0.0


def bins_from_histogram(edges: np.ndarray, counts: np.ndarray, n_bins: int) -> np.ndarray:
    """Discrete-time bin edges ``[n_bins + 1]``: 0, the event-time quantiles of the summed site histogram
    ``counts`` on ``edges`` (:func:`time_edges`), and the grid's end. ``ValueError`` for an empty histogram."""
    if np.asarray(counts).sum() == 0:
        raise ValueError("discrete-time bins: no site has federated.min_count training events (every bin suppressed)")
    inner = histogram_quantiles(edges, counts, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.concatenate([[0.0], inner, [float(edges[-1])]])


def discrete_time_bins(
    time: np.ndarray, event: np.ndarray, site: np.ndarray, n_bins: int, min_count: int
) -> np.ndarray:
    """Discrete-time bin edges ``[n_bins + 1]`` from aggregates, as a deployment computes them: the grid ends
    at the largest site :func:`follow_up_ceiling`, each site sends its event-time histogram on
    :func:`time_edges` (:func:`site_histogram`), the server takes :func:`bins_from_histogram` of their sum.
    No edge is a patient's time. ``ValueError`` when no site has ``min_count`` events."""
    time, event, site = np.asarray(time, float), np.asarray(event, bool), np.asarray(site)
    if not event.any():
        raise ValueError(f"discrete-time bins need event times: all {len(time)} training patients are censored")
    end = max(follow_up_ceiling(time[site == s], min_count) for s in np.unique(site))
    edges = time_edges(end if end > 0 else nice_ceil(float(time.max())))
    return bins_from_histogram(edges, pooled_histogram(time[event], site[event], edges, min_count), n_bins)
