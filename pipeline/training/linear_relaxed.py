"""The relaxed elastic net of the linear family (``train.linear_relax``; glmnet's ``relax``, Meinshausen 2007).

An elastic-net fit at penalty ``c`` shrinks the coefficients it keeps by the same penalty that selects them: on a
sparse truth with strong effects the kept coefficients are biased towards 0. The relaxed fit keeps the elastic net's
active set ``A`` (its non-zero coefficients at ``c``, mix ``a``) and refits on it with the penalty scaled by
``gamma`` (the other coefficients stay 0)::

    f_gamma(beta_A) = (1 / N) * sum_s nll_s(beta_A) + gamma * c * (a * |beta_A|_1 + (1 - a) / 2 * |beta_A|^2)
                      + (RELAX_RIDGE / 2) * |beta_A|^2                      (gamma < 1)

``gamma = 1`` is the elastic-net fit itself (no refit). The small ridge :data:`RELAX_RIDGE` keeps ``gamma = 0`` (the
unpenalised refit) finite when the active set separates the events, and makes every refit strictly convex: one
optimum whatever the warm start. For one stratum and Breslow ties a refit is scikit-survival's
``CoxnetSurvivalAnalysis(alphas=[lam1 + lam2], l1_ratio=lam1 / (lam1 + lam2))`` on the active columns, with
``lam1 = gamma c a`` and ``lam2 = gamma c (1 - a) + RELAX_RIDGE`` (``gamma = 0``: ``CoxPHSurvivalAnalysis(alpha=
RELAX_RIDGE * N)``).

The pair ``(c, gamma)`` (with the mix) is chosen by the same K-fold CV as ``c``
(:func:`pipeline.training.linear_fit.fit_with_cv`): in fold ``k`` the active set is that fold's own elastic-net fit's
(the selection stays inside the CV), the refits run from the largest ``gamma`` down, each warm-started from the
previous one, and each party scores every ``gamma`` as it scores every ``c`` (:meth:`~pipeline.training.linear_fit.
Party.cv_score`). The sites' answers are the same kinds as the elastic net's (loss and gradient over the full
coefficient vector, patient count; one CV score per candidate), pooled or federated; there are more of them (a refit
per fold, penalty and ``gamma``; a CV score per ``gamma``). Ridge (``a = 0``) has no active set to relax (every
coefficient is non-zero, and ``gamma * c`` is another point of its own grid): its path is never relaxed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.training.linear_solver import RidgeFit, fit_ridge

if TYPE_CHECKING:
    from pipeline.training.linear_fit import Party

# train.linear_relax=auto, fixed a priori: the penalty scales tried on the elastic net's active set (1 = not relaxed)
RELAX_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
# the ridge per patient added to every refit (gamma < 1), fixed a priori: the smallest penalty of the ridge grid
# (pipeline.training.linear_fit.PENALTY_GRID), "nearly unpenalised" for standardised covariates
RELAX_RIDGE = 1e-3


def relax_values(relax: float | str) -> tuple[float, ...]:
    """The scales ``gamma`` the CV tries for ``train.linear_relax``: the value itself, or :data:`RELAX_GRID` for
    ``auto``. Raises ``ValueError`` naming the field and the value when it is neither in [0, 1] nor ``auto``."""
    if isinstance(relax, str) and relax == "auto":
        return RELAX_GRID
    if isinstance(relax, bool) or not isinstance(relax, int | float) or not 0.0 <= relax <= 1.0:
        raise ValueError(f"train.linear_relax must be a number in [0, 1] or 'auto', got {relax!r}")
    return (float(relax),)


def relaxed_penalty(c: float, l1_ratio: float, gamma: float) -> tuple[float, float]:
    """``(c', l1_ratio')`` of the refit at ``gamma`` < 1 in :func:`~pipeline.training.linear_solver.fit_ridge`'s
    parametrisation: ``lam1 = gamma c a``, ``lam2 = gamma c (1 - a) + RELAX_RIDGE``, ``c' = lam1 + lam2``."""
    lam1, lam2 = gamma * c * l1_ratio, gamma * c * (1.0 - l1_ratio) + RELAX_RIDGE
    return lam1 + lam2, lam1 / (lam1 + lam2)


