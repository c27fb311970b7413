"""One hospital's half of a federated run, Flower-free: local training and validation, and its data.

:class:`SiteClient` trains the unchanged Lightning step from the global weights and returns only an
:class:`Update` (and an :class:`Evaluation` of scalars); :class:`ProximalTerm` is FedProx as a callback.
:func:`site_clients` makes the embedded sites; :func:`local_summaries` and :func:`deployed_client` are
what a deployed site (one SuperNode) does with its own cohort spec, loading it through ``pipeline.training``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch

from data_specs import load_cohort
from data_specs.config import RunConfig
from pipeline.federated.dp import add_dp_noise
from pipeline.federated.policy import SiteFacts, evaluation_withheld
from pipeline.federated.protocol import Arrays, Evaluation, Update, clip_l2, load_arrays, trainable_arrays
from pipeline.omics.clinical import ClinicalNormaliser
from pipeline.omics.normalise import OmicsNormaliser, site_summaries
from pipeline.omics.readers import read_omics
from pipeline.stats.curves import discrete_time_bins
from pipeline.stats.metrics import concordant_pairs, harrell_cindex
from pipeline.training.data import CohortData, load_run_data, make_loader
from pipeline.training.module import make_trainer, new_model, new_module
from pipeline.training.predict import predict
from pipeline.training.splits import assign_splits

log = logging.getLogger(__name__)


class ProximalTerm(L.Callback):
    """FedProx from outside the training step: adds ``mu * (w - w_global)`` to every trainable gradient.

    That is the gradient of ``(mu / 2) * ||w - w_global||^2``, so training with this callback equals
    training on ``loss + (mu / 2) * ||w - w_global||^2`` (tested). ``w_global`` is the weights at fit start.
    """

    def __init__(self, mu: float):
        self.mu = float(mu)
        self.anchor: list[torch.Tensor] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.anchor = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            for p, a in zip((p for p in pl_module.parameters() if p.requires_grad), self.anchor, strict=True):
                prox = self.mu * (p - a)
                if p.grad is None:
                    p.grad = prox.clone()
                else:
                    p.grad.add_(prox)


class SiteClient:
    """One hospital. Holds its own data; trains with the same Lightning step as local training.

    Args:
        site: the site's name.
        data: the site's data (in a real deployment, only its own patients).
        train_idx / val_idx: its training and validation patients.
        cfg: the shared run config.
        site_rank: position of the site in the federation (decorrelates local shuffling seeds).
    """

    def __init__(
        self,
        site: str,
        data: CohortData,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        cfg: RunConfig,
        site_rank: int = 0,
    ):
        self.site, self.data, self.cfg, self.rank = site, data, cfg, site_rank
        self.train_idx, self.val_idx = np.asarray(train_idx), np.asarray(val_idx)
        self.bin_edges: np.ndarray | None = None  # discrete-time bins agreed by the federation (None: local)
        self.time_unit: str | None = None  # the cohort's time unit (a deployed site reports it after training)
        self.n_events = int(data.event[self.train_idx].sum())
        if self.n_events < 2:
            # Policy: reported, not fatal. Its updates are (near) zero under a site-stratified Cox loss.
            log.warning("site %s has %d training event(s): its updates carry little signal", site, self.n_events)

    def facts(self) -> SiteFacts:
        """This site's counts and the model's parameter shapes: what the disclosure policy checks against."""
        if getattr(self, "_facts", None) is None:
            shapes = tuple(tuple(v.shape) for v in self.initial_arrays().values())
            n_val_events = int(self.data.event[self.val_idx].sum()) if len(self.val_idx) else 0
            fc = self.cfg.federated
            sends = evaluation_withheld(fc) is None
            self._facts = SiteFacts(self.site, len(self.train_idx), self.n_events, len(self.val_idx), n_val_events,
                                    shapes, fc.min_count, sends, fc.secagg)  # fmt: skip
        return self._facts

    def param_names(self) -> list[str]:
        """The trainable parameters' names in the order the arrays travel."""
        if getattr(self, "_names", None) is None:
            self._names = list(self.initial_arrays())
        return list(self._names)

    def initial_arrays(self) -> Arrays:
        """The seeded initial trainable weights (identical at every site with the same config)."""
        return trainable_arrays(self.new_model())

    def new_model(self):
        """A fresh seeded model; a discrete-time one gets the federation's :attr:`bin_edges` when set."""
        model = new_model(self.data, self.cfg)
        if self.bin_edges is not None and model.n_bins:
            model.set_bin_edges(torch.from_numpy(np.asarray(self.bin_edges, np.float64)))
        return model

    def _module(self, arrays: Arrays):
        module = new_module(self.new_model(), self.cfg)
        load_arrays(module.model, arrays)
        return module

    def _seed(self, rnd: int) -> int:
        return self.cfg.train.seed + 7919 * rnd + 104729 * self.rank

    def fit(self, arrays: Arrays, config: dict) -> Update:
        """Local training from the global weights.

        ``config``: ``round``, ``mode`` (``delta``: train ``local_epochs`` and return local - global;
        ``gradient``: return the gradient of the loss over all training patients, no step),
        ``local_epochs``, ``proximal_mu`` (FedProx), ``dp_local_std`` (> 0: local DP, Gaussian noise of that std
        added to the clipped update here), ``dp_clip`` (> 0: clip the update's L2 norm, send
        weight 1 and no metrics), ``weighting`` (``examples`` or ``events``), ``send_metrics`` (False under
        SecAgg+: the scalars would travel unmasked).
        """
        rnd = int(config.get("round", 0))
        seed = self._seed(rnd)
        module = self._module(arrays)
        L.seed_everything(seed, workers=True, verbose=False)
        if config.get("mode", "delta") == "gradient":
            module.train()
            module.zero_grad(set_to_none=True)
            n = len(self.train_idx)
            batch = next(iter(make_loader(self.data, self.train_idx, n, True, seed, self.cfg.train.max_tiles)))
            loss_t = module.loss(batch, module(batch))  # the training step's own forward + loss (Cox or NLL)
            loss_t.backward()
            params = dict(module.model.named_parameters())
            upd = {
                k: (params[k].grad.detach().cpu().numpy() if params[k].grad is not None else np.zeros_like(v))
                for k, v in arrays.items()
            }
            loss = float(loss_t.detach())
        else:
            mu = float(config.get("proximal_mu", 0.0))
            trainer = make_trainer(
                int(config.get("local_epochs", 1)), [ProximalTerm(mu)] if mu > 0 else [], validate=False
            )
            loader = make_loader(
                self.data, self.train_idx, self.cfg.train.batch_size, True, seed, self.cfg.train.max_tiles
            )
            trainer.fit(module, loader)
            new = trainable_arrays(module.model)
            upd = {k: new[k] - arrays[k] for k in arrays}
            loss = float(trainer.callback_metrics.get("train_loss", torch.tensor(float("nan"))))
        upd = {k: v.astype(np.float32) for k, v in upd.items()}
        clip = float(config.get("dp_clip", 0.0))
        if clip > 0:  # sensitivity bounded by the clip; equal weights; no data-derived scalars leave the site
            upd, _ = clip_l2(upd, clip)
            std = float(config.get("dp_local_std", 0.0))
            if std > 0:  # local DP: noised here, from the OS CSPRNG, before anything leaves the site
                upd = {k: v.astype(np.float32) for k, v in add_dp_noise(upd, std).items()}
            return Update(upd, 1, {})
        weight = self.n_events if config.get("weighting", "examples") == "events" else len(self.train_idx)
        metrics = {"train_loss": loss, "train_events": float(self.n_events)} if config.get("send_metrics", True) else {}
        if self.n_events < self.facts().min_count:  # a count of fewer than k events is not sent
            metrics.pop("train_events", None)
        return Update(upd, int(weight), metrics)

    def evaluate(self, arrays: Arrays, config: dict) -> Evaluation:
        """Validation of the global model on this site's validation patients: scalars only.

        A site with fewer than ``federated.min_count`` (k) validation patients or events sends no metric (no
        C-index, pair counts, loss or events: on so few they place single patients), and its patient count
        only when that is at least k (0 otherwise); a warning names the site. The server pools the others.

        Under DP, and under SecAgg+ unless ``federated.secagg_eval_plain`` (:func:`evaluation_withheld`), the site
        sends no plain metric and a patient count of 0 (warned once): nothing the accountant or the masks do not
        cover leaves it. Under SecAgg+ its validation goes in the round's secure sum instead
        (:meth:`secure_validation`).
        """
        if why := evaluation_withheld(self.cfg.federated):
            if not getattr(self, "_warned_withheld", False):
                log.warning("site %s: %s: its validation metrics are not sent in plain text", self.site, why)
                self._warned_withheld = True
            return Evaluation(0, {})
        if len(self.val_idx) == 0:
            return Evaluation(0, {})
        facts = self.facts()
        if min(facts.n_val, facts.n_val_events) < facts.min_count:
            if not getattr(self, "_warned_small_val", False):
                msg = "site %s: %d validation patient(s), %d event(s): fewer than federated.min_count=%d, so its "
                log.warning(msg + "validation metrics are suppressed (not sent)", self.site, facts.n_val,
                            facts.n_val_events, facts.min_count)  # fmt: skip
                self._warned_small_val = True
            return Evaluation(facts.n_val if facts.n_val >= facts.min_count else 0, {})
        return Evaluation(len(self.val_idx), self._validation(arrays))

    def secure_validation(self, arrays: Arrays) -> dict[str, float]:
        """This site's part of a round's secure validation sum (:data:`~pipeline.federated.policy.SECURE_EVAL_FIELDS`):
        whether it has validation patients, their count and event count, and the plain reply's loss sum and pair
        counts; zeros without validation patients. No minimum count here: under the secure sum the server applies
        k to the totals (:func:`~pipeline.federated.policy.secure_totals_rule`)."""
        n = len(self.val_idx)
        out = {"sites": float(n > 0), "n_val": float(n), "val_events": 0.0, "loss_sum": 0.0, "comparable": 0.0,
               "concordant": 0.0}  # fmt: skip
        if n:
            m = self._validation(arrays)
            out.update(val_events=m["events"], loss_sum=m["loss_sum"], comparable=m["comparable"],
                       concordant=m["concordant"])  # fmt: skip
        return out

    def _validation(self, arrays: Arrays) -> dict[str, float]:
        """The global model on the validation patients: C-index, concordant and comparable pairs, the loss summed
        as ``mean loss * events`` (0 without events) and the event count."""
        module = self._module(arrays)
        lh = predict(module.model, self.data, self.val_idx).log_hz
        t, e = self.data.time[self.val_idx], self.data.event[self.val_idx]
        conc, comp = concordant_pairs(t, e, lh)
        if self.cfg.train.loss == "nll":  # the configured loss: per-patient mean NLL over the validation patients
            module.eval()
            total = 0.0
            with torch.no_grad():
                for batch in make_loader(self.data, self.val_idx, 32, False):
                    total += float(module.loss(batch, module(batch))) * len(batch["time"])
            nll = total / len(self.val_idx)
        else:
            from models.losses import cox_loss

            nll = float(
                cox_loss(torch.from_numpy(lh), torch.from_numpy(e), torch.from_numpy(t), ties=self.cfg.train.ties)
            )
        ev = float(e.sum())
        return {
            "cindex": harrell_cindex(t, e, lh),
            "concordant": float(conc),
            "comparable": float(comp),
            "loss_sum": nll * ev if ev else 0.0,
            "events": ev,
        }


