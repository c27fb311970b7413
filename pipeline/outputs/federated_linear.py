"""The federated linear Cox baseline of a federated run: "federated linear Cox (no pooling)".

The linear model family (``model.family=linear``: ``log_hz`` linear in the standardised mean-pooled tile
features, genes and clinical covariates) is trained on the run's own sites and split without pooling patient
data, so a consortium gets a linear reference.

Default (``train.linear_fit=cv``, no DP, no SecAgg+): fitted to the optimum of the ridge-penalised
site-stratified Cox partial likelihood on every site's non-test patients (full-batch site gradients summed,
L-BFGS at the server), the penalty chosen among :func:`~pipeline.training.linear_fit.penalty_grid` by federated
K-fold cross-validation of the partial likelihood (:mod:`pipeline.federated.linear_sites`; each site sends one
CV score over all its non-test patients, so it passes the minimum count where a validation split would not).
Its messages are described in ``federated_linear/privacy_ledger.jsonl``. A run whose network starts from this fit
(``model.skip=fitted``: the same federated fit of the same config on the same patients, done before the rounds) has
it already: :func:`run_offset` takes it from the model file and the baseline reuses it (its messages are in the
run's ``privacy_ledger.jsonl``) instead of fitting it twice.

Under DP or SecAgg+ (whose protections that fit does not yet apply) or ``train.linear_fit=sgd``: the run's
strategy, rounds, SecAgg+ and DP settings through the embedded Flower runtime, the AdamW weight decay among
:data:`PENALTIES` by the pooled validation C-index of each candidate's kept round; each candidate has its own
privacy ledger under ``federated_linear/``, and under DP every candidate spends privacy budget on the same sites,
which the record states. Test patients are only scored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.federated.linear_sites import full_batch_linear
from pipeline.outputs.scoring import BaselineSettings, scored
from pipeline.training.linear_fit import fit_kind, penalty_grid

if TYPE_CHECKING:
    from data_specs.config import RunConfig
    from pipeline.training.data import CohortData

log = logging.getLogger(__name__)

LABEL = "federated linear Cox (no pooling)"
MODALITY_DIMS = {"slides": "feature_dim", "omics": "n_genes", "clinical": "n_clinical"}  # -> CohortData.model_dims()
# AdamW weight decay candidates: the a-priori default first (kept alone when the sites send no validation scores,
# e.g. too few validation events under the disclosure policy), then strong and weak; ties keep the earlier
PENALTIES = (1.0, 10.0, 0.01)
# Optimiser settings of the linear family, fixed a priori and checked on TCGA-BRCA's validation split (see
# docs/benchmarks.md); the network's learning rates do not suit a zero-initialised linear model.
LINEAR_LR = 0.01
ADAPTIVE_SERVER_LR = 0.05  # fedadam / fedyogi server learning rate for the linear family
# penalties per patient tried by the default fit's federated CV; None: the a-priori grid of train.linear_l1_ratio
GRID: tuple[float, ...] | None = None


def linear_overrides(cfg: RunConfig, weight_decay: float) -> list[str]:
    """The run config's overrides that make it the linear family's (everything else is the run's own)."""
    ov = ["model.family=linear", f"train.lr={LINEAR_LR}", f"train.weight_decay={weight_decay}"]
    if cfg.federated.strategy in ("fedadam", "fedyogi"):
        ov.append(f"federated.server_lr={ADAPTIVE_SERVER_LR}")
    return ov


def fit_federated_linear(
    data: CohortData,
    cfg: RunConfig,
    model_log_hz: np.ndarray | None = None,
    settings: BaselineSettings | None = None,
    out: Path | None = None,
    offset: tuple[object, dict] | None = None,
) -> dict:
    """Train the linear family federated on ``data``'s sites and split; score it on the test patients.

    Args:
        data: the run's data (``splits``: train, val, test).
        cfg: the run's config (its ``federated`` section is used as is).
        model_log_hz: the model's test ``log_hz`` in ``data.splits["test"]`` order: adds the paired bootstrap
            CI of (model - this).
        out: folder for each candidate's federated checkpoints and privacy ledger (None: nothing written).
        offset: ``(linear model, fit record)`` of the run's fitted offset (:func:`run_offset`): this very fit, used
            instead of fitting again (only on the default path, ``full_batch_linear``).

    Returns a record for ``metrics.json``'s ``baselines`` block (``val_cindex`` NaN and the default penalty when
    the sites send no validation scores).
    """
    from pipeline.training.predict import predict

    s, test = settings or BaselineSettings(), np.asarray(data.splits["test"])
    if not full_batch_linear(cfg):
        cands, (rec, model) = _train_candidates(data, cfg, out)
        choice = (
            "weight decay with the highest pooled validation C-index (ties: the earlier candidate)"
            if np.isfinite(rec["val_cindex"])
            else f"weight decay fixed a priori at {rec['weight_decay']:g}: the sites sent no validation C-index"
        )
        strategy = cfg.federated.strategy
    else:
        rec, model, cands, choice = _fit_cv(data, cfg, out) if offset is None else _reused(offset, cfg)
        strategy = "fedsgd (full-batch site gradients, server L-BFGS)"
    lh = predict(model, data, test).log_hz
    ref = None if model_log_hz is None else np.asarray(model_log_hz, float)
    t, e = data.time[test].astype(float), data.event[test].astype(bool)
    out_rec = {
        "label": LABEL,
        "modalities": [m for m, k in MODALITY_DIMS.items() if data.model_dims()[k]],
        "strategy": strategy,
        "rounds": cfg.federated.rounds,
        "secagg": cfg.federated.secagg,
        "weight_decay": rec["weight_decay"],
        "val_cindex": rec["val_cindex"],
        "best_round": rec["best_round"],
        "candidates": cands,
        "choice": choice,
        **({"linear_fit": rec["linear_fit"]} if "linear_fit" in rec else {}),
        **scored(t, e, lh, ref, s),
    }
    if any("epsilon" in c for c in cands):
        out_rec["epsilon_total"] = float(sum(c.get("epsilon", 0.0) for c in cands))
        out_rec["privacy_note"] = (
            f"{len(cands)} candidate trainings on the same sites: their epsilons add up (basic composition) on top "
            "of the model's own"
        )
    return out_rec


def run_offset(model: object, card: object, cfg: RunConfig) -> tuple[object, dict] | None:
    """``(offset model, fit record)`` of a saved run (``model``, ``card``: :func:`pipeline.training.bundle.load_bundle`)
    whose network starts from the federated linear fit that :func:`fit_federated_linear` would make with ``cfg``:
    trained federated with ``model.skip=fitted``, the fit's record (CV candidates included) in the card, the same
    linear-family settings as ``cfg`` (every section but ``out``, with ``model.skip`` and the residual penalty set
    aside) and the default penalty grid. None otherwise (the baseline is then fitted)."""
    from data_specs.config import RunConfig as _RunConfig

    run_cfg = getattr(card, "config", None)
    info = getattr(card, "train_info", {}) or {}
    fit = info.get("offset_fit") or {}
    if not isinstance(run_cfg, _RunConfig) or run_cfg.model.skip != "fitted" or info.get("mode") != "federated":
        return None
    if GRID is not None or "candidates" not in fit or getattr(model, "offset", None) is None:
        return None
    if _linear_settings(run_cfg) != _linear_settings(cfg):
        log.info("federated linear baseline: the run's offset was fitted with other settings; fitting the baseline")
        return None
    return model.offset.eval(), fit  # type: ignore[attr-defined]


def _reused(offset: tuple[object, dict], cfg: RunConfig) -> tuple[dict, object, list[dict], str]:
    """:func:`_fit_cv`'s answer from the run's offset (its model and fit record) instead of a second fit."""
    model, fit = offset
    rec, cands, choice = _cv_record(fit, cfg.train.linear_cv_folds)
    choice += "; the network's fitted offset (model.skip=fitted) is this fit, reused (messages: the run's ledger)"
    return rec, model, cands, choice


def _linear_settings(cfg: RunConfig) -> dict:
    """What the linear family's federated fit depends on in ``cfg``: every section, ``out`` left out, the network's
    ``model.skip`` and residual penalty set aside."""
    ov = ["model.family=linear", "model.skip=none", "train.residual_penalty=0"]
    return {k: v for k, v in cfg.with_overrides(ov).to_dict().items() if k != "out"}


def _fit_cv(data: CohortData, cfg: RunConfig, out: Path | None) -> tuple[dict, object, list[dict], str]:
    """The default fit: federated L-BFGS on every site's non-test patients at the penalty federated CV chose.
    Returns the chosen record (``weight_decay``: the penalty per patient ``c``), the model, every
    candidate's record and the choice in words."""
    from pipeline.federated.linear_sites import fit_federated_cv
    from pipeline.training.module import new_model

    c = cfg.with_overrides(["model.family=linear"])
    model = new_model(data, c)
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    grid = penalty_grid(c.train.linear_l1_ratio) if GRID is None else GRID  # a-priori grid of the federated CV
    fit = fit_federated_cv(model, data, idx, c, None if out is None else Path(out) / "privacy_ledger.jsonl", grid)
    rec, cands, choice = _cv_record(fit, c.train.linear_cv_folds)
    return rec, model.eval(), cands, choice


def _cv_record(fit: dict, k: int) -> tuple[dict, list[dict], str]:
    """The chosen record, every candidate's record and the choice in words, from a federated CV fit's record
    (:func:`~pipeline.federated.linear_sites.fit_federated_cv`; ``k``: its folds)."""
    cands = [{"weight_decay": r["penalty"], "val_cindex": r["cv_cindex"], "cv_loglik": r["cv_loglik"]}
             for r in fit["candidates"]]  # fmt: skip
    kind = fit_kind(float(fit.get("l1_ratio", 0.0)))
    mixed = ", mix and penalty chosen together" if len(fit.get("mix_candidates", ())) > 1 else ""
    choice = (
        f"{kind}, penalty {fit['penalty']:g} per patient (x {fit['n_patients']} patients) with the highest "
        f"cross-validated partial likelihood{mixed}, federated {k}-fold CV within each site's non-test patients; "
        f"fitted full batch (site gradients summed, server L-BFGS, {fit['rounds']} rounds in all), not with the run's "
        "strategy"
    )
    if fit["sites_left_out"]:
        choice += f"; sites left out (too few patients for the minimum count): {', '.join(fit['sites_left_out'])}"
    rec = {"weight_decay": fit["penalty"], "val_cindex": fit["cv_cindex"], "best_round": fit["rounds"],
           "linear_fit": {k2: v for k2, v in fit.items() if k2 != "candidates"}}  # fmt: skip
    return rec, cands, choice


def _train_candidates(data: CohortData, cfg: RunConfig, out: Path | None) -> tuple[list[dict], tuple[dict, object]]:
    """Each penalty of :data:`PENALTIES` trained federated (stopping after the first when the sites send no
    validation C-index); returns every candidate's record and the chosen ``(record, model)``."""
    from pipeline.federated.embedded import run_federated

    cands: list[dict] = []
    best: tuple[dict, object] | None = None
    for wd in PENALTIES:
        c = cfg.with_overrides(linear_overrides(cfg, wd))
        fed_out = None if out is None else Path(out) / f"weight_decay_{wd:g}" / "federated"
        model, info = run_federated(data, c, fed_out)
        rnd = int(info["best_round"])
        val = next((float(h["val_cindex"]) for h in info["history"] if h["round"] == rnd), float("nan"))
        rec = {"weight_decay": wd, "best_round": rnd, "val_cindex": val}
        if "privacy" in info:
            rec["epsilon"] = float(info["privacy"]["epsilon"])
        cands.append(rec)
        if best is None or val > best[0]["val_cindex"]:
            best = (rec, model)
        if not np.isfinite(val):  # no validation scores from the sites: nothing to choose on, keep the default
            log.warning("federated linear baseline: no validation C-index; weight decay kept at %g", wd)
            break
    assert best is not None
    return cands, best
