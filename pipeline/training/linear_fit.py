"""The linear family fitted to its optimum: full-batch ridge or elastic-net Cox, the penalty chosen by K-fold CV.

The objective, over the strata ``s`` (the sites; one stratum when ``train.stratify=false``), is the
ridge-penalised, stratified Cox partial likelihood per patient::

    f(beta) = (1 / N) * sum_s nll_s(beta) + (c / 2) * |beta|^2

with ``nll_s`` the negative partial log-likelihood of stratum ``s`` over its *whole* training set (Efron or
Breslow ties, ``train.ties``) and ``N`` the number of patients in the fit. For one stratum this is
scikit-survival's ``CoxPHSurvivalAnalysis(alpha=c * N)``. ``f`` is convex; it is minimised by L-BFGS
(scipy) on the sum of the strata's full-batch gradients, each stratum a :class:`Party` that answers
``(nll_s, grad nll_s, n_s)`` for given coefficients: centralised, the parties are the training data's
strata; federated (:mod:`pipeline.federated.linear_sites`) each is a site whose every answer passes the
disclosure policy and is written to its privacy ledger. Each evaluation is one round.

Elastic net (``train.linear_l1_ratio`` = ``a`` > 0): the penalty term is
``c * (a * |beta|_1 + (1 - a) / 2 * |beta|^2)`` instead, scikit-survival Coxnet's parametrisation (for one stratum
and Breslow ties, ``CoxnetSurvivalAnalysis(alphas=[c], l1_ratio=a)``: tested to < 1e-4 relative, same support). It
is minimised exactly by L-BFGS-B on the split ``beta = p - q``, ``p, q >= 0`` (the L1 term becomes linear; the
same site answers), and ``c`` comes from :data:`ELASTIC_NET_GRID` by the same CV.

The mix chosen by the same CV (``train.linear_l1_ratio=auto``, the default): every mix of :data:`L1_RATIO_GRID` is
cross-validated along its own a-priori grid (ridge :data:`PENALTY_GRID`, the elastic net :data:`ELASTIC_NET_GRID`),
each path warm-started along ``c``, and the pair ``(l1_ratio, c)`` with the highest summed CV score is refitted on
all patients: one choice, from the same kind of site answers as a fixed mix's (pooled or federated).

The penalty ``c`` comes from :data:`PENALTY_GRID` (fixed a priori; ``c * N`` is the absolute ridge penalty) by
the cross-validated partial likelihood of Verweij & van Houwelingen (1993): each party splits its own patients
into K folds; the model of fold ``k`` is fitted on every party's other folds, and each party scores
``sum_k [l_s(beta_-k) - l_s^(-k)(beta_-k)]`` (its partial log-likelihood over all its patients minus that over
its patients outside fold ``k``): one number over all its patients, with its out-of-fold concordant and
comparable pairs. The grid value with the highest summed score wins (ties: the larger penalty).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.linear import LinearSurvival
from pipeline.stats.metrics import concordant_pairs

if TYPE_CHECKING:
    from data_specs.config import RunConfig
    from pipeline.training.data import CohortData

log = logging.getLogger(__name__)

# c, the ridge penalty per patient, fixed before any data was seen: 13 log-spaced values (factor sqrt(10)) from
# nearly unpenalised to nearly the null model, for standardised covariates and up to thousands of features
PENALTY_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 3, 13))
# c for the elastic net (train.linear_l1_ratio > 0), fixed a priori: 17 log-spaced values (factor 10^0.25) from
# nearly unpenalised to past the null model of standardised covariates (every coefficient 0 once c * l1_ratio
# exceeds the largest |gradient| per patient at 0, at most ~1 for standardised covariates)
ELASTIC_NET_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 1, 17))
# train.linear_l1_ratio=auto, fixed a priori: the mixes tried, ridge and the elastic net 0.5, each along its own grid
# above (so auto's candidates hold those of both fixed settings). The lasso (1) was left out for its cost: a third
# path of ~1,500 rounds on TCGA-BRCA, where the two cost ~1.7x one elastic-net path (docs/benchmarks.md)
L1_RATIO_GRID: tuple[float, ...] = (0.0, 0.5)


class MixGrids(tuple):
    """The penalty grids of ``train.linear_l1_ratio=auto``: a tuple of every distinct ``c`` (ascending) that also
    knows each mix's own grid (``per_mix``), so that passing it on as ``grid`` keeps each mix on its own grid."""

    per_mix: dict[float, tuple[float, ...]]

    def __new__(cls, per_mix: dict[float, tuple[float, ...]]) -> MixGrids:
        grids = super().__new__(cls, sorted({c for g in per_mix.values() for c in g}))
        grids.per_mix = dict(per_mix)
        return grids


