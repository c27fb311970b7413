"""The penalised, stratified Cox objective of :mod:`pipeline.training.linear_fit` and its exact minimiser.

:func:`cox_nll_grad` is the negative partial log-likelihood of one stratum and its gradient in closed form
(numpy; Efron or Breslow ties, the tie structure computed once per data set in :class:`TieGroups`);
:func:`fit_ridge` minimises ``f`` (the :mod:`~pipeline.training.linear_fit` docstring) over the strata's summed
full-batch answers by L-BFGS (ridge) or L-BFGS-B on ``beta = p - q`` (elastic net). The parties (pooled strata or
federated sites) and the penalty's choice by K-fold CV live in :mod:`~pipeline.training.linear_fit`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.training.linear_fit import Party

log = logging.getLogger(__name__)


MAX_ITER = 1000  # L-BFGS iterations (each one or a few evaluations = rounds)
GTOL = 1e-7  # L-BFGS stops when every gradient component of f is below this


_TINY = float(np.finfo(float).tiny)


class TieGroups:
    """What :func:`cox_nll_grad` needs of ``time [n]`` and ``event [n]`` besides the risk scores (computed once per
    data set): each patient's distinct-time group, the deaths per group and, for Efron ties, the weights of each
    group's tied deaths."""

    def __init__(self, time: np.ndarray, event: np.ndarray, ties: str = "efron"):
        self.event = np.asarray(event, bool)
        _, self.group = np.unique(time, return_inverse=True)
        self.n_groups = int(self.group.max()) + 1 if len(self.group) else 0
        self.d = np.bincount(self.group, self.event, self.n_groups)
        self.has = self.d > 0
        self.efron = ties != "breslow"
        if self.efron and self.has.any():
            r = np.arange(int(self.d.max()))[None, :]  # (1, R)
            self.use = r < self.d[self.has, None]  # (G, R)
            self.frac = np.where(self.use, r / self.d[self.has, None], 0.0)


def cox_nll_grad(
    eta: np.ndarray, event: np.ndarray, time: np.ndarray, ties: str = "efron", groups: TieGroups | None = None
) -> tuple[float, np.ndarray]:
    """:func:`models.linear.cox_nll_sum` and its gradient with respect to ``eta [n]``, in closed form (numpy).
    ``groups``: :class:`TieGroups` of ``time`` and ``event`` (computed here when None).

    With ``R_g`` the sum of ``exp(eta)`` over the risk set of event time ``g``, ``D_g`` over its ``d_g`` deaths:
    ``A_g = sum_{r<d_g} 1 / (R_g - r/d_g D_g)``, ``B_g = sum_{r<d_g} (r/d_g) / (R_g - r/d_g D_g)`` (Breslow:
    ``A_g = d_g / R_g``, ``B_g = 0``); ``d nll / d eta_i = -delta_i + w_i sum_{g: t_g <= t_i} A_g - delta_i w_i
    B_{g(i)}``.
    """
    g = TieGroups(time, event, ties) if groups is None else groups
    event = g.event
    if not event.any():
        return 0.0, np.zeros(len(eta))
    group, n_groups, d, has = g.group, g.n_groups, g.d, g.has
    shift = float(eta.max())
    w = np.exp(eta - shift)
    risk = np.cumsum(np.bincount(group, w, n_groups)[::-1])[::-1]  # everyone with time >= t_g
    dead = np.bincount(group, w * event, n_groups)
    a, b, logs = np.zeros(n_groups), np.zeros(n_groups), np.zeros(n_groups)
    if not g.efron:
        a[has] = d[has] / risk[has]
        logs[has] = d[has] * np.log(risk[has])
    else:
        use, frac = g.use, g.frac
        inner = np.where(use, np.maximum(risk[has, None] - frac * dead[has, None], _TINY), 1.0)
        inv = np.where(use, 1.0 / inner, 0.0)
        a[has] = inv.sum(1)
        b[has] = (frac * inv).sum(1)  # frac is 0 where not used
        logs[has] = np.log(inner).sum(1)  # log 1 = 0 where not used
    value = -(float(eta[event].sum()) - float(logs.sum()) - float(d.sum()) * shift)
    grad = -event.astype(float) + w * np.cumsum(a)[group] - event * w * b[group]
    return value, grad


@dataclass
class RidgeFit:
    """A minimised objective: coefficients ``beta [F]``, evaluations (= rounds), convergence, final gradient."""

    beta: np.ndarray
    evaluations: int
    converged: bool
    objective: float
    grad_max: float


