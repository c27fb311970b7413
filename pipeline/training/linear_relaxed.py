"""The relaxed elastic net of the linear family (``train.linear_relax``; glmnet's ``relax=TRUE``).

An elastic-net fit at penalty ``c`` shrinks the coefficients it keeps by the same penalty that selects them: on a
sparse truth with strong effects the kept coefficients are biased towards 0. The relaxed fit (Meinshausen 2007, in
glmnet's form: Hastie, Tibshirani & Tibshirani 2020) keeps the elastic net's active set ``A`` (its non-zero
coefficients ``beta_c``) and blends them with the unpenalised refit on that set::

    beta_0 = argmin over beta_A of (1 / N) * sum_s nll_s(beta_A) + (RELAX_RIDGE / 2) * |beta_A|^2   (others 0)
    beta_gamma = gamma * beta_c + (1 - gamma) * beta_0

``gamma = 1`` is the elastic-net fit itself; ``gamma = 0`` the refit. The small ridge :data:`RELAX_RIDGE` keeps the
refit finite when the active set separates the events and makes it strictly convex: one optimum whatever the warm
start. For one stratum and Breslow ties ``beta_0`` is scikit-survival's ``CoxPHSurvivalAnalysis(alpha=RELAX_RIDGE *
N)`` on the active columns. One refit per fit serves every ``gamma`` (the blend needs no further round), which is why
glmnet's form was kept over a refit per ``gamma`` at the penalty ``gamma * c`` (2.6x today's rounds on TCGA-BRCA:
docs/benchmarks.md).

The pair ``(c, gamma)`` (with the mix) is chosen by the same K-fold CV as ``c``
(:func:`pipeline.training.linear_fit.fit_with_cv`): in fold ``k`` the active set is that fold's own elastic-net fit's
(the selection stays inside the CV), the fold's refit is warm-started from its refit at the previous (larger) ``c``
(the elastic-net coefficients for newly active features), and each party scores every ``gamma`` as it scores every
``c`` (:meth:`~pipeline.training.linear_fit.Party.cv_score`). The sites' answers are the same kinds as the elastic
net's (loss and gradient over the full coefficient vector, patient count; one CV score per candidate), pooled or
federated; there are more of them (a refit per fold and penalty; a CV score per ``gamma``). Ridge (``a = 0``) has no
active set to relax (every coefficient is non-zero): its path is never relaxed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.training.linear_solver import RidgeFit, fit_ridge, unit_or_auto

if TYPE_CHECKING:
    from pipeline.training.linear_fit import Party

# train.linear_relax=auto, fixed a priori: the penalty scales tried on the elastic net's active set (1 = not relaxed)
RELAX_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
# the ridge per patient added to every refit (gamma < 1), fixed a priori: the smallest penalty of the ridge grid
# (pipeline.training.linear_fit.PENALTY_GRID), "nearly unpenalised" for standardised covariates
RELAX_RIDGE = 1e-3


def relax_values(relax: float | str) -> tuple[float, ...]:
    """The scales ``gamma`` the CV tries for ``train.linear_relax``: the value, or :data:`RELAX_GRID` for ``auto``."""
    return unit_or_auto(relax, "train.linear_relax", RELAX_GRID)


def refit(
    parties: Sequence[Party], beta: np.ndarray, drop_fold: int | None = None, x0: np.ndarray | None = None
) -> RidgeFit:
    """``beta_0``: the refit on the active set of the elastic-net coefficients ``beta [F]`` with the ridge
    :data:`RELAX_RIDGE` only, over the parties' patients outside fold ``drop_fold``, warm-started from ``x0``
    (default ``beta``; only its active entries are used). An empty active set is the null model, with no round."""
    active = np.asarray(beta) != 0
    if not active.any():
        return RidgeFit(np.zeros(len(active)), 0, True, float("nan"), 0.0)
    start = np.where(active, beta if x0 is None else x0, 0.0)
    return fit_ridge(parties, RELAX_RIDGE, drop_fold, start, support=active)


def blend(beta: np.ndarray, beta0: np.ndarray, gamma: float) -> np.ndarray:
    """``gamma * beta + (1 - gamma) * beta0``: the relaxed coefficients ``[F]`` at ``gamma`` (1: ``beta`` itself)."""
    return beta if gamma == 1 else gamma * np.asarray(beta) + (1.0 - gamma) * np.asarray(beta0)


def final_fit(parties: Sequence[Party], c: float, l1_ratio: float, gamma: float) -> tuple[np.ndarray, int, bool]:
    """``(beta [F], rounds, converged)``: the elastic net at ``(c, l1_ratio)`` over all the parties' patients and, for
    ``gamma`` < 1, its blend with the refit on its active set."""
    fit = fit_ridge(parties, c, l1_ratio=l1_ratio)
    if gamma == 1:
        return fit.beta, fit.evaluations, fit.converged
    again = refit(parties, fit.beta)
    return blend(fit.beta, again.beta, gamma), fit.evaluations + again.evaluations, fit.converged and again.converged


def _record(parties: Sequence[Party], c: float, l1_ratio: float, gamma: float, betas: list[np.ndarray], evals: int,
            converged: bool) -> dict:  # fmt: skip
    """The CV record of the candidate ``(c, l1_ratio, gamma)`` whose fold coefficients are ``betas``: the summed party
    scores (as :func:`pipeline.training.linear_fit.cross_validate`'s records, plus ``relax``)."""
    scores = [s for s in (p.cv_score(betas) for p in parties) if s is not None]
    cvl, conc, comp = (float(sum(s[i] for s in scores)) for i in range(3))
    return {
        "penalty": c,
        "l1_ratio": l1_ratio,
        "relax": gamma,
        "cv_loglik": cvl if scores else float("nan"),
        "cv_cindex": conc / comp if comp else float("nan"),
        "parties_scored": len(scores),
        "evaluations": evals,
        "converged": converged,
        "nonzero": float(np.mean([(b != 0).sum() for b in betas])),
    }


def cross_validate_relaxed(
    parties: Sequence[Party], grid: Sequence[float], l1_ratio: float, gammas: Sequence[float]
) -> list[dict]:
    """The CV record of every ``(c, gamma)`` of ``grid`` x ``gammas`` (in that order) for the elastic net
    ``l1_ratio`` > 0: the path from the largest ``c`` down, each fold warm-started from the previous ``c``'s fit (as
    :func:`pipeline.training.linear_fit.cross_validate`), and at each ``c`` each fold's refit on its active set
    (module docstring), blended for every ``gamma``. ``evaluations``: a ``c``'s rounds (its elastic-net fits and
    refits) go to its largest ``gamma``'s record, so that the records' sum is every round of the path."""
    assert l1_ratio > 0, "ridge has no active set to relax"
    n_folds = int(max(int(p.fold.max()) for p in parties)) + 1
    warm: list[np.ndarray | None] = [None] * n_folds
    warm0: list[np.ndarray | None] = [None] * n_folds
    out: dict[tuple[float, float], dict] = {}
    for c in sorted(grid, reverse=True):
        fits = [fit_ridge(parties, c, k, warm[k], l1_ratio=l1_ratio) for k in range(n_folds)]
        warm = [f.beta for f in fits]
        relaxed = any(g < 1 for g in gammas)
        starts = [f.beta if w is None else np.where(w != 0, w, f.beta) for f, w in zip(fits, warm0, strict=True)]
        refits = [refit(parties, f.beta, k, starts[k]) for k, f in enumerate(fits)] if relaxed else []
        warm0 = [r.beta for r in refits] if relaxed else warm0
        pending = sum(f.evaluations for f in fits + refits)  # this c's rounds, not yet in a record
        for g in sorted(gammas, reverse=True):
            betas = [blend(f.beta, r.beta, g) for f, r in zip(fits, refits, strict=True)] if g < 1 else warm
            ok = all(f.converged for f in (fits + refits if g < 1 else fits))
            out[(c, g)] = _record(parties, c, l1_ratio, g, betas, pending, ok)
            pending = 0
    return [out[(c, g)] for c in grid for g in gammas]
