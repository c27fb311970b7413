"""Standardisation of mean-pooled tile features for the linear model family, from per-site summaries.

Each site summarises its own training patients' mean-pooled tile features (:func:`slide_site_summary`:
count, per-feature sum and sum of squares; no per-patient value) and the cohort-level mean and scale come
from those summaries only (:func:`slide_norm_from_summaries`), as the omics and clinical normalisers do. A
site with fewer than ``MIN_SUMMARY_PATIENTS`` training slides contributes no summary (its summary would be a
patient's values).

Limitation: the summaries are built from the ``CohortData`` a process holds. In the embedded runtime that is every
site's data (every simulated site builds the same statistics); in a Flower deployment each site holds only its
own patients, and these slide summaries are not yet part of the statistics exchange, so a deployed linear model
with slides would standardise differently at each site. The linear family without slides is unaffected.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from data_specs.summaries import MIN_SUMMARY_PATIENTS
from models.linear import LinearSurvival
from models.skip import SlideStandardised
from pipeline.training.data import CohortData

log = logging.getLogger(__name__)


def slide_site_summary(data: CohortData, idx: np.ndarray) -> dict[str, np.ndarray | int] | None:
    """``{n, sum [D], sumsq [D]}`` (float64) of the mean-pooled tile features of the patients ``idx`` that
    have tiles; None when fewer than ``MIN_SUMMARY_PATIENTS`` do."""
    assert data.bags is not None
    means = [data.bags[i].astype(np.float64).mean(0) for i in idx if len(data.bags[i])]
    if len(means) < MIN_SUMMARY_PATIENTS:
        return None
    x = np.stack(means)  # (P_site, D)
    return {"n": len(means), "sum": x.sum(0), "sumsq": (x**2).sum(0)}


def slide_norm_from_summaries(summaries: list[dict], dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean ``[D]`` and scale ``[D]`` (the SD; 1 where the SD is ~0) from site summaries; None if fewer than 2
    slides in all."""
    n = sum(int(s["n"]) for s in summaries)
    if n < 2:
        return None
    total = np.sum([s["sum"] for s in summaries], 0)
    mean = total / n
    var = np.maximum(np.sum([s["sumsq"] for s in summaries], 0) / n - mean**2, 0.0)
    sd = np.sqrt(var)
    return mean, np.where(sd > 1e-8 * np.maximum(1.0, np.abs(mean)), sd, 1.0)


def prepare_slide_norm(model: torch.nn.Module, data: CohortData) -> None:
    """Give a model's linear slide term (a :class:`LinearSurvival`, or a network's ``model.skip=linear`` term)
    the slide standardisation of ``data``'s training patients, from per-site summaries; any other model is left
    alone. Every site of an embedded federation builds the same statistics (each from the same site summaries)."""
    target = model if isinstance(model, LinearSurvival) else getattr(model, "skip", None)
    if not isinstance(target, SlideStandardised) or target.feature_dim == 0 or data.bags is None:
        return
    summaries = []
    for site, idx in data.subset_sites(np.asarray(data.splits["train"])).items():
        s = slide_site_summary(data, idx)
        if s is None:
            log.warning("site %s: fewer than %d training slides, no slide summary", site, MIN_SUMMARY_PATIENTS)
        else:
            summaries.append(s)
    fitted = slide_norm_from_summaries(summaries, target.feature_dim)
    if fitted is None:
        log.warning("linear slide term: fewer than 2 training slides; tile features are not standardised")
        return
    target.set_slide_norm(torch.from_numpy(fitted[0]), torch.from_numpy(fitted[1]))


# --- the linear family's low-rank slide projection (model.linear_slide_pcs), from per-site aggregates ---

MOMENT_LEVELS = ("tiles", "patients")


def slide_moments(data: CohortData, idx: np.ndarray, level: str = "tiles") -> dict[str, np.ndarray | int] | None:
    """A site's second moments of tile features, ``{n_patients, n_rows, sum [D], cross [D, D]}`` (float64), over
    the patients ``idx`` that have tiles; None when fewer than ``MIN_SUMMARY_PATIENTS`` do.

    ``level="tiles"``: over every tile, each patient's tiles weighted ``1 / N_i`` (each patient counts once: ``sum``
    is the sum of the patients' mean tiles, ``cross`` the sum of their mean ``x x^T`` over tiles); ``n_rows`` is the
    number of tiles. ``level="patients"``: over the patients' mean tiles (``n_rows`` = patients; ``cross`` then has
    rank at most ``n_patients``: it spans the patients' own vectors).
    """
    if level not in MOMENT_LEVELS:
        raise ValueError(f"unknown slide moment level '{level}': valid names are {list(MOMENT_LEVELS)}")
    assert data.bags is not None
    bags = [data.bags[i].astype(np.float64) for i in idx if len(data.bags[i])]
    if len(bags) < MIN_SUMMARY_PATIENTS:
        return None
    dim = bags[0].shape[1]
    total, cross = np.zeros(dim), np.zeros((dim, dim))
    for b in bags:  # (N_i, D)
        m = b.mean(0)
        total += m
        cross += b.T @ b / len(b) if level == "tiles" else np.outer(m, m)
    rows = sum(len(b) for b in bags) if level == "tiles" else len(bags)
    return {"n_patients": len(bags), "n_rows": rows, "sum": total, "cross": cross}