def _embed(beta: np.ndarray, keep: np.ndarray, full: int) -> np.ndarray:
    """The coefficients ``beta [len(keep)]`` of the columns ``keep`` as a vector ``[full]`` (0 elsewhere)."""
    if len(keep) == full:
        return beta
    out = np.zeros(full)
    out[keep] = beta
    return out


def fit_ridge(
    parties: Sequence[Party],
    c: float,
    drop_fold: int | None = None,
    x0: np.ndarray | None = None,
    max_iter: int = MAX_ITER,
    quiet: bool = False,
    l1_ratio: float = 0.0,
    support: np.ndarray | None = None,
) -> RidgeFit:
    """Minimise ``f`` (module docstring) over the parties' patients outside fold ``drop_fold`` by L-BFGS from
    ``x0`` (default 0), for at most ``max_iter`` iterations; ``quiet``: no warning when not converged.

    ``l1_ratio`` > 0: the elastic net ``c * (l1_ratio * |beta|_1 + (1 - l1_ratio) / 2 * |beta|^2)`` instead of the
    ridge term (scikit-survival ``CoxnetSurvivalAnalysis(alphas=[c], l1_ratio=...)`` on one stratum, Breslow ties),
    minimised exactly by L-BFGS-B on the split ``beta = p - q`` with ``p, q >= 0`` (the L1 term is then linear);
    coefficients at the bound are exact zeros. ``grad_max``: the largest violation of the optimality conditions.

    ``support`` (bool ``[F]``): over those coefficients only, the others held at 0 (:mod:`~pipeline.training.
    linear_relaxed`'s refit); the parties still answer for the full ``beta [F]`` (the same messages)."""
    from scipy.optimize import minimize

    if not 0.0 <= l1_ratio <= 1.0:
        raise ValueError(f"l1_ratio must be in [0, 1], got {l1_ratio}")
    full = int(parties[0].x.shape[1])
    keep = np.arange(full) if support is None else np.flatnonzero(np.asarray(support, bool))
    dim, evals = len(keep), 0
    lam1, lam2 = c * l1_ratio, c * (1.0 - l1_ratio)

    def smooth(beta: np.ndarray) -> tuple[float, np.ndarray]:  # beta: (dim,), the support's coefficients
        nonlocal evals
        evals += 1
        answers = [p.nll_grad(_embed(beta, keep, full), drop_fold) for p in parties]
        n = sum(a[2] for a in answers)
        if n == 0:
            raise ValueError("linear fit: no patients in the fit")
        value = sum(a[0] for a in answers) / n + 0.5 * lam2 * float(beta @ beta)
        return value, np.sum([a[1] for a in answers], 0)[keep] / n + lam2 * beta

    start = np.zeros(dim) if x0 is None else np.asarray(x0, np.float64)[keep]
    opts = {"maxiter": max_iter, "gtol": GTOL, "ftol": 0}
    if lam1 == 0:
        res = minimize(smooth, start, jac=True, method="L-BFGS-B", options=opts)
        beta, grad = res.x, res.jac
        violation = np.abs(grad)
    else:

        def split(pq: np.ndarray) -> tuple[float, np.ndarray]:
            value, g = smooth(pq[:dim] - pq[dim:])
            return value + lam1 * float(pq.sum()), np.concatenate([g + lam1, lam1 - g])

        pq0 = np.concatenate([np.maximum(start, 0.0), np.maximum(-start, 0.0)])
        res = minimize(split, pq0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * (2 * dim), options=opts)
        beta = res.x[:dim] - res.x[dim:]
        grad = res.jac[:dim] - lam1  # the smooth part's gradient at the solution (no further round)
        violation = np.where(beta != 0, np.abs(grad + lam1 * np.sign(beta)), np.maximum(np.abs(grad) - lam1, 0.0))
    grad_max = float(violation.max()) if dim else 0.0
    if grad_max > 1e-4 and not quiet:
        log.warning("linear fit (c=%g): L-BFGS stopped with gradient %.2g (%s)", c, grad_max, res.message)
    return RidgeFit(_embed(beta, keep, full), evals, bool(grad_max <= 1e-4), float(res.fun), grad_max)


def unit_or_auto(value: float | str, name: str, grid: tuple[float, ...]) -> tuple[float, ...]:
    """The values a CV tries for the setting ``name``: ``value`` itself, or ``grid`` for ``auto``. Raises
    ``ValueError`` naming the field and the value when it is neither in [0, 1] nor ``auto``."""
    if isinstance(value, str) and value == "auto":
        return grid
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] or 'auto', got {value!r}")
    return (float(value),)
