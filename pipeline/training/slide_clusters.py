"""Tile phenotypes for the linear family's slide term (``model.linear_slide=composition|both``), from site sums.

A bag-of-visual-words slide representation: the tiles' scores on the slide projection's ``r`` principal directions
(:func:`pipeline.training.slide_norm.prepare_slide_projection`) are clustered into ``K`` phenotypes by k-means,
and each slide is described by the fractions of its tiles in each phenotype (:meth:`models.linear.LinearSurvival.
slide_fractions`), standardised over the training slides. :func:`prepare_slide_term` runs both steps.

k-means runs as Lloyd iterations over per-site aggregates, so no tile leaves a site: each round the server sends
the centroids ``[K, r]``; each site assigns its training patients' tiles to the nearest one and answers
:func:`cluster_sums` (``slide_clusters``: per cluster the number of its patients with a tile there, the sum of
their fractions and the sum of their tiles' scores, each patient's tiles weighted ``1 / N_i`` so each patient counts
once); the server moves each centroid to the weighted mean (:func:`lloyd_step`) until no centroid moves by more
than :data:`LLOYD_TOL` of the scores' spread, at most :data:`LLOYD_ROUNDS` rounds. A cluster cell of 1 .. k-1 of a
site's patients is sent empty (its centroid is then the other sites' mean, or stays). Seeding is deterministic and
reveals no tile: centroid ``j`` starts at ``(-1)^j`` times one SD of the slides' mean scores along principal
direction ``j // 2`` (the projection's ``slide_pc_scale``, itself from site sums: :func:`initial_centroids`). Then
each site sends the sum and sum of squares of its patients' fractions (``slide_composition``) for their mean and
scale. Centralised, the same code runs on the training data's sites with every answer accepted and the same
smallest cell, so pooled and federated fits agree wherever the federation keeps every site.

Separate from the biomarker table's tile clusters (:mod:`pipeline.outputs.biomarkers`: scanpy Leiden on a kNN graph
of the pooled tiles, for a report): the model needs centroids it can store and apply to a new slide, fitted from
site sums; Leiden has neither a rule for unseen tiles nor a federated form.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from data_specs.summaries import MIN_SUMMARY_PATIENTS
from models.linear import LinearSurvival
from pipeline.training.data import CohortData
from pipeline.training.slide_norm import prepare_slide_projection, slide_norm_from_summaries

log = logging.getLogger(__name__)

LLOYD_ROUNDS = 30  # at most, fixed a priori
LLOYD_TOL = 1e-4  # stop when no centroid moves by more than this times the slides' mean scores' overall SD

Release = Callable[[str, str, dict], bool]


def initial_centroids(k: int, scale: np.ndarray) -> np.ndarray:
    """``[k, r]``: centroid ``j`` at ``(-1)^j * scale[a]`` on axis ``a = (j // 2) mod r``, times ``1 + j // (2 r)``
    (distinct points for any ``k``)."""
    r = len(scale)
    out = np.zeros((k, r))
    for j in range(k):
        a = (j // 2) % r
        out[j, a] = (-1.0) ** j * float(scale[a]) * (1 + j // (2 * r))
    return out


def _assign(scores: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d2 = (scores**2).sum(1, keepdims=True) - 2 * scores @ centroids.T + (centroids**2).sum(1)  # (N, K)
    return d2.argmin(1)


def _tile_scores(bag: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    return (bag.astype(np.float64) - mean) @ comps.T  # (N, r)


def cluster_sums(
    data: CohortData, idx: np.ndarray, mean: np.ndarray, comps: np.ndarray, centroids: np.ndarray, min_cell: int
) -> dict | None:
    """One site's Lloyd answer over the patients ``idx`` with tiles: ``{n_patients, n_tiles, patients [K], mass [K],
    sum [K, r]}`` (``mass``: sum of the patients' fractions; ``sum``: of their tile scores, weighted ``1 / N_i``).
    Clusters with 1 .. ``min_cell - 1`` patients are sent as 0. None below ``MIN_SUMMARY_PATIENTS`` patients."""
    assert data.bags is not None
    k, r = centroids.shape
    bags = [data.bags[i] for i in idx if len(data.bags[i])]
    if len(bags) < max(MIN_SUMMARY_PATIENTS, min_cell):
        return None
    patients, mass, total = np.zeros(k), np.zeros(k), np.zeros((k, r))
    for b in bags:
        t = _tile_scores(b, mean, comps)
        lab = _assign(t, centroids)
        patients += np.bincount(lab, minlength=k) > 0
        mass += np.bincount(lab, minlength=k) / len(b)
        np.add.at(total, lab, t / len(b))
    small = (patients > 0) & (patients < min_cell)
    patients[small], mass[small], total[small] = 0.0, 0.0, 0.0
    return {"n_patients": len(bags), "n_tiles": sum(len(b) for b in bags), "patients": patients, "mass": mass,
            "sum": total}  # fmt: skip


def lloyd_step(answers: list[dict], centroids: np.ndarray) -> np.ndarray:
    """The new centroids ``[K, r]``: each cluster's summed scores over its summed mass; a cluster no site filled
    keeps its centroid."""
    mass = np.sum([a["mass"] for a in answers], 0)  # (K,)
    total = np.sum([a["sum"] for a in answers], 0)  # (K, r)
    out = centroids.copy()
    filled = mass > 0
    out[filled] = total[filled] / mass[filled, None]
    return out


def fraction_summary(
    model: LinearSurvival, data: CohortData, idx: np.ndarray, min_count: int = MIN_SUMMARY_PATIENTS
) -> dict | None:
    """``{n, sum [K], sumsq [K]}`` of the patients' tile fractions (:meth:`LinearSurvival.slide_fractions`) over the
    patients ``idx`` with tiles; None below ``min_count`` of them."""
    assert data.bags is not None
    f = bag_fractions(model, [data.bags[i] for i in idx if len(data.bags[i])])
    if len(f) < max(MIN_SUMMARY_PATIENTS, min_count):
        return None
    return {"n": len(f), "sum": f.sum(0), "sumsq": (f**2).sum(0)}


def bag_fractions(model: LinearSurvival, bags: list[np.ndarray]) -> np.ndarray:
    """``[len(bags), K]`` float64: each bag's fractions of tiles per cluster (0 for an empty bag)."""
    out = np.zeros((len(bags), model.slide_clusters))
    for j, b in enumerate(bags):
        if len(b):
            x = torch.from_numpy(np.asarray(b))[None]  # (1, N, D)
            out[j] = model.slide_fractions(x, torch.ones(x.shape[:2], dtype=torch.bool))[0].numpy()
    return out


SLIDE_TERMS = ("pcs", "composition", "both")


def prepare_slide_term(
    model: LinearSurvival,
    data: CohortData,
    idx: np.ndarray,
    r: int,
    level: str = "tiles",
    release: Release | None = None,
    slide: str = "pcs",
    clusters: int = 8,
    min_cell: int = MIN_SUMMARY_PATIENTS,
) -> dict | None:
    """The linear family's slide term over the patients ``idx``: the projection
    (:func:`pipeline.training.slide_norm.prepare_slide_projection` with ``r``, ``level``, ``release``), then for
    ``slide`` (``model.linear_slide``) ``composition`` or ``both`` ``clusters`` tile phenotypes in its space
    (:func:`prepare_slide_clusters`, from the sites whose moments were used; ``min_cell``: the fewest patients behind
    a site's cluster cell). Returns the projection's record, with ``slide`` (the term used) and ``clusters``."""
    if slide not in SLIDE_TERMS:
        raise ValueError(f"unknown slide term '{slide}': valid names are {list(SLIDE_TERMS)}")
    proj = prepare_slide_projection(model, data, idx, r, level, release)
    if slide == "pcs" or proj is None:
        return proj
    sites = {s: g for s, g in data.subset_sites(np.asarray(idx, int)).items() if s in proj["sites"]}
    ok = release or (lambda site, kind, summary: True)
    comp = prepare_slide_clusters(model, data, sites, clusters, slide == "both", ok, min_cell)
    return {**proj, "slide": slide if comp is not None else "pcs", "clusters": comp}


def prepare_slide_clusters(
    model: LinearSurvival,
    data: CohortData,
    sites: dict[str, np.ndarray],
    k: int,
    keep_pcs: bool,
    release: Release,
    min_cell: int = MIN_SUMMARY_PATIENTS,
) -> dict | None:
    """Fit ``k`` tile phenotypes for ``model`` (its projection already set) from the sites' patients ``sites`` by
    federated Lloyd iterations (module docstring). ``release(site, kind, message)``: as in
    :func:`pipeline.training.slide_norm.prepare_slide_projection`. Returns what was done (None: no cluster fitted)."""
    mean = model.get_buffer("slide_mean").double().numpy()
    comps = model.get_buffer("slide_components").double().numpy()
    scale = model.get_buffer("slide_pc_scale").double().numpy()
    centroids = initial_centroids(k, scale)
    spread = float(np.sqrt((scale**2).sum()))
    rounds, moved = 0, np.inf
    answered: list[str] = []
    while rounds < LLOYD_ROUNDS and moved > LLOYD_TOL * spread:
        answers = {s: cluster_sums(data, g, mean, comps, centroids, min_cell) for s, g in sites.items()}
        answers = {s: a for s, a in answers.items() if a is not None and release(s, "slide_clusters", a)}
        if not answers:
            log.warning("slide clusters: no site could send its cluster sums; no composition")
            return None
        new = lloyd_step(list(answers.values()), centroids)
        moved = float(np.sqrt(((new - centroids) ** 2).sum(1)).max())
        centroids, rounds, answered = new, rounds + 1, sorted(answers)
    model.set_slide_clusters(torch.from_numpy(centroids), torch.zeros(k), torch.ones(k), keep_pcs)
    summaries = [fraction_summary(model, data, g, min_cell) for g in sites.values()]
    ok = [m for s, m in zip(sites, summaries, strict=True) if m is not None and release(s, "slide_composition", m)]
    fitted = slide_norm_from_summaries(ok, k)
    if fitted is None:
        log.warning("slide clusters: fewer than 2 slides in the composition summaries; no composition")
        model.set_slide_projection(*(model.get_buffer(n) for n in ("slide_components", "slide_pc_mean",
                                                                   "slide_pc_scale")))  # fmt: skip
        return None
    model.set_slide_clusters(torch.from_numpy(centroids), torch.from_numpy(fitted[0]), torch.from_numpy(fitted[1]),
                             keep_pcs)  # fmt: skip
    return {"k": k, "keep_pcs": keep_pcs, "lloyd_rounds": rounds, "converged": moved <= LLOYD_TOL * spread,
            "sites": answered, "composition_mean": [round(float(v), 4) for v in fitted[0]]}  # fmt: skip
