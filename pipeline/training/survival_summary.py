"""What a trained model keeps for survival curves, from aggregates only: one rule for the embedded run and a
deployment's post-training rounds (``pipeline.federated.finish``).

The time grids end at the largest site :func:`~pipeline.stats.curves.follow_up_ceiling` (each site's k-th
largest follow-up rounded up to two significant digits), never at a pooled maximum, and reach at least 10 years
when the time unit is known. Default horizons are 1, 3
and 5 years in the cohort's time unit up to that end; when the unit is unknown (or no year fits), the quartiles
of the summed site histograms of training event times on :func:`~pipeline.stats.curves.time_edges` (bins under
k merged). The Breslow baseline (Cox heads) is combined from per-site summaries on the coarse pre-agreed grid
(:func:`~pipeline.stats.curves.coarse_grid`, snapped to hold the horizons): no exact event time is kept.
"""

from __future__ import annotations

import numpy as np

from pipeline.stats.curves import (
    BreslowBaseline,
    SiteSummary,
    coarse_grid,
    combine,
    follow_up_ceiling,
    grid_with,
    histogram_quantiles,
    pooled_histogram,
    time_edges,
    years_per_unit,
)
from pipeline.training.data import CohortData
from pipeline.training.predict import predict

MIN_SITE_EVENTS = 10  # a site gets its own baseline only with this many training events (else the pooled one)


def baseline_min_events(min_count: int) -> int:
    """k of the released baseline: each site's steps hold at least this many events (``site_summary``'s
    ``min_events``), and a site gets its own baseline only with this many training events."""
    return max(MIN_SITE_EVENTS, int(min_count))


APRIORI_YEARS = 10  # with a known time unit the grid reaches this many years whatever the data say


def follow_up_end(ceilings: list[float], time_unit: str | None = None) -> float:
    """The consortium's time-grid end: the largest of the sites' follow-up ceilings (1.0 when all are 0), and
    at least :data:`APRIORI_YEARS` years when ``time_unit`` is known. The k-th largest follow-up of a small site is
    near its median, so without the a-priori end the grid (and the 5-year horizon) would stop there; past the last
    training event the baseline is flat."""
    end = max((float(c) for c in ceilings), default=0.0)
    per_year = years_per_unit(time_unit)
    if per_year is not None:
        end = max(end, float(per_year * APRIORI_YEARS))
    return end if end > 0 else 1.0


def year_horizons(end: float, time_unit: str | None) -> list[float]:
    """1, 3 and 5 years in ``time_unit`` that are at most ``end``; [] for an unknown unit or none fitting."""
    per_year = years_per_unit(time_unit)
    return [] if per_year is None else [float(per_year * y) for y in (1, 3, 5) if per_year * y <= end]


def horizons_from_histogram(end: float, counts: np.ndarray) -> list[float]:
    """Quartiles (2 significant digits) of the summed event-time histogram ``counts`` on ``time_edges(end)``."""
    counts = np.asarray(counts)
    if counts.sum() == 0:
        return []
    q = histogram_quantiles(time_edges(end, len(counts)), counts, [0.25, 0.5, 0.75])
    return sorted({float(f"{v:.2g}") for v in q})


def baseline_grid(end: float, horizons: list[float]) -> np.ndarray:
    """The baseline grid ``[K]``: :func:`coarse_grid` up to ``end``, snapped to hold every horizon."""
    return grid_with(coarse_grid(end), horizons)


def baseline_from_summaries(summaries: dict[str, SiteSummary], min_site_events: int = MIN_SITE_EVENTS) -> dict:
    """The Breslow baseline state from the sites' summaries on one grid: pooled over all of them, per site for
    sites with at least ``min_site_events`` events (as :meth:`BreslowBaseline.fit` combines them)."""
    if not summaries:
        raise ValueError("baseline: no site sent a summary")
    grid = next(iter(summaries.values())).grid
    by_site = {s: combine([v]) for s, v in summaries.items() if v.events.sum() >= max(1, min_site_events)}
    return BreslowBaseline(np.asarray(grid, float), combine(list(summaries.values())), by_site).state()


def survival_summary(model, data: CohortData, time_unit: str | None = None, min_count: int = 1) -> dict:
    """The embedded run's ``horizons`` and (Cox heads with training events) ``baseline``, computed in one
    process by the same rule a deployment runs across its sites (module docstring): grid end from each site's
    follow-up ceiling at ``min_count`` (k), horizon quartiles from the sites' histograms (bins under k merged)."""
    tr = np.asarray(data.splits["train"])
    t, e, site = data.time[tr], data.event[tr].astype(bool), data.site[tr]
    k = min_count if any((site == s).sum() >= min_count for s in np.unique(site)) else 1
    ceilings = [follow_up_ceiling(t[site == s], k) for s in np.unique(site)] if len(tr) else []
    end = follow_up_end(ceilings, time_unit)
    hz = year_horizons(end, time_unit)
    if not hz and e.any():
        hz = horizons_from_histogram(end, pooled_histogram(t[e], site[e], time_edges(end), k))
    out: dict = {"horizons": hz}
    if getattr(model, "n_bins", 0) == 0 and e.any():
        lh = predict(model, data, tr).log_hz
        grid = baseline_grid(end, hz)
        base = BreslowBaseline.fit(t, e, lh, site, data.sites, grid, baseline_min_events(min_count), True)
        if base.cumhaz[-1] > 0:  # no site released steps of >= k events: no baseline, as the finish round
            out["baseline"] = base.state()  # risk set at each interval's start: see curves.site_summary
    return out
