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
