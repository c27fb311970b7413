"""The linear family fitted federated to the pooled optimum, its penalty by federated cross-validation.

Flower-free, in process (the embedded setting). Each site is a :class:`SiteParty`
(:class:`pipeline.training.linear_fit.Party`): for coefficients the server sends, it answers the sum over its
patients of the stratified Cox partial likelihood and its gradient (one site = one stratum, so the sum over
sites is the pooled site-stratified objective exactly) and its patient count; the server minimises the
penalised sum (ridge or elastic net, ``train.linear_l1_ratio``) by L-BFGS ("FedSGD" with full-batch site
gradients and a quasi-Newton server optimiser: each evaluation is one round). The result is the pooled
site-stratified fit (tested to 1e-6).

Penalty: federated K-fold CV (:func:`pipeline.training.linear_fit.cross_validate`): each site splits its own
non-test patients into K folds; the model of fold k is fitted on every site's other folds; each site returns
one cross-validated partial log-likelihood over all its non-test patients (plus out-of-fold concordant and
comparable pairs), the server sums them and keeps the best penalty of the a-priori grid (with
``train.linear_l1_ratio=auto``, the default, the best pair of mix and penalty, each mix along its own grid; with
``train.linear_relax``, the relaxed elastic net's scale too: :mod:`pipeline.training.linear_relaxed`). No
site sends a per-patient value or a per-fold score.

Disclosure: every answer passes :mod:`pipeline.federated.policy` (a gradient is a model update over the site's
patients in the fit: at least ``federated.min_count`` of them; a CV score is an evaluation reply over all its
non-test patients and events, withheld below the minimum count) and is described in the privacy ledger. Sites
whose smallest fit (all but one fold) has fewer than ``min_count`` patients are left out, with a warning.
Not covered: differential privacy and SecAgg+ masking of these messages (the server sees each site's gradient);
gradients of the K fold fits at nearby coefficients are correlated views of the same patients, a channel the
minimum count does not close.

:func:`fit_fedavg` is the same objective with local optimisation and FedAvg / FedAdam aggregation, for the
benchmarks' comparison (it does not reach the optimum exactly when sites differ).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.federated.ledger import MessageLedger
from pipeline.federated.policy import (
    SiteFacts,
    check_cluster_aggregate,
    check_evaluate_reply,
    check_fit_reply,
    check_slide_aggregate,
)
from pipeline.training.linear_fit import Party, fit_with_cv, parties_of, slide_settings
from pipeline.training.linear_solver import fit_ridge
from pipeline.training.slide_clusters import prepare_slide_term

if TYPE_CHECKING:
    from data_specs.config import RunConfig
    from models.linear import LinearSurvival
    from pipeline.training.data import CohortData

log = logging.getLogger(__name__)


@dataclass
class SiteParty(Party):
    """A site: its answers pass the disclosure policy (minimum count ``min_count``) and go to ``ledger``."""

    min_count: int = 10
    ledger: MessageLedger | None = None

    def release(self, kind: str, n: int, n_events: int, values: dict[str, float]) -> bool:
        dim = int(self.x.shape[1])
        facts = SiteFacts(self.name, n, n_events, n, n_events, ((dim,),), self.min_count)
        if kind == "linear.cv_score" and min(n, n_events) < self.min_count:
            self._record(kind, {}, withheld=f"fewer than {self.min_count} patients or events")
            return False
        if kind == "linear.cv_score":
            check_evaluate_reply(facts, n, {**values, "events": float(n_events)})
            keys = dict.fromkeys((*values, "events"), {"type": "float"})
            self._record(kind, {"metrics": {"kind": "metrics", "keys": {**keys, "num_examples": {"type": "int"}}}})
        else:  # a gradient or a local model: a model update over the site's n patients in the fit
            check_fit_reply(facts, n, {"train_loss": values.get("nll", 0.0)}, [(dim,)])
            arrays = {"update": {"shape": [dim], "dtype": "float64", "bytes": 8 * dim}}
            metrics = {"train_loss": {"type": "float"}, "num_examples": {"type": "int"}}
            self._record(kind, {"update": {"kind": "arrays", "keys": arrays},
                                "metrics": {"kind": "metrics", "keys": metrics}})  # fmt: skip
        return True

    def _record(self, kind: str, records: dict, withheld: str | None = None) -> None:
        """One ledger line in the Flower runtime's form (``client_app.ledger_entry``): per record its kind and keys
        with shapes, dtypes and bytes (arrays) or types (metrics); ``withheld``: why nothing was sent."""
        if self.ledger is not None:
            line = {"phase": kind, "group": f"linear-{self.rounds}", "round": self.rounds, "site": self.name,
                    "records": records}  # fmt: skip
            self.ledger.record(line if withheld is None else {**line, "withheld": withheld})


def site_parties(
    model: LinearSurvival, data: CohortData, idx: np.ndarray, cfg: RunConfig, ledger: MessageLedger | None = None
) -> tuple[list[SiteParty], list[str]]:
    """The sites of ``idx`` as :class:`SiteParty` (one stratum each); returns them and the names of the sites
    left out because a fold fit would use fewer than ``federated.min_count`` of their patients."""
    k = cfg.federated.min_count

    def make(**kw) -> SiteParty:
        return SiteParty(**kw, min_count=k, ledger=ledger)

    parties = parties_of(model, data, idx, cfg, stratify=True, make=make)
    kept = [p for p in parties if min(int((p.fold != f).sum()) for f in range(int(p.fold.max()) + 1)) >= k]
    left = [p.name for p in parties if p not in kept]
    for s in left:
        log.warning("federated linear fit: site %s has too few patients for the minimum count %d; left out", s, k)
    if not kept:
        raise ValueError(f"federated linear fit: no site has enough non-test patients for federated.min_count={k}")
    return kept, left


def slide_release(data: CohortData, idx: np.ndarray, cfg: RunConfig, ledger: MessageLedger | None):
    """The ``release`` of :func:`pipeline.training.slide_norm.prepare_slide_projection` for a federation: each
    site's slide aggregate is checked against :func:`pipeline.federated.policy.check_slide_aggregate` (at least
    ``federated.min_count`` of its patients in the fit) and described in ``ledger``; below the count it is withheld.
    The tile phenotypes' Lloyd answers (``slide_clusters``) are checked by
    :func:`pipeline.federated.policy.check_cluster_aggregate` (``model.linear_slide_clusters`` clusters)."""
    k = cfg.federated.min_count
    counts = {s: len(g) for s, g in data.subset_sites(np.asarray(idx, int)).items()}

    def release(site: str, kind: str, message: dict) -> bool:
        n = int(message["n_patients" if kind in ("slide_moments", "slide_clusters") else "n"])
        line = {"phase": f"linear.{kind}", "group": "linear-slides", "round": 0, "site": site}
        if n < k:
            if ledger is not None:
                ledger.record({**line, "records": {}, "withheld": f"fewer than {k} patients with slides"})
            return False
        dim = int(np.asarray(message["sum"]).shape[0])
        facts = SiteFacts(site, counts[site], 0, 0, 0, (), k)
        if kind == "slide_clusters":
            check_cluster_aggregate(facts, message, cfg.model.linear_slide_clusters)
        else:
            check_slide_aggregate(facts, kind, message, dim)
        if ledger is not None:
            arrays = {key: {"shape": list(np.shape(v)), "dtype": "float64", "bytes": 8 * int(np.size(v))}
                      for key, v in message.items() if np.ndim(v) > 0}  # fmt: skip
            metrics = {key: {"type": "int"} for key, v in message.items() if np.ndim(v) == 0}
            ledger.record({**line, "records": {"aggregate": {"kind": "arrays", "keys": arrays},
                                               "metrics": {"kind": "metrics", "keys": metrics}}})  # fmt: skip
        return True

    return release


def fit_federated_cv(
    model: LinearSurvival,
    data: CohortData,
    idx: np.ndarray,
    cfg: RunConfig,
    ledger_path: Path | None = None,
    grid: Sequence[float] | None = None,
) -> dict:
    """Fit ``model`` federated on the patients ``idx`` (each site's non-test patients) at the penalty chosen by
    federated CV among ``grid`` (default :func:`~pipeline.training.linear_fit.penalty_grid` of
    ``train.linear_l1_ratio``); with ``model.linear_slide_pcs`` > 0 the slide projection comes first, from each
    site's policy-checked tile moments (:func:`slide_release`). The coefficients are loaded into ``model``. Returns
    the fit record (``sites_left_out``, ``rounds``: every evaluation the server asked of the sites, CV included)."""
    ledger = MessageLedger(None)
    r, level = slide_settings(cfg)
    m, release = cfg.model, slide_release(data, idx, cfg, ledger)
    proj = prepare_slide_term(
        model, data, idx, r, level, release, m.linear_slide, m.linear_slide_clusters, cfg.federated.min_count
    )
    parties, left = site_parties(model, data, idx, cfg, ledger)
    t = cfg.train
    rec = fit_with_cv(model, parties, grid, t.linear_l1_ratio, t.linear_relax, t.linear_cv_criterion)
    if ledger_path is not None:
        out = MessageLedger(ledger_path)
        out.lines = ledger.lines
        out.flush()  # once, at the end: thousands of small messages
    return {**rec, "slide_projection": proj, "sites": [p.name for p in parties], "sites_left_out": left,
            "ledger_lines": len(ledger.lines)}  # fmt: skip


def full_batch_linear(cfg: RunConfig) -> bool:
    """Whether a federated linear-family fit takes :func:`fit_federated_cv` (``train.linear_fit=cv``, Cox loss, no
    DP and no SecAgg+, whose protections these messages do not get) rather than the Flower strategies."""
    fc, t = cfg.federated, cfg.train
    return t.linear_fit == "cv" and t.loss == "cox" and fc.dp_noise <= 0 and not fc.secagg


def train_linear_federated(data: CohortData, cfg: RunConfig, out: Path | None = None) -> tuple[LinearSurvival, dict]:
    """A federated run of ``model.family=linear`` (:func:`full_batch_linear`): :func:`fit_federated_cv` on every
    site's non-test patients, the messages in the run's privacy ledger (``out``: the run folder's ``federated/``).
    Returns the model and the run's training summary."""
    from data_specs.artifacts import RunFiles
    from models.linear import LinearSurvival
    from pipeline.training.module import new_model

    model = new_model(data, cfg)
    if not isinstance(model, LinearSurvival):
        raise ValueError(f"train_linear_federated: model.family={cfg.model.family!r} is not the linear family")
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    ledger = RunFiles(root=out.parent).privacy_ledger if out is not None else None
    fit = fit_federated_cv(model, data, idx, cfg, ledger, None)
    log.info("federated linear fit: penalty %g (l1_ratio %g) by federated %d-fold CV, %d rounds (site gradients "
             "summed, server L-BFGS)", fit["penalty"], fit["l1_ratio"], cfg.train.linear_cv_folds,
             fit["rounds"])  # fmt: skip
    info = {
        "runtime": "embedded",
        "strategy": "fedsgd (full-batch site gradients, server L-BFGS), penalty by federated CV",
        "best_round": fit["rounds"],
        "history": [],
        "sites": fit["sites"],
        "linear_fit": {k: v for k, v in fit.items() if k != "candidates"},
        "cv_candidates": fit["candidates"],
    }
    return model.eval(), info


def fit_fedavg(
    parties: Sequence[Party],
    c: float,
    rounds: int,
    local_iter: int = 5,
    server: str = "fedavg",
    server_lr: float = 0.1,
    tau: float = 1e-3,
) -> np.ndarray:
    """The same objective by local optimisation: each round every site runs ``local_iter`` L-BFGS iterations on
    its own penalised objective from the global coefficients and sends them; the server takes their mean
    weighted by patients (``fedavg``) or an Adam step on (mean - global) (``fedadam``, ``server_lr``, ``tau``,
    betas 0.9 / 0.99 as Flower's FedAdam). Returns the final coefficients ``[F]``."""
    if server not in ("fedavg", "fedadam"):
        raise ValueError(f"unknown server '{server}': valid names are ['fedadam', 'fedavg']")
    beta = np.zeros(int(parties[0].x.shape[1]))
    m, v = np.zeros_like(beta), np.zeros_like(beta)
    n = np.array([len(p.fold) for p in parties], float)
    for _ in range(rounds):
        local = np.stack([fit_ridge([p], c, x0=beta, max_iter=local_iter, quiet=True).beta for p in parties])
        mean = (n[:, None] * local).sum(0) / n.sum()
        if server == "fedavg":
            beta = mean
            continue
        delta = mean - beta
        m = 0.9 * m + 0.1 * delta
        v = 0.99 * v + 0.01 * delta**2
        beta = beta + server_lr * m / (np.sqrt(v) + tau)
    return beta