def projection_from_moments(moments: list[dict], r: int) -> tuple[np.ndarray, np.ndarray]:
    """The pooled mean ``[D]`` and the top ``r`` principal directions ``[r, D]`` (unit rows, each with its largest
    component positive) of the summed site moments (:func:`slide_moments`)."""
    n = sum(int(m["n_patients"]) for m in moments)
    if n < 2:
        raise ValueError(f"slide projection: moments of {n} patients (need >= 2)")
    mean = np.sum([m["sum"] for m in moments], 0) / n
    cov = np.sum([m["cross"] for m in moments], 0) / n - np.outer(mean, mean)
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)  # ascending
    top = vecs[:, ::-1][:, :r].T  # (r, D)
    sign = np.sign(top[np.arange(len(top)), np.abs(top).argmax(1)])
    return mean, top * sign[:, None]


def score_summary(data: CohortData, idx: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> dict | None:
    """``{n, sum [r], sumsq [r]}`` of the projected mean tiles ``(m_i - mean) @ comps.T`` of the patients ``idx``
    with tiles (the format of :func:`slide_site_summary`); None below ``MIN_SUMMARY_PATIENTS``."""
    assert data.bags is not None
    u = [(data.bags[i].astype(np.float64).mean(0) - mean) @ comps.T for i in idx if len(data.bags[i])]
    if len(u) < MIN_SUMMARY_PATIENTS:
        return None
    x = np.stack(u)  # (P_site, r)
    return {"n": len(u), "sum": x.sum(0), "sumsq": (x**2).sum(0)}


def prepare_slide_projection(
    model: LinearSurvival, data: CohortData, idx: np.ndarray, r: int, level: str = "tiles", release=None
) -> dict | None:
    """Give ``model`` the top-``r`` principal directions of its sites' tile features over the patients ``idx``
    (each site's :func:`slide_moments`, then each site's :func:`score_summary` of the projected mean tiles for the
    scores' mean and scale). ``release(site, kind, summary) -> bool`` (federated: the disclosure check and the
    ledger) is called with every aggregate before the server uses it; False drops it. The projection is of the raw
    tile features (``slide_mean`` = pooled mean, ``slide_scale`` = 1), as the centralised baselines' PCA.
    Returns what was done (None: no slide term, ``r`` = 0 or no site could send its moments)."""
    if r <= 0 or model.feature_dim == 0 or data.bags is None:
        return None
    sites = data.subset_sites(np.asarray(idx, int))
    moments = {s: slide_moments(data, g, level) for s, g in sites.items()}
    ok = release or (lambda site, kind, summary: True)
    moments = {s: m for s, m in moments.items() if m is not None and ok(s, "slide_moments", m)}
    if not moments:
        log.warning("slide projection: no site has %d patients with slides; no projection", MIN_SUMMARY_PATIENTS)
        return None
    rank = min(r, model.feature_dim, sum(int(m["n_patients"]) for m in moments.values()) - 1)
    mean, comps = projection_from_moments(list(moments.values()), rank)
    scores = {s: score_summary(data, sites[s], mean, comps) for s in moments}
    scores = {s: m for s, m in scores.items() if m is not None and ok(s, "slide_scores", m)}
    fitted = slide_norm_from_summaries(list(scores.values()), rank)
    if fitted is None:
        return None
    model.set_slide_norm(torch.from_numpy(mean), torch.ones(model.feature_dim))
    model.set_slide_projection(torch.from_numpy(comps), torch.from_numpy(fitted[0]), torch.from_numpy(fitted[1]))
    rows = sum(int(m["n_rows"]) for m in moments.values())
    return {"r": rank, "level": level, "sites": sorted(moments), "patients": sum(int(m["n_patients"]) for m in
            moments.values()), "rows": rows}  # fmt: skip