def refit(
    parties: Sequence[Party],
    beta: np.ndarray,
    c: float,
    l1_ratio: float,
    gamma: float,
    drop_fold: int | None = None,
    x0: np.ndarray | None = None,
) -> RidgeFit:
    """The relaxed fit at ``gamma`` < 1 on the active set of the elastic-net coefficients ``beta [F]`` (fitted at
    ``c``, ``l1_ratio``) over the parties' patients outside fold ``drop_fold``, warm-started from ``x0`` (default
    ``beta``). An empty active set is the null model, with no round."""
    assert gamma < 1, "gamma = 1 is the elastic-net fit itself"
    active = np.asarray(beta) != 0
    if not active.any():
        return RidgeFit(np.zeros(len(active)), 0, True, float("nan"), 0.0)
    c_eff, a_eff = relaxed_penalty(c, l1_ratio, gamma)
    start = np.where(active, beta if x0 is None else x0, 0.0)
    return fit_ridge(parties, c_eff, drop_fold, start, l1_ratio=a_eff, support=active)


def _record(parties: Sequence[Party], c: float, l1_ratio: float, gamma: float, fits: list[RidgeFit], evals: int):
    """The CV record of the candidate ``(c, l1_ratio, gamma)`` whose fold fits are ``fits``: the summed party scores
    (as :func:`pipeline.training.linear_fit.cross_validate`'s records, plus ``relax``)."""
    scores = [s for s in (p.cv_score([f.beta for f in fits]) for p in parties) if s is not None]
    cvl, conc, comp = (float(sum(s[i] for s in scores)) for i in range(3))
    return {
        "penalty": c,
        "l1_ratio": l1_ratio,
        "relax": gamma,
        "cv_loglik": cvl if scores else float("nan"),
        "cv_cindex": conc / comp if comp else float("nan"),
        "parties_scored": len(scores),
        "evaluations": evals,
        "converged": all(f.converged for f in fits),
        "nonzero": float(np.mean([(f.beta != 0).sum() for f in fits])),
    }


def cross_validate_relaxed(
    parties: Sequence[Party], grid: Sequence[float], l1_ratio: float, gammas: Sequence[float]
) -> list[dict]:
    """The CV record of every ``(c, gamma)`` of ``grid`` x ``gammas`` (in that order) for the elastic net
    ``l1_ratio`` > 0: the path from the largest ``c`` down, each fold warm-started from the previous ``c``'s fit (as
    :func:`pipeline.training.linear_fit.cross_validate`), then at each ``c`` each fold's refits on its active set for
    ``gamma`` < 1, from the largest down, each warm-started from the previous. ``evaluations``: the rounds of the
    candidate's own refits; the elastic-net fits' rounds go to the largest ``gamma``'s record (so that the records'
    sum is every round of the path, also when ``gammas`` does not hold 1)."""
    assert l1_ratio > 0, "ridge has no active set to relax"
    n_folds = int(max(int(p.fold.max()) for p in parties)) + 1
    warm: list[np.ndarray | None] = [None] * n_folds
    out: dict[tuple[float, float], dict] = {}
    for c in sorted(grid, reverse=True):
        fits = [fit_ridge(parties, c, k, warm[k], l1_ratio=l1_ratio) for k in range(n_folds)]
        warm = [f.beta for f in fits]
        pending = sum(f.evaluations for f in fits)  # the elastic-net fits' rounds, not yet in a record
        current = fits
        for g in sorted(gammas, reverse=True):
            if g < 1:
                current = [refit(parties, fits[k].beta, c, l1_ratio, g, k, current[k].beta) for k in range(n_folds)]
            evals = pending + (sum(f.evaluations for f in current) if g < 1 else 0)
            out[(c, g)] = _record(parties, c, l1_ratio, g, current, evals)
            pending = 0
    return [out[(c, g)] for c in grid for g in gammas]
