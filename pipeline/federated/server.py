"""Federated training: each site runs the unchanged local training step and returns only a model update.

Two halves, neither of which imports Flower (``client_app.py`` / ``server_app.py`` wrap them in a Flower
ClientApp and ServerApp, run by the embedded in-process runtime (``embedded.py``) or Flower's deployment engine):

- :class:`SiteClient` (one hospital): from the global trainable weights and a round config it returns an
  :class:`Update` holding only the update of the trainable parameters (the true full-batch gradient for
  FedSGD; the weight delta, i.e. pseudo-gradient, for local-epoch strategies), a weight (its number of
  training patients or events) and scalar metrics; and an :class:`Evaluation` (count + scalars) of the
  global model on its validation patients. Never features, omics, clinical values, times, events or ids.
- :class:`FederatedServer` (this module): weighted mean of the updates, optional DP noise (with an RDP
  accountant: ``dp.py``), a server optimizer (SGD, FedAvg, FedAdam, FedYogi), pooled validation every round,
  the best round's weights, and a checkpoint after every finished round so a killed run resumes: arrays in
  safetensors, everything else in JSON (no pickle: loading it runs no code), both written atomically.

Differential privacy (``federated.dp_noise`` = sigma > 0) covers exactly this: each site clips its model update
to L2 norm ``C = dp_clip`` and sends it with weight 1; the server averages the ``n`` updates of the round and
adds Gaussian noise of std ``sigma * 2C / n`` to the mean, drawn from a generator seeded by the operating
system's CSPRNG (``secrets``), never from the run config. ``2C / n`` is the L2 sensitivity of the mean under
replace-one adjacency (one site's update swapped for any other, roster of ``n`` sites fixed), so the RDP
accountant's noise multiplier is ``sigma``, sampling rate 1 (every site every round): the (epsilon, delta)
is site-level, for the sequence of aggregated updates. Under DP the sites send no evaluation metric
(:func:`~pipeline.federated.policy.evaluation_withheld`) and the server keeps the last round, so no round
selection leaks validation data either; the guarantee does not cover the statistics exchange or anything
computed after training. The DP is central: the server sees the clipped updates unless SecAgg+ is on. With
``federated.dp_local`` each site adds noise of std ``sigma * 2C`` (its own update's replace-one sensitivity)
to its clipped update before sending, the server adds none, and the same accountant gives each site's
guarantee against everyone else, server included (the mean then carries ``sqrt(n)`` times the central noise).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from data_specs.config import FederatedConfig, RunConfig
from pipeline.federated.dp import PrivacyLedger, add_dp_noise, dp_noise_std
from pipeline.federated.policy import evaluation_withheld, secure_evaluation, secure_totals_rule
from pipeline.federated.protocol import DEFAULT_SERVER_LR, STRATEGIES, Arrays, Evaluation, Update
from pipeline.files import write_bytes, write_text
from pipeline.progress import RoundClock
from pipeline.training.selection import Selector

log = logging.getLogger(__name__)


STATE_FILE = "server_state.json"  # scalars, history, resume key; names its arrays file


def weighted_mean(updates: list[Update]) -> Arrays | None:
    """Example-weighted mean of the update arrays (float64 accumulation); None when all weights are 0."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        return None
    keys = updates[0].arrays.keys()
    return {k: sum(u.arrays[k].astype(np.float64) * (u.num_examples / total) for u in updates) for k in keys}


