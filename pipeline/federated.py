"""Federated training: each site runs the unchanged local training step and returns only a model update.

The protocol is Flower's shape (a ClientApp's ``fit``/``evaluate`` handlers receive the global arrays and
a config and return arrays + a count + scalar metrics), so :class:`SiteClient` can sit inside a Flower
``ClientApp`` unchanged. What leaves a site (:class:`Update`, :class:`Evaluation`) is, by construction,
only: the weight delta of the trainable parameters (float32 arrays, keyed by parameter name), the number
of training patients, and scalar metrics. Never features, omics, clinical values, times, events or ids.

The embedded runtime (:func:`run_federated`) runs every site in-process, deterministically.
"""

from __future__ import annotations

import json
import logging
import os
import time as _time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch

from data_specs.config import RunConfig
from models.survival import MultimodalSurvival
from pipeline.data import CohortData, make_loader
from pipeline.evaluate import harrell_cindex
from pipeline.train import make_trainer, new_model, new_module, predict_log_hz

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


@dataclass
class Update:
    """The only thing a site sends after local training."""

    arrays: Arrays  # weight delta (local - global) per trainable parameter
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    """The only thing a site sends after evaluating the global model on its validation patients."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def trainable_arrays(model: torch.nn.Module) -> Arrays:
    return {k: p.detach().cpu().numpy().copy() for k, p in model.named_parameters() if p.requires_grad}


def load_arrays(model: torch.nn.Module, arrays: Arrays) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in arrays.items():
            params[k].copy_(torch.from_numpy(np.asarray(v)))


def concordant_pairs(time: np.ndarray, event: np.ndarray, log_hz: np.ndarray) -> tuple[float, float]:
    """(concordant + 0.5 * tied, comparable) Harrell pairs: sums over sites give a pooled C without pooling data."""
    from sksurv.metrics import concordance_index_censored

    if event.sum() == 0 or len(time) < 2:
        return 0.0, 0.0
    try:
        _, conc, disc, tied, _ = concordance_index_censored(
            event.astype(bool), time.astype(float), log_hz.astype(float)
        )
    except ValueError:
        return 0.0, 0.0
    return conc + 0.5 * tied, float(conc + disc + tied)


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
        self.n_events = int(data.event[self.train_idx].sum())
        if self.n_events < 2:
            log.warning("site %s has %d training event(s): its updates carry little signal", site, self.n_events)

    def _module(self, arrays: Arrays):
        module = new_module(new_model(self.data, self.cfg), self.cfg)
        load_arrays(module.model, arrays)
        return module

    def fit(self, arrays: Arrays, config: dict) -> Update:
        """Train locally for ``config['local_epochs']`` from the global weights; return the delta."""
        rnd = int(config.get("round", 0))
        seed = self.cfg.train.seed + 7919 * rnd + 104729 * self.rank
        module = self._module(arrays)
        L.seed_everything(seed, workers=True, verbose=False)
        trainer = make_trainer(int(config.get("local_epochs", 1)), validate=False)
        loader = make_loader(self.data, self.train_idx, self.cfg.train.batch_size, True, seed, self.cfg.train.max_tiles)
        trainer.fit(module, loader)
        new = trainable_arrays(module.model)
        delta = {k: (new[k] - arrays[k]).astype(np.float32) for k in arrays}
        loss = float(trainer.callback_metrics.get("train_loss", torch.tensor(float("nan"))))
        return Update(delta, len(self.train_idx), {"train_loss": loss, "train_events": float(self.n_events)})

    def evaluate(self, arrays: Arrays, config: dict) -> Evaluation:
        """Validation of the global model on this site's validation patients: scalars only."""
        if len(self.val_idx) == 0:
            return Evaluation(0, {})
        module = self._module(arrays)
        lh, _ = predict_log_hz(module.model, self.data, self.val_idx)
        t, e = self.data.time[self.val_idx], self.data.event[self.val_idx]
        conc, comp = concordant_pairs(t, e, lh)
        from models.losses import cox_loss

        nll = float(cox_loss(torch.from_numpy(lh), torch.from_numpy(e), torch.from_numpy(t), ties=self.cfg.train.ties))
        return Evaluation(
            len(self.val_idx),
            {
                "cindex": harrell_cindex(t, e, lh),
                "concordant": conc,
                "comparable": comp,
                "loss_sum": nll * float(e.sum()),
                "events": float(e.sum()),
            },
        )