def site_clients(data: CohortData, cfg: RunConfig) -> list[SiteClient]:
    """One client per site with at least ``federated.min_count`` (k) training patients, and k training events
    when updates are weighted by events (rank = the site's position in the cohort); smaller sites are left
    out of the federation with a warning naming them (an update over fewer than k patients would leave them)."""
    tr, va = data.subset_sites(data.splits["train"]), data.subset_sites(data.splits["val"])
    k, by_events = cfg.federated.min_count, cfg.federated.weighting == "events"
    out = []
    for rank, s in enumerate(data.sites):
        n, ev = len(tr[s]), int(data.event[tr[s]].sum())
        if n >= max(k, 2) and (ev >= k or not by_events):
            out.append(SiteClient(s, data, tr[s], va[s], cfg, rank))
        elif n:
            msg = "site %s: %d training patient(s), %d event(s), fewer than federated.min_count=%d: left out"
            log.warning(msg + " of the federation", s, n, ev, k)
    if not out:
        raise ValueError(
            f"no site has federated.min_count={k} training patients{' and events' if by_events else ''}: "
            f"training patients per site { {s: len(tr[s]) for s in data.sites} }"
        )
    if cfg.train.loss == "nll":  # one set of bins for every site, from the sites' event-time histograms
        idx = np.concatenate([c.train_idx for c in out])
        edges = discrete_time_bins(data.time[idx], data.event[idx], data.site[idx], cfg.train.n_bins, k)
        for c in out:
            c.bin_edges = edges
    return out