class ServerOptimizer:
    """Applies the aggregated update to the global weights.

    ``fedsgd``: ``w <- w - lr * g`` (``g``: mean gradient). ``fedavg``/``fedprox``: ``w <- w + lr * d``
    (``d``: mean delta). ``fedadam``/``fedyogi`` (Reddi et al., "Adaptive Federated Optimization", 2021):
    ``m <- b1 m + (1 - b1) d``; Adam ``v <- b2 v + (1 - b2) d^2``, Yogi ``v <- v - (1 - b2) d^2 sign(v - d^2)``
    (``m0 = v0 = 0``); ``w <- w + lr_t m / (sqrt(v) + tau)``, ``lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)`` for
    Adam (bias correction) and ``lr`` for Yogi: the update rules of Flower's ``FedAdam``/``FedYogi`` (tested).
    """

    def __init__(self, strategy: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown federated strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
        self.strategy, self.lr, self.b1, self.b2, self.tau = strategy, lr, beta1, beta2, tau
        self.t = 0
        self.m: Arrays | None = None
        self.v: Arrays | None = None

    def step(self, global_arrays: Arrays, update: Arrays) -> Arrays:
        self.t += 1
        if self.strategy == "fedsgd":
            return {k: (g - self.lr * update[k]).astype(np.float32) for k, g in global_arrays.items()}
        if self.strategy in ("fedavg", "fedprox"):
            return {k: (g + self.lr * update[k]).astype(np.float32) for k, g in global_arrays.items()}
        if self.m is None or self.v is None:
            self.m = {k: np.zeros_like(v, np.float64) for k, v in update.items()}
            self.v = {k: np.zeros_like(v, np.float64) for k, v in update.items()}
        lr_t = self.lr
        if self.strategy == "fedadam":
            lr_t *= math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        out = {}
        for k, g in global_arrays.items():
            d = update[k]
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * d
            if self.strategy == "fedadam":
                self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * d * d
            else:
                self.v[k] = self.v[k] - (1 - self.b2) * d * d * np.sign(self.v[k] - d * d)
            out[k] = (g + lr_t * self.m[k] / (np.sqrt(self.v[k]) + self.tau)).astype(np.float32)
        return out

    def state(self) -> dict:
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state(self, s: dict) -> None:
        self.t, self.m, self.v = int(s["t"]), s["m"], s["v"]


def save_state(folder: Path, state: dict, arrays: dict[str, Arrays]) -> Path:
    """Checkpoint: ``arrays`` (group -> name -> array) in ``server_state.r<round>.safetensors``, then ``state``
    (JSON: round, history, optimizer step, accountant history, resume key) in ``server_state.json`` naming
    that file. Each is written atomically and the JSON last, so a kill at any point leaves the previous
    complete checkpoint; older arrays files are removed afterwards."""
    from safetensors.numpy import save

    flat = {f"{g}/{k}": np.ascontiguousarray(v) for g, a in arrays.items() for k, v in a.items()}
    name = f"server_state.r{int(state['round'])}.safetensors"
    write_bytes(folder / name, save(flat))
    write_text(folder / STATE_FILE, json.dumps({**state, "arrays_file": name}, indent=1))
    for old in folder.glob("server_state.r*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / STATE_FILE


def load_state(path: Path) -> tuple[dict, dict[str, Arrays]]:
    """The inverse of :func:`save_state`; a truncated or mismatched checkpoint is a ``ValueError`` naming the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        state = json.loads(path.read_text())
        arrays_path = path.with_name(str(state["arrays_file"]))
        flat = load_file(str(arrays_path))
    except (ValueError, KeyError, OSError, SafetensorError) as e:  # JSON, missing file, safetensors header
        raise ValueError(f"{path}: unreadable federated checkpoint ({type(e).__name__}: {e})") from e
    arrays: dict[str, Arrays] = {}
    for key, v in flat.items():
        group, name = key.split("/", 1)
        arrays.setdefault(group, {})[name] = v
    return state, arrays


def _resume_key(cfg: RunConfig) -> dict:
    """What must match between a checkpoint and the resumed run (everything but the number of rounds)."""
    d = cfg.to_dict()
    d.pop("out", None)
    d.pop("cohort", None)
    d["federated"] = {k: v for k, v in d["federated"].items() if k not in ("rounds", "round_timeout")}
    return d


class FederatedServer:
    """Server logic shared by both runtimes: aggregation, DP, server optimizer, validation, best, checkpoints.

    Args:
        cfg: the run config (``federated`` section drives everything here).
        initial: the initial global arrays (None in a deployment where they come from a site).
        out: folder for the checkpoint ``server_state.json`` + ``.safetensors`` (None: no checkpoint).
        resume: continue from ``out/server_state.json`` after its last finished round.
    """

    def __init__(self, cfg: RunConfig, initial: Arrays | None, out: Path | None = None, resume: bool = False):
        fc: FederatedConfig = cfg.federated
        self.cfg, self.fc, self.out = cfg, fc, out
        lr = fc.server_lr if fc.server_lr is not None else DEFAULT_SERVER_LR[fc.strategy]
        self.opt = ServerOptimizer(fc.strategy, lr, fc.beta1, fc.beta2, fc.tau)
        self.ledger = PrivacyLedger(fc.dp_noise, fc.dp_delta) if fc.dp_noise > 0 else None
        self.global_arrays = initial
        self.history: list[dict] = []
        self.best: tuple[float, int, Arrays] | None = None  # (selection score, round, arrays) of the kept round
        t = cfg.train
        self.selector = Selector(t.select, t.select_window, t.without_validation, "federated server")
        self.secure_eval = secure_evaluation(fc)  # SecAgg+: each round's validation is a secure sum of the sites'
        self.withheld = None if self.secure_eval else evaluation_withheld(fc)  # why no validation (None: there is)
        if self.withheld and t.without_validation == "error":
            raise ValueError(
                f"train.without_validation=error, but with {self.withheld} the sites send no validation metrics, "
                "so no round can be selected on validation: set train.without_validation=last (the last round)"
            )
        self.next_round = 0
        self.roster: int | None = None  # sites in the federation (set by the runtime): min_sites' default
        self.clock = RoundClock()  # elapsed time and ETA in the per-round log line
        if resume:
            self._resume()

    def _resume(self) -> None:
        path = None if self.out is None else self.out / STATE_FILE
        if path is None or not path.is_file():
            raise FileNotFoundError(f"--resume: no federated checkpoint at {path}")
        s, arrays = load_state(path)
        if s.get("resume_key") != json.loads(json.dumps(_resume_key(self.cfg), default=str)):
            raise ValueError(f"{path}: the checkpoint was written with another config; resume needs the same one")
        names = s["array_names"]  # the parameter order of the run (safetensors stores keys sorted)
        self.global_arrays = {k: arrays["global"][k] for k in names}
        self.history = s["history"]
        self.best = (float(s["best_score"]), int(s["best_round"]), {k: arrays["best"][k] for k in names})
        self.selector.load_state(s["selection"])
        self.opt.load_state(
            {
                "t": s["optimizer_t"],
                "m": {k: arrays["m"][k] for k in names} if "m" in arrays else None,
                "v": {k: arrays["v"][k] for k in names} if "v" in arrays else None,
            }
        )
        if self.ledger is not None:
            hist = [tuple(h) for h in s["privacy_history"]]
            self.ledger = PrivacyLedger(self.fc.dp_noise, self.fc.dp_delta, hist)
        self.next_round = int(s["round"]) + 1
        log.info("resuming from %s after round %d", path, s["round"])

    @property
    def required_sites(self) -> int:
        """Sites that must answer a round: ``federated.min_sites``, or every site of the roster when unset."""
        if self.fc.min_sites is not None:
            return self.fc.min_sites
        return self.roster or 1

    @property
    def rounds_left(self) -> int:
        return max(0, self.fc.rounds - self.next_round)

    def fit_config(self, rnd: int) -> dict:
        self.clock.start()
        fc = self.fc
        return {
            "round": rnd,
            "mode": "gradient" if fc.strategy == "fedsgd" else "delta",
            "local_epochs": fc.local_epochs,
            "proximal_mu": fc.proximal_mu if fc.strategy == "fedprox" else 0.0,
            "dp_clip": fc.dp_clip if fc.dp_noise > 0 else 0.0,
            "dp_local_std": fc.dp_noise * 2.0 * fc.dp_clip if fc.dp_noise > 0 and fc.dp_local else 0.0,
            "weighting": fc.weighting,
            "send_metrics": not fc.secagg,  # SecAgg+ masks only the arrays: plain scalars would bypass it
        }

    def aggregate(self, rnd: int, updates: list[Update], dropped: list[str]) -> Arrays:
        """New global arrays from the round's updates (or from their secure sum: identical updates)."""
        assert self.global_arrays is not None, "initial arrays not set"
        if len(updates) < self.required_sites:
            raise RuntimeError(
                f"round {rnd}: only {len(updates)} site(s) answered ({len(dropped)} dropped: {dropped}), "
                f"fewer than min_sites={self.required_sites}"
            )
        mean = weighted_mean(updates)
        if mean is None:
            log.warning("round %d: every update has weight 0 (no events); global model unchanged", rnd)
            return self.global_arrays
        if self.ledger is not None and not self.fc.dp_local:  # local DP: every site noised its own update
            mean = add_dp_noise(mean, dp_noise_std(self.fc.dp_noise, self.fc.dp_clip, len(updates)))
        self.global_arrays = self.opt.step(self.global_arrays, mean)
        return self.global_arrays

    def finish_round(self, rnd: int, evals: dict[str, Evaluation], rec: dict) -> dict:
        """Pool the sites' validation scalars, keep the round ``train.select`` picks, checkpoint. In a run that
        withholds evaluation metrics (DP; SecAgg+ with neither a secure sum nor ``secagg_eval_plain``) any metric
        that arrives is ignored and the last round kept."""
        assert self.global_arrays is not None
        if self.withheld or self.secure_eval:  # under a secure validation sum no plain metric is used either
            evals = {s: Evaluation(0, {}) for s in evals}
            if self.withheld and not self.selector.warned:
                log.warning("federated server: %s: no validation metrics, keeping the last round", self.withheld)
                self.selector.warned = True
        conc = sum(e.metrics.get("concordant", 0.0) for e in evals.values())
        comp = sum(e.metrics.get("comparable", 0.0) for e in evals.values())
        ev_n = sum(e.metrics.get("events", 0.0) for e in evals.values())
        loss_sum = sum(e.metrics.get("loss_sum", 0.0) for e in evals.values())
        site_c = {s: e.metrics.get("cindex", float("nan")) for s, e in evals.items()}
        return self._finish(rnd, conc, comp, loss_sum, ev_n, rec, site_c)

    def finish_secure_round(self, rnd: int, total: dict[str, float] | None, rec: dict) -> dict:
        """:meth:`finish_round` from a round's secure validation sum (``total``: the decoded
        :data:`~pipeline.federated.policy.SECURE_EVAL_FIELDS` summed over sites, None when the sum did not
        complete): pooled exactly as from plain replies when the totals pass the minimum-count rule
        (:func:`~pipeline.federated.policy.secure_totals_rule`), else no validation this round (warned). The
        history keeps the totals the server learnt (``val_sum``); there is no per-site C-index."""
        k = self.fc.min_count
        why = "the secure sum did not complete"
        if total is not None:
            rec = {**rec, "val_sum": {"sites": int(total["sites"]), "patients": int(total["n_val"]),
                                      "events": int(total["val_events"])}}  # fmt: skip
            why = secure_totals_rule(int(total["sites"]), int(total["n_val"]), int(total["val_events"]), k)
        if why is not None:
            log.warning("round %d: no validation: %s", rnd, why)
            return self._finish(rnd, 0.0, 0.0, 0.0, 0.0, rec, {})
        assert total is not None
        return self._finish(rnd, total["concordant"], total["comparable"], total["loss_sum"], total["val_events"],
                            rec, {})  # fmt: skip

    def _finish(self, rnd: int, conc: float, comp: float, loss_sum: float, ev_n: float, rec: dict,
                site_c: dict[str, float]) -> dict:  # fmt: skip
        val_loss = loss_sum / ev_n if ev_n else float("nan")
        rec = {
            "round": rnd,
            "val_cindex": conc / comp if comp > 0 else float("nan"),
            "val_loss": val_loss,
            **rec,
            "site_val_cindex": site_c,
        }
        if self.ledger is not None:
            rec["epsilon"], rec["delta"] = self.ledger.step(), self.fc.dp_delta
        self.history.append(rec)
        log.info(
            "round %d: val C-index %.3f, val loss %.4f%s; %d of %d rounds left, %s",
            rnd,
            rec["val_cindex"],
            val_loss,
            f", epsilon {rec['epsilon']:.2f}" if "epsilon" in rec else "",
            max(0, self.fc.rounds - rnd - 1),
            self.fc.rounds,
            self.clock.text(self.fc.rounds - rnd - 1),
        )
        # train.select on the pooled validation C-index (summed pairs) or loss; no usable validation at all:
        # train.without_validation (the latest round, warned once, or an error), as in centralised training.
        if self.withheld or self.selector.update(rnd, rec["val_cindex"], val_loss):
            score = self.selector.best[0] if self.selector.best is not None else -np.inf
            self.best = (score, rnd, {k: v.copy() for k, v in self.global_arrays.items()})
        self.next_round = rnd + 1
        if self.out is not None:
            self.checkpoint(rnd)
        return rec

    def checkpoint(self, rnd: int) -> None:
        """Write the state after round ``rnd`` to ``out`` (see :func:`save_state`)."""
        assert self.out is not None and self.global_arrays is not None and self.best is not None
        arrays = {"global": self.global_arrays, "best": self.best[2]}
        if self.opt.m is not None and self.opt.v is not None:
            arrays.update(m=self.opt.m, v=self.opt.v)
        state = {
            "round": rnd,
            "array_names": list(self.global_arrays),
            "best_score": self.best[0],
            "best_round": self.best[1],
            "selection": self.selector.state(),
            "optimizer_t": self.opt.t,
            "privacy_history": [list(h) for h in self.ledger.acc.history] if self.ledger else None,
            "history": self.history,
            "config": self.cfg.to_dict(),
            "resume_key": _resume_key(self.cfg),
        }
        save_state(self.out, json.loads(json.dumps(state, default=str)), arrays)

    def summary(self) -> dict:
        assert self.best is not None, "no round finished"
        info: dict = {
            "strategy": self.fc.strategy,
            "best_round": self.best[1],
            "select": self.cfg.train.select if self.selector.has_score else "last",
            "best_val_loss": self.selector.best_loss if self.selector.has_score else None,
            "best_val_cindex": self.selector.best_cindex if self.selector.has_score else None,
            "history": self.history,
            "secagg": self.fc.secagg,
            "min_sites": self.required_sites,
            "dropped": [{"round": r["round"], "site": s} for r in self.history for s in r.get("dropped", [])],
            "retried": [{"round": r["round"], "site": s} for r in self.history for s in r.get("retried", [])],
        }
        if self.ledger is not None:
            info["privacy"] = {
                "epsilon": self.ledger.epsilon,
                "delta": self.fc.dp_delta,
                "noise_multiplier": self.fc.dp_noise,
                "clip": self.fc.dp_clip,
                "mode": "local" if self.fc.dp_local else "central",
                "accountant": "opacus RDPAccountant, sampling rate 1 (every site every round), noise std sigma*2C/n "
                "on the mean (central) or sigma*2C on each site's update (local), replace-one, fixed roster; covers "
                "the aggregated (central) or each sent (local) update; no evaluation metric is sent under DP and "
                "the last round is kept",
            }
        return info