CV_FOLDS = 5
MAX_ITER = 1000  # L-BFGS iterations (each one or a few evaluations = rounds)
GTOL = 1e-7  # L-BFGS stops when every gradient component of f is below this


@dataclass
class Party:
    """One stratum's patients: design ``x [n, F]`` (float64), ``time [n]``, ``event [n]`` and each patient's CV
    fold ``fold [n]`` (0..K-1). :meth:`release` is called with every answer before it is returned: a no-op
    here; a federated site checks it against the disclosure policy and records it."""

    name: str
    x: torch.Tensor
    time: torch.Tensor
    event: torch.Tensor
    fold: np.ndarray
    ties: str = "efron"
    rounds: int = field(default=0, init=False)
    # per fold left out (None: none): the rows kept, their events, times and tie groups (the data do not change)
    _blocks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def release(self, kind: str, n: int, n_events: int, values: dict[str, float]) -> bool:
        """Whether an answer of ``kind`` over ``n`` patients / ``n_events`` events may be sent (always, here)."""
        return True

    def _keep(self, drop_fold: int | None) -> np.ndarray:
        return np.ones(len(self.fold), bool) if drop_fold is None else self.fold != drop_fold

    def _block(self, drop_fold: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, TieGroups]:
        """``(x, event, time, tie groups)`` of the patients outside fold ``drop_fold`` (None: all), cached."""
        if drop_fold not in self._blocks:
            keep = self._keep(drop_fold)
            e, t = self.event.numpy()[keep], self.time.numpy()[keep]
            self._blocks[drop_fold] = (self.x.numpy()[keep], e, t, TieGroups(t, e, self.ties))
        return self._blocks[drop_fold]

    def _nll_value(self, beta: np.ndarray, drop_fold: int | None) -> float:
        x, e, t, groups = self._block(drop_fold)
        return cox_nll_grad(x @ beta, e, t, self.ties, groups)[0]

    def nll_grad(self, beta: np.ndarray, drop_fold: int | None = None) -> tuple[float, np.ndarray, int]:
        """``(nll, grad [F], n)`` of this party's patients outside fold ``drop_fold`` (None: all) at ``beta``."""
        x, e, t, groups = self._block(drop_fold)  # x: (n, F)
        loss, g_eta = cox_nll_grad(x @ np.asarray(beta, np.float64), e, t, self.ties, groups)
        n, d = len(e), int(e.sum())
        self.rounds += 1
        if not self.release("linear.gradient", n, d, {"nll": loss}):
            raise ValueError(f"party {self.name}: may not send its gradient")
        return loss, x.T @ g_eta, n

    def cv_score(self, betas: Sequence[np.ndarray]) -> tuple[float, float, float] | None:
        """``(cvl, concordant, comparable)`` over all this party's patients given each fold's coefficients
        ``betas[k]`` (fitted without fold ``k``); None when the party may not send it."""
        cvl, risk, x = 0.0, np.zeros(len(self.fold)), self.x.numpy()
        for k, beta in enumerate(betas):
            b = np.asarray(beta, np.float64)
            cvl += self._nll_value(b, k) - self._nll_value(b, None)
            held = self.fold == k
            risk[held] = x[held] @ b
        conc, comp = concordant_pairs(self.time.numpy(), self.event.numpy(), risk)
        values = {"loss_sum": cvl, "concordant": conc, "comparable": comp}
        if not self.release("linear.cv_score", len(self.fold), int(self.event.sum()), values):
            return None
        return cvl, conc, comp


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


