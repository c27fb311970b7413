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
all patients: one choice, from the same kind of site answers as a fixed mix's (pooled or federated). The relaxed
elastic net (``train.linear_relax``): the elastic net's coefficients blended with an unpenalised refit on their
active set, weight ``gamma`` chosen by the same CV (:mod:`pipeline.training.linear_relaxed`).

The penalty ``c`` comes from :data:`PENALTY_GRID` (fixed a priori; ``c * N`` is the absolute ridge penalty) by
the cross-validated partial likelihood of Verweij & van Houwelingen (1993): each party splits its own patients
into K folds; the model of fold ``k`` is fitted on every party's other folds, and each party scores
``sum_k [l_s(beta_-k) - l_s^(-k)(beta_-k)]`` (its partial log-likelihood over all its patients minus that over
its patients outside fold ``k``): one number over all its patients, with its out-of-fold concordant and
comparable pairs. The grid value with the highest summed score wins (ties: the larger penalty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.linear import LinearSurvival
from pipeline.stats.metrics import concordant_pairs
from pipeline.training.linear_solver import TieGroups, cox_nll_grad, fit_ridge, unit_or_auto

if TYPE_CHECKING:
    from data_specs.config import RunConfig
    from pipeline.training.data import CohortData

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


CV_SCORES = {"loglik": "cv_loglik", "cindex": "cv_cindex"}  # train.linear_cv_criterion -> the records' field
CV_NAMES = {"loglik": "partial likelihood", "cindex": "concordance (pairs within a site)"}


def choose(records: Sequence[dict], criterion: str = "loglik") -> dict:
    """The record with the highest CV score (``criterion``: :data:`CV_SCORES`; ties, within 1e-9: the larger
    penalty, then the larger ``l1_ratio``, the sparser model, then the larger ``relax``, the less relaxed)."""
    key = CV_SCORES[criterion]
    ok = [r for r in records if np.isfinite(r["cv_loglik"]) and np.isfinite(r[key])]
    if not ok:
        raise ValueError("linear fit: no party could send a cross-validation score (too few patients or events)")
    best = max(r[key] for r in ok)
    tied = [r for r in ok if r[key] >= best - 1e-9]
    return max(tied, key=lambda r: (r["penalty"], r.get("l1_ratio", 0.0), r.get("relax", 1.0)))


def assign_folds(n: int, n_folds: int, seed: int, party: int) -> np.ndarray:
    """Each of a party's ``n`` patients in one of ``n_folds`` folds of (almost) equal size, seeded per party."""
    rng = np.random.default_rng([seed, party])
    fold = np.empty(n, int)
    fold[rng.permutation(n)] = np.arange(n) % n_folds
    return fold


def design(model: LinearSurvival, data: CohortData, idx: np.ndarray) -> torch.Tensor:
    """The design matrix ``[len(idx), F]`` of ``model`` (its slide standardisation) for the patients ``idx``."""
    idx = np.asarray(idx, int)
    means = has = fractions = None
    if model.feature_dim:
        assert data.bags is not None, "model has a slide term but the data have no bags"
        dim = model.feature_dim
        rows = [data.bags[i].astype(np.float64).mean(0) if len(data.bags[i]) else np.zeros(dim) for i in idx]
        means = torch.from_numpy(np.stack(rows) if rows else np.zeros((0, dim)))
        has = torch.tensor([len(data.bags[i]) > 0 for i in idx], dtype=torch.bool)
        if model.slide_clusters:  # model.linear_slide=composition|both: each bag's tile fractions per phenotype
            from pipeline.training.slide_clusters import bag_fractions

            fractions = torch.from_numpy(bag_fractions(model, [data.bags[i] for i in idx]))

    def part(x: np.ndarray | None, present: np.ndarray | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if x is None or present is None:
            return None, None
        return torch.from_numpy(np.asarray(x)[idx]), torch.from_numpy(np.asarray(present)[idx].astype(bool))

    om, om_mask = part(data.omics, data.omics_present)
    cl, cl_mask = part(data.clinical, data.clinical_present)
    return model.design_rows(means, has, om, om_mask, cl, cl_mask, fractions)


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
    """The mixes the CV tries for ``train.linear_l1_ratio``: the value, or :data:`L1_RATIO_GRID` for ``auto``."""
    return unit_or_auto(l1_ratio, "train.linear_l1_ratio", L1_RATIO_GRID)


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


def _summaries(
    paths: dict[float, list[dict]], cs: Sequence[float], gammas: Sequence[float], criterion: str = "loglik"
) -> tuple[list[dict], list[dict], list[dict]]:
    """From each mix's CV records ``paths``: each mix's best (with its path's rounds), per penalty of the grid ``cs``
    the best-scoring record (one mix: its path), and each ``gamma``'s best."""
    per_mix = []
    for a, path in paths.items():
        scored = [r for r in path if np.isfinite(r["cv_loglik"])]
        top = (
            choose(scored, criterion)
            if scored
            else {"penalty": float("nan"), "cv_loglik": float("nan"), "cv_cindex": float("nan")}
        )
        evals = int(sum(r["evaluations"] for r in path))
        per_mix.append({"l1_ratio": a, "penalty": top["penalty"], "cv_loglik": top["cv_loglik"],
                        "cv_cindex": top["cv_cindex"], "evaluations": evals})  # fmt: skip
    records = [r for path in paths.values() for r in path]
    per_c = []
    for c in cs:
        at_c = [r for r in records if r["penalty"] == c]
        finite = [r for r in at_c if np.isfinite(r["cv_loglik"])]
        if at_c:
            per_c.append(choose(finite, criterion) if finite else at_c[0])
    scored = [r for r in records if np.isfinite(r["cv_loglik"])]
    per_gamma = [choose(rs, criterion) for g in gammas if (rs := [r for r in scored if r["relax"] == g])]
    return per_mix, per_c, per_gamma


def fit_with_cv(
    model: LinearSurvival,
    parties: Sequence[Party],
    grid: Sequence[float] | None = None,
    l1_ratio: float | str = 0.0,
    relax: float | str = 1.0,
    criterion: str = "loglik",
) -> dict:
    """Choose the penalty (with ``l1_ratio="auto"`` the mix, jointly: :func:`mixes`) by CV over ``parties`` (``c``
    among ``grid``, default :func:`penalty_grid`; a plain grid is every mix's, a :class:`MixGrids` gives each mix its
    own), refit on all their patients and load the coefficients into ``model``; returns the record (chosen penalty
    and mix; ``candidates``: per ``c``, the best-scoring mix's CV record; ``mix_candidates``: each mix's best;
    evaluations = rounds). ``l1_ratio``: the elastic net's mix (:func:`fit_ridge`; 0 = ridge) or ``auto``. ``relax``:
    the relaxed elastic net's ``gamma`` (:mod:`pipeline.training.linear_relaxed`; 1 = not relaxed) or ``auto``, chosen
    by the same CV. ``criterion``: what the CV maximises (:data:`CV_SCORES`, ``train.linear_cv_criterion``)."""
    from pipeline.training.linear_relaxed import cross_validate_relaxed, final_fit, relax_values

    if not parties:
        raise ValueError("linear fit: no patients to fit")
    tried, gammas = mixes(l1_ratio), relax_values(relax)
    cs = penalty_grid(l1_ratio) if grid is None else grid
    per_mix_grid = getattr(cs, "per_mix", {})

    def cv_path(a: float) -> list[dict]:  # ridge, or no relaxation: one fit per c and fold
        if a == 0 or gammas == (1.0,):
            return [{**r, "relax": 1.0} for r in cross_validate(parties, per_mix_grid.get(a, cs), a)]
        return cross_validate_relaxed(parties, per_mix_grid.get(a, cs), a, gammas)

    paths = {a: cv_path(a) for a in tried}
    best = choose([r for path in paths.values() for r in path], criterion)
    mix, gamma = float(best["l1_ratio"]), float(best["relax"])
    beta, final_evals, converged = final_fit(parties, best["penalty"], mix, gamma)
    model.set_coefficients(torch.from_numpy(beta))
    n = sum(len(p.fold) for p in parties)
    solver = "L-BFGS-B on beta = p - q" if mix > 0 else "L-BFGS"
    how = "penalty" if len(tried) == 1 else f"penalty and mix (l1_ratio among {', '.join(f'{a:g}' for a in tried)})"
    kind = fit_kind(mix) if gamma == 1 else f"relaxed {fit_kind(mix)}, gamma {gamma:g},"
    how += f" and gamma among {', '.join(f'{g:g}' for g in gammas)}" if len(gammas) > 1 else ""
    records = [r for path in paths.values() for r in path]
    per_mix, per_c, per_gamma = _summaries(paths, cs, gammas, criterion)
    return {
        "fit": f"full-batch {kind} Cox ({solver}), {how} by K-fold cross-validated {CV_NAMES[criterion]}",
        "cv_criterion": criterion,
        "penalty": best["penalty"],
        "l1_ratio": mix,
        "l1_ratio_setting": l1_ratio,
        "relax": gamma,
        "relax_setting": relax,
        "relax_candidates": per_gamma,  # each gamma's best record
        "mix_candidates": per_mix,
        "nonzero": int((beta != 0).sum()),
        "ridge_alpha": best["penalty"] * n,  # scikit-survival CoxPHSurvivalAnalysis(alpha=...) on one stratum
        "cv_cindex": best["cv_cindex"],
        "cv_loglik": best["cv_loglik"],
        "candidates": per_c,
        "n_patients": n,
        "final_evaluations": final_evals,
        "converged": converged,
        "rounds": int(sum(r["evaluations"] for r in records) + final_evals),
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
    from pipeline.training.slide_clusters import prepare_slide_term

    r, level = slide_settings(cfg)
    m, k = cfg.model, cfg.federated.min_count  # the federated fit's smallest phenotype cell: pooled == federated
    proj = prepare_slide_term(model, data, idx, r, level, None, m.linear_slide, m.linear_slide_clusters, k)
    parties = parties_of(model, data, idx, cfg, cfg.train.stratify)
    t = cfg.train
    rec = fit_with_cv(model, parties, l1_ratio=t.linear_l1_ratio, relax=t.linear_relax, criterion=t.linear_cv_criterion)
    rec["slide_projection"] = proj
    return {"select": "cv", "best_epoch": None, "best_val_loss": None, "best_val_cindex": rec["cv_cindex"],
            "val_history": [], "linear_fit": rec}  # fmt: skip