def _site_train(spec: Path, site: str, cfg: RunConfig):
    """The cohort and the positions of ``site``'s training patients (the split rule training uses)."""
    cohort = load_cohort(spec)
    t = cfg.train
    splits = assign_splits(cohort, t.val_fraction, t.test_fraction, t.seed, t.test_sites)
    return cohort, [int(i) for i in splits["train"] if cohort.patients[i].site == site]


def local_event_times(spec: Path, site: str, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(time [P], event [P])`` of a deployed site's training patients (they stay at the site: it sends only
    :func:`~pipeline.stats.curves.follow_up_ceiling` and histograms of them)."""
    cohort, train = _site_train(spec, site, cfg)
    pts = [cohort.patients[i] for i in train]
    return np.array([p.time for p in pts], float), np.array([p.event for p in pts], bool)


def local_summaries(spec: Path, site: str, cfg: RunConfig) -> tuple[dict[str, dict], int]:
    """A deployed site's :func:`site_summaries` of its own training patients (same split rule as training),
    and its number of training patients (kept at the site: the disclosure policy checks against it)."""
    cohort, train = _site_train(spec, site, cfg)
    train_ids = [cohort.patients[i].patient_id for i in train]
    adata = read_omics(cohort.omics) if cohort.omics is not None else None
    clinical = ClinicalNormaliser.read(cohort.clinical) if cohort.clinical is not None else None
    values = cohort.omics.values if cohort.omics is not None else "counts"
    return site_summaries(site, train_ids, adata, values, clinical, cfg.federated.min_count), len(train_ids)


def deployed_client(
    spec: Path, site: str, cfg: RunConfig, stats: dict, out: Path, rank: int | None = None
) -> SiteClient:
    """A deployed site's client: its cohort spec loaded through ``pipeline.training`` with the cohort-level
    normaliser states ``stats`` (``omics`` / ``clinical``) from the statistics exchange.

    The spec lists the site's own patients (other sites' patients, if present, are ignored). Without
    ``stats`` (the node missed the exchange) the site normalises on its own training patients (warning).
    """
    cohort = load_cohort(spec)
    if site not in cohort.sites:
        raise ValueError(f"{spec}: node site '{site}' has no patients (sites: {cohort.sites})")
    if not stats:
        log.warning("site %s: no cohort-level statistics received; normalising on its own training patients", site)
    data = load_run_data(
        cohort,
        cfg,
        out=out,
        omics_norm=OmicsNormaliser.from_state(stats["omics"]) if "omics" in stats else None,
        clinical_norm=ClinicalNormaliser.from_state(stats["clinical"]) if "clinical" in stats else None,
    )
    tr, va = data.subset_sites(data.splits["train"])[site], data.subset_sites(data.splits["val"])[site]
    client = SiteClient(site, data, tr, va, cfg, data.sites.index(site) if rank is None else rank)
    if "time_bins" in stats:  # discrete time: the federation's bins, from the sites' event-time histograms
        client.bin_edges = np.asarray(stats["time_bins"], np.float64)
    client.time_unit = cohort.time_unit
    return client