def fit_ridge(
    parties: Sequence[Party],
    c: float,
    drop_fold: int | None = None,
    x0: np.ndarray | None = None,
    max_iter: int = MAX_ITER,
    quiet: bool = False,
    l1_ratio: float = 0.0,
) -> RidgeFit:
    """Minimise ``f`` (module docstring) over the parties' patients outside fold ``drop_fold`` by L-BFGS from
    ``x0`` (default 0), for at most ``max_iter`` iterations; ``quiet``: no warning when not converged.

    ``l1_ratio`` > 0: the elastic net ``c * (l1_ratio * |beta|_1 + (1 - l1_ratio) / 2 * |beta|^2)`` instead of the
    ridge term (scikit-survival ``CoxnetSurvivalAnalysis(alphas=[c], l1_ratio=...)`` on one stratum, Breslow ties),
    minimised exactly by L-BFGS-B on the split ``beta = p - q`` with ``p, q >= 0`` (the L1 term is then linear);
    coefficients at the bound are exact zeros. ``grad_max``: the largest violation of the optimality conditions."""
    from scipy.optimize import minimize

    if not 0.0 <= l1_ratio <= 1.0:
        raise ValueError(f"l1_ratio must be in [0, 1], got {l1_ratio}")
    dim = int(parties[0].x.shape[1])
    evals = 0
    lam1, lam2 = c * l1_ratio, c * (1.0 - l1_ratio)

    def smooth(beta: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal evals
        evals += 1
        answers = [p.nll_grad(beta, drop_fold) for p in parties]
        n = sum(a[2] for a in answers)
        if n == 0:
            raise ValueError("linear fit: no patients in the fit")
        value = sum(a[0] for a in answers) / n + 0.5 * lam2 * float(beta @ beta)
        return value, np.sum([a[1] for a in answers], 0) / n + lam2 * beta

    start = np.zeros(dim) if x0 is None else np.asarray(x0, np.float64)
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
    return RidgeFit(beta, evals, bool(grad_max <= 1e-4), float(res.fun), grad_max)


def cross_validate(parties: Sequence[Party], grid: Sequence[float] = PENALTY_GRID, l1_ratio: float = 0.0) -> list[dict]:
    """The CV score of every penalty in ``grid`` (module docstring; ``l1_ratio``: :func:`fit_ridge`); one record per
    penalty, in grid order. Fits run from the largest penalty down, each fold warm-started from the previous
    penalty's fit."""
    n_folds = int(max(int(p.fold.max()) for p in parties)) + 1
    warm: list[np.ndarray | None] = [None] * n_folds
    out: dict[float, dict] = {}
    for c in sorted(grid, reverse=True):
        fits = [fit_ridge(parties, c, k, warm[k], l1_ratio=l1_ratio) for k in range(n_folds)]
        warm = [f.beta for f in fits]
        scores = [s for s in (p.cv_score(warm) for p in parties) if s is not None]
        cvl, conc, comp = (float(sum(s[i] for s in scores)) for i in range(3))
        out[c] = {
            "penalty": c,
            "l1_ratio": l1_ratio,
            "cv_loglik": cvl if scores else float("nan"),
            "cv_cindex": conc / comp if comp else float("nan"),
            "parties_scored": len(scores),
            "evaluations": sum(f.evaluations for f in fits),
            "converged": all(f.converged for f in fits),
            "nonzero": float(np.mean([(f.beta != 0).sum() for f in fits])),
        }
    return [out[c] for c in grid]


def choose(records: Sequence[dict]) -> dict:
    """The record with the highest CV log-likelihood (ties, within 1e-9: the larger penalty, then the larger
    ``l1_ratio``, the sparser model)."""
    ok = [r for r in records if np.isfinite(r["cv_loglik"])]
    if not ok:
        raise ValueError("linear fit: no party could send a cross-validation score (too few patients or events)")
    best = max(r["cv_loglik"] for r in ok)
    tied = [r for r in ok if r["cv_loglik"] >= best - 1e-9]
    return max(tied, key=lambda r: (r["penalty"], r.get("l1_ratio", 0.0)))


def assign_folds(n: int, n_folds: int, seed: int, party: int) -> np.ndarray:
    """Each of a party's ``n`` patients in one of ``n_folds`` folds of (almost) equal size, seeded per party."""
    rng = np.random.default_rng([seed, party])
    fold = np.empty(n, int)
    fold[rng.permutation(n)] = np.arange(n) % n_folds
    return fold


def design(model: LinearSurvival, data: CohortData, idx: np.ndarray) -> torch.Tensor:
    """The design matrix ``[len(idx), F]`` of ``model`` (its slide standardisation) for the patients ``idx``."""
    idx = np.asarray(idx, int)
    means = has = None
    if model.feature_dim:
        assert data.bags is not None, "model has a slide term but the data have no bags"
        dim = model.feature_dim
        rows = [data.bags[i].astype(np.float64).mean(0) if len(data.bags[i]) else np.zeros(dim) for i in idx]
        means = torch.from_numpy(np.stack(rows) if rows else np.zeros((0, dim)))
        has = torch.tensor([len(data.bags[i]) > 0 for i in idx], dtype=torch.bool)

    def part(x: np.ndarray | None, present: np.ndarray | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if x is None or present is None:
            return None, None
        return torch.from_numpy(np.asarray(x)[idx]), torch.from_numpy(np.asarray(present)[idx].astype(bool))

    om, om_mask = part(data.omics, data.omics_present)
    cl, cl_mask = part(data.clinical, data.clinical_present)
    return model.design_rows(means, has, om, om_mask, cl, cl_mask)


def parties_of(
    model: LinearSurvival, data: CohortData, idx: np.ndarray, cfg: RunConfig, stratify: bool, make=Party
) -> list[Party]:
    """The patients ``idx`` as parties (one per site, or one in all when not ``stratify``), each with its own
    CV folds (``train.linear_cv_folds``, seeded by ``train.seed``). ``make``: the party class (or factory)."""
    t = cfg.train
    groups = data.subset_sites(np.asarray(idx, int)) if stratify else {"all": np.asarray(idx, int)}
    x = design(model, data, np.concatenate(list(groups.values())) if groups else np.zeros(0, int))
    parties, start = [], 0
    for k, (name, g) in enumerate(groups.items()):
        rows = slice(start, start + len(g))
        start += len(g)
        if len(g) == 0:
            continue
        parties.append(
            make(
                name=name,
                x=x[rows],
                time=torch.from_numpy(data.time[g].astype(np.float64)),
                event=torch.from_numpy(data.event[g].astype(bool)),
                fold=assign_folds(len(g), t.linear_cv_folds, t.seed, k),
                ties=t.ties,
            )
        )
    return parties


def mixes(l1_ratio: float | str) -> tuple[float, ...]:
    """The mixes the CV tries for ``train.linear_l1_ratio``: the value itself, or :data:`L1_RATIO_GRID` for
    ``auto``. Raises ``ValueError`` naming the field and the value when it is neither in [0, 1] nor ``auto``."""
    if isinstance(l1_ratio, str) and l1_ratio == "auto":
        return L1_RATIO_GRID
    if isinstance(l1_ratio, bool) or not isinstance(l1_ratio, int | float) or not 0.0 <= l1_ratio <= 1.0:
        raise ValueError(f"train.linear_l1_ratio must be a number in [0, 1] or 'auto', got {l1_ratio!r}")
    return (float(l1_ratio),)


def penalty_grid(l1_ratio: float | str) -> tuple[float, ...]:
    """The a-priori grid of ``c``: :data:`PENALTY_GRID` for ridge (``l1_ratio`` 0), else :data:`ELASTIC_NET_GRID`;
    for ``auto`` each mix's own (a :class:`MixGrids`)."""
    tried = mixes(l1_ratio)
    if len(tried) > 1:
        return MixGrids({a: penalty_grid(a) for a in tried})
    return PENALTY_GRID if tried[0] == 0 else ELASTIC_NET_GRID


def fit_kind(l1_ratio: float) -> str:
    """The penalised fit in words: ridge, lasso or the elastic net with its mix."""
    if l1_ratio == 0:
        return "ridge"
    return "lasso" if l1_ratio == 1 else f"elastic net (l1_ratio {l1_ratio:g})"


def fit_with_cv(
    model: LinearSurvival,
    parties: Sequence[Party],
    grid: Sequence[float] | None = None,
    l1_ratio: float | str = 0.0,
) -> dict:
    """Choose the penalty (and with ``l1_ratio="auto"`` the mix, jointly: :func:`mixes`) by CV over ``parties``
    (``c`` among ``grid``, default :func:`penalty_grid`; a plain grid is every mix's, a :class:`MixGrids` gives each
    mix its own), refit on all their patients and
    load the coefficients into ``model``; returns the record (chosen penalty and mix; ``candidates``: per penalty of
    the grid, the best-scoring mix's CV record, each with its ``l1_ratio``; ``mix_candidates``: each mix's best;
    evaluations = rounds). ``l1_ratio``: the elastic net's mix
    (:func:`fit_ridge`; 0 = ridge) or ``auto``."""
    if not parties:
        raise ValueError("linear fit: no patients to fit")
    tried = mixes(l1_ratio)
    cs = penalty_grid(l1_ratio) if grid is None else grid
    per_mix_grid = getattr(cs, "per_mix", {})
    paths = {a: cross_validate(parties, per_mix_grid.get(a, cs), a) for a in tried}
    best = choose([r for path in paths.values() for r in path])
    mix = float(best["l1_ratio"])
    final = fit_ridge(parties, best["penalty"], l1_ratio=mix)
    model.set_coefficients(torch.from_numpy(final.beta))
    n = sum(len(p.fold) for p in parties)
    solver = "L-BFGS-B on beta = p - q" if mix > 0 else "L-BFGS"
    how = "penalty" if len(tried) == 1 else f"penalty and mix (l1_ratio among {', '.join(f'{a:g}' for a in tried)})"
    per_mix = []
    for a, path in paths.items():
        scored = [r for r in path if np.isfinite(r["cv_loglik"])]
        top = (
            choose(scored)
            if scored
            else {"penalty": float("nan"), "cv_loglik": float("nan"), "cv_cindex": float("nan")}
        )
        evals = int(sum(r["evaluations"] for r in path))
        per_mix.append({"l1_ratio": a, "penalty": top["penalty"], "cv_loglik": top["cv_loglik"],
                        "cv_cindex": top["cv_cindex"], "evaluations": evals})  # fmt: skip
    records = [r for path in paths.values() for r in path]
    per_c = []  # per penalty of the grid, the record of the mix that scored best at it (one mix: its path)
    for c in cs:
        at_c = [r for r in records if r["penalty"] == c]
        finite = [r for r in at_c if np.isfinite(r["cv_loglik"])]
        if at_c:
            per_c.append(choose(finite) if finite else at_c[0])
    return {
        "fit": f"full-batch {fit_kind(mix)} Cox ({solver}), {how} by K-fold cross-validated partial likelihood",
        "penalty": best["penalty"],
        "l1_ratio": mix,
        "l1_ratio_setting": l1_ratio,
        "mix_candidates": per_mix,
        "nonzero": int((final.beta != 0).sum()),
        "ridge_alpha": best["penalty"] * n,  # scikit-survival CoxPHSurvivalAnalysis(alpha=...) on one stratum
        "cv_cindex": best["cv_cindex"],
        "cv_loglik": best["cv_loglik"],
        "candidates": per_c,
        "n_patients": n,
        "final_evaluations": final.evaluations,
        "converged": final.converged,
        "rounds": int(sum(r["evaluations"] for r in records) + final.evaluations),
    }


def slide_settings(cfg: RunConfig) -> tuple[int, str]:
    """``(r, level)`` of the linear family's slide projection (``model.linear_slide_pcs``,
    ``model.linear_slide_moments``); r = 0: none."""
    return cfg.model.linear_slide_pcs, cfg.model.linear_slide_moments


def fit_linear_centralised(model: LinearSurvival, data: CohortData, idx: np.ndarray, cfg: RunConfig) -> dict:
    """``model.family=linear`` centralised (Cox loss): the CV-chosen penalised fit (``train.linear_l1_ratio``) on
    the patients ``idx`` (training and validation patients: the CV is the validation), stratified by site as
    ``train.stratify`` says; with ``model.linear_slide_pcs`` > 0 the slide term first gets its projection from the
    sites' tile moments over ``idx`` (:func:`pipeline.training.slide_norm.prepare_slide_projection`)."""
    from pipeline.training.slide_norm import prepare_slide_projection

    r, level = slide_settings(cfg)
    proj = prepare_slide_projection(model, data, idx, r, level)
    parties = parties_of(model, data, idx, cfg, cfg.train.stratify)
    rec = fit_with_cv(model, parties, l1_ratio=cfg.train.linear_l1_ratio)
    rec["slide_projection"] = proj
    return {"select": "cv", "best_epoch": None, "best_val_loss": None, "best_val_cindex": rec["cv_cindex"],
            "val_history": [], "linear_fit": rec}  # fmt: skip