class FedAvg:
    """Server side: example-weighted mean of the site deltas, applied with ``server_lr`` (1.0 = FedAvg)."""

    def __init__(self, server_lr: float = 1.0):
        self.server_lr = server_lr

    def aggregate(self, global_arrays: Arrays, updates: list[Update]) -> Arrays:
        total = sum(u.num_examples for u in updates)
        if total == 0:
            return global_arrays
        out = {}
        for k, g in global_arrays.items():
            mean_delta = sum(u.arrays[k].astype(np.float64) * (u.num_examples / total) for u in updates)
            out[k] = (g + self.server_lr * mean_delta).astype(np.float32)
        return out


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def run_federated(
    data: CohortData,
    cfg: RunConfig,
    out: Path | None = None,
    progress: bool = False,
    clients: list[SiteClient] | None = None,
) -> tuple[MultimodalSurvival, dict]:
    """The embedded runtime: sites in-process, FedAvg, best round by pooled validation Cox loss.

    Each round: every site trains from the global weights and returns a delta; the server averages the
    deltas weighted by example count; every site evaluates the new global model on its validation
    patients and returns scalars. A site that raises is dropped from that round (warning) as long as
    ``min_sites`` remain. Server state is checkpointed atomically after each round.
    """
    fc = cfg.federated
    if clients is None:
        tr, va = data.subset_sites(data.splits["train"]), data.subset_sites(data.splits["val"])
        clients = [SiteClient(s, data, tr[s], va[s], cfg, k) for k, s in enumerate(data.sites) if len(tr[s]) > 1]
    if len(clients) < fc.min_sites:
        raise ValueError(f"{len(clients)} site(s) with training patients, fewer than min_sites={fc.min_sites}")
    model = new_model(data, cfg)
    global_arrays = trainable_arrays(model)
    strategy = FedAvg()
    history: list[dict] = []
    best: tuple[float, int, Arrays] | None = None
    from tqdm.auto import tqdm

    for rnd in tqdm(range(fc.rounds), desc="federated rounds", unit="round", disable=not progress):
        t0 = _time.perf_counter()
        conf = {"round": rnd, "local_epochs": fc.local_epochs}
        updates, dropped = [], []
        for c in clients:
            try:
                updates.append(c.fit(global_arrays, conf))
            except Exception as e:  # a failing site must not take the federation down
                log.warning(
                    "round %d: site %s failed (%s: %s); dropped from this round", rnd, c.site, type(e).__name__, e
                )
                dropped.append(c.site)
        if len(updates) < fc.min_sites:
            raise RuntimeError(
                f"round {rnd}: only {len(updates)} site(s) answered, fewer than min_sites={fc.min_sites}"
            )
        global_arrays = strategy.aggregate(global_arrays, updates)
        evals = {c.site: c.evaluate(global_arrays, conf) for c in clients}
        conc = sum(e.metrics.get("concordant", 0.0) for e in evals.values())
        comp = sum(e.metrics.get("comparable", 0.0) for e in evals.values())
        val_c = conc / comp if comp > 0 else float("nan")
        ev_n = sum(e.metrics.get("events", 0.0) for e in evals.values())
        val_loss = sum(e.metrics.get("loss_sum", 0.0) for e in evals.values()) / ev_n if ev_n else float("nan")
        rec = {
            "round": rnd,
            "val_cindex": val_c,
            "val_loss": val_loss,
            "seconds": _time.perf_counter() - t0,
            "dropped": dropped,
            "train_loss": float(
                np.average([u.metrics["train_loss"] for u in updates], weights=[u.num_examples for u in updates])
            ),
            "site_val_cindex": {s: e.metrics.get("cindex", float("nan")) for s, e in evals.items()},
            "bytes_per_site": int(sum(a.nbytes for a in updates[0].arrays.values())),
        }
        history.append(rec)
        log.info("round %d: val C-index %.3f, val loss %.4f, train loss %.4f", rnd, val_c, val_loss, rec["train_loss"])
        # Select on the pooled validation partial likelihood: smoother than a C-index over a few pairs.
        score = -val_loss if np.isfinite(val_loss) else -np.inf
        if best is None or score > best[0]:
            best = (score, rnd, {k: v.copy() for k, v in global_arrays.items()})
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            _save_state(
                out / "server_state.pt",
                {"round": rnd, "global": global_arrays, "best": best, "history": history, "config": cfg.to_dict()},
            )
    assert best is not None
    load_arrays(model, best[2])
    info = {"best_round": best[1], "best_val_loss": -best[0], "history": history, "sites": [c.site for c in clients]}
    if out is not None:
        (out / "federated_history.json").write_text(json.dumps(info, indent=2, default=float))
    return model.eval(), info
