"""Network variants on the demo, chosen on validation only, with the epoch kept by ``train.select``.

    python scripts/experiments_network.py RUN --jobs 2 --json RUN/experiments_network.json

``RUN`` is a folder holding ``features/`` and either ``config.yaml`` (a finished ``histofuse run`` /
``histofuse demo``) or ``cohort/cohort.yaml`` (a ``histofuse demo`` folder: the default config is used).
``--cohort`` overrides the cohort. The data are loaded once.

Validation (``--folds`` K, default 3): the run's non-test patients (train + val) are cut into 5 folds
stratified by event (seeded by ``--fold-seed``); fit k (training seed k) scores fold k. The epoch the fit
keeps (``train.select``) is chosen on an inner validation set: ``train.val_fraction`` of the other
non-test patients, stratified by event, exactly as a run chooses it on its own val split. So the fold's
C-index is not biased by that choice, and each variant is scored on K different held-out sets.
Normalisers (omics, clinical) stay those fitted on the run's training split: unsupervised statistics only,
the same for every variant.

Variants are a name and a list of config overrides, plus optional changes the config does not expose
(tile standardisation, an input LayerNorm or a mean-pooling term in the MIL, training without
validation, i.e. the last epoch). The variant with the best mean held-out C is printed; ``--choose``
names the one to test (fixed before looking at any test number). Only then is the test split touched:
the chosen variant and the default are refitted on the run's own train/val split with the ``--folds``
training seeds, and printed beside the centralised Coxnet baselines (``pipeline.outputs.baselines``) and,
for a demo cohort, the oracle (the planted log hazard) on the same test patients.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# name -> overrides, and "extra" switches the config does not have: std (per-dimension tile
# standardisation with training statistics), ln (LayerNorm on the tile features before the MIL
# embedding), meanpool (attention output + mean of the tile embeddings), noval (no validation: last epoch)
VARIANTS: dict[str, tuple[list[str], set[str]]] = {
    "default": ([], set()),
    "select_loss": (["train.select=loss"], set()),
    "select_cindex": (["train.select=cindex"], set()),
    "window5": (["train.select_window=5"], set()),
    "last_epoch": ([], {"noval"}),
    "wd1e-2": (["train.weight_decay=1e-2"], set()),
    "wd1e-1": (["train.weight_decay=1e-1"], set()),
    "wd1": (["train.weight_decay=1"], set()),
    "wd10": (["train.weight_decay=10"], set()),
    "epochs120_wd1e-1": (["train.epochs=120", "train.weight_decay=1e-1"], set()),
    "dropout0.5": (["model.dropout=0.5"], set()),
    "dropout0.1": (["model.dropout=0.1"], set()),
    "lr1e-3": (["train.lr=1e-3"], set()),
    "lr3e-4": (["train.lr=3e-4"], set()),
    "lr3e-4_wd1e-1": (["train.lr=3e-4", "train.weight_decay=1e-1"], set()),
    "hidden32": (["model.hidden=32"], set()),
    "hidden64": (["model.hidden=64"], set()),
    "hidden256": (["model.hidden=256"], set()),
    "omics_linear": (["model.omics_encoder=linear"], set()),
    "meanpool": ([], {"meanpool"}),
    "mil_mean": (["model.mil=gated_attention_mean"], set()),  # the same idea built into models.mil
    # the linear family (models.LinearSurvival) at the settings pipeline.outputs.federated_linear uses
    "linear_wd0.01": (["model.family=linear", "train.lr=0.01", "train.weight_decay=0.01"], set()),
    "linear_wd1": (["model.family=linear", "train.lr=0.01", "train.weight_decay=1"], set()),
    "linear_wd10": (["model.family=linear", "train.lr=0.01", "train.weight_decay=10"], set()),
    # round 3: the linear skip term with the network branch as a gated residual (models.skip), and SGD
    "skip": (["model.skip=linear"], set()),
    "sgd": (["train.optimizer=sgd", "train.lr=0.01"], set()),
    "skip_sgd": (["model.skip=linear", "train.optimizer=sgd", "train.lr=0.1"], set()),
    "skip_sgd_lr0.03": (["model.skip=linear", "train.optimizer=sgd", "train.lr=0.03"], set()),
    "skip_mil_mean": (["model.skip=linear", "model.mil=gated_attention_mean"], set()),
    "skip_cindex": (["model.skip=linear", "train.select=cindex"], set()),
    # the fitted linear family as a frozen offset + the gated residual (model.skip=fitted), and the offset alone
    "linear_cv": (["model.family=linear"], set()),
    "fitted": (["model.skip=fitted"], set()),
    "fitted_pen1": (["model.skip=fitted", "train.residual_penalty=1"], set()),
    "fitted_pen10": (["model.skip=fitted", "train.residual_penalty=10"], set()),
    "fitted_pen100": (["model.skip=fitted", "train.residual_penalty=100"], set()),
    "fitted_lr3e-4": (["model.skip=fitted", "train.lr=3e-4"], set()),
    # the same without validation (the last of 60 epochs kept), as a federated run at 120 patients keeps its last round
    "fitted_last": (["model.skip=fitted"], {"noval"}),
    "fitted_pen1_last": (["model.skip=fitted", "train.residual_penalty=1"], {"noval"}),
    "fitted_pen10_last": (["model.skip=fitted", "train.residual_penalty=10"], {"noval"}),
    "fitted_pen100_last": (["model.skip=fitted", "train.residual_penalty=100"], {"noval"}),
    "tile_std": ([], {"std"}),
    "tile_layernorm": ([], {"ln"}),
}
# searched unless --variants says otherwise (tile scaling was ruled out by the previous round of experiments)
SEARCH = [v for v in VARIANTS if v not in ("tile_std", "tile_layernorm")]

_DATA: Any = None  # (data, non-test index, folds): set once in the parent, inherited by forked workers


def _folds(data: Any, k: int, seed: int) -> list[np.ndarray]:
    """The non-test patients cut into ``k`` folds stratified by event (each fold: cohort indices)."""
    pool = np.concatenate([data.splits["train"], data.splits["val"]])
    return _stratified(pool, data.event, k, seed)


def _stratified(idx: np.ndarray, event: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``idx`` cut into ``k`` parts stratified by ``event`` (sorted cohort indices)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(k)]
    for ev in (True, False):
        for j, i in enumerate(rng.permutation(idx[event[idx] == ev])):
            parts[j % k].append(int(i))
    return [np.sort(np.array(f, int)) for f in parts]


def _inner_split(data: Any, idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``idx`` split into (train, val) with about ``fraction`` of each event class in val."""
    k = max(2, round(1 / fraction))
    parts = _stratified(idx, data.event, k, seed)
    return np.sort(np.concatenate(parts[1:])), parts[0]


def _standardised(data: Any, train_idx: np.ndarray) -> Any:
    """A copy of ``data`` whose tile features are standardised per dimension with training-tile statistics."""
    x = np.concatenate([data.bags[i] for i in train_idx])  # (tiles, D)
    mu, sd = x.mean(0), np.maximum(x.std(0), 1e-3)
    return dataclasses.replace(data, bags=[((b - mu) / sd).astype(np.float32) for b in data.bags])


def _patch_model(extras: set[str]):
    """A ``build_model`` for ``pipeline.training.module`` that applies the MIL switches in ``extras``."""
    import torch
    from torch import nn

    import models

    class MeanPlusAttention(nn.Module):
        """``z = attention pooling + mean of the tile embeddings`` (same width, so the fusion is unchanged)."""

        def __init__(self, mil: nn.Module):
            super().__init__()
            self.inner, self.out_dim = mil, mil.out_dim

        def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z, attn = self.inner(features, mask)
            h = self.inner.embed(features.masked_fill(~mask.unsqueeze(-1), 0.0))  # (B, N, H)
            m = mask.unsqueeze(-1).float()
            return z + (h * m).sum(1) / m.sum(1).clamp_min(1.0), attn

    def build(feature_dim: int, n_genes: int, n_clinical: int, **kw: Any):
        model = models.build_model(feature_dim, n_genes, n_clinical, **kw)
        if getattr(model, "mil", None) is not None and "ln" in extras:
            model.mil.embed = nn.Sequential(nn.LayerNorm(feature_dim), *model.mil.embed)
        if getattr(model, "mil", None) is not None and "meanpool" in extras:
            model.mil = MeanPlusAttention(model.mil)
        return model

    return build


def fit_one(name: str, seed: int, fold: int | None) -> dict[str, Any]:
    """Fit variant ``name`` with training seed ``seed``. ``fold``: score that fold, the epoch chosen on an inner
    validation split of the other non-test patients; None: the run's own train/val split, scored on test."""
    import torch

    import pipeline.training.module as module_mod
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.predict import predict

    torch.set_num_threads(1)
    data, pool, folds, base, federated = _DATA
    overrides, extras = VARIANTS[name]
    cfg = base.with_overrides([*overrides, f"train.seed={seed}"])
    if fold is None:
        tr, va, scored = data.splits["train"], data.splits["val"], data.splits["test"]
    else:
        scored = folds[fold]
        tr, va = _inner_split(data, np.setdiff1d(pool, scored), cfg.train.val_fraction, 100 + seed)
    d = _standardised(data, tr) if "std" in extras else data
    module_mod.build_model = _patch_model(extras)
    t0 = time.perf_counter()
    if federated and fold is None:  # the run's own federation (sites, strategy, rounds) on its split
        from pipeline.federated.embedded import run_federated

        cfg = cfg.with_overrides(["federated.enabled=true"])
        model, info = run_federated(d, cfg)
        module = module_mod.new_module(model, cfg)
        info = {**info, "best_epoch": info.get("best_round"), "val_history": info.get("history", [])}
    else:
        module, info = module_mod.fit_local(d, cfg, tr, np.array([], int) if "noval" in extras else va)
        model = module.model.eval()
    row = {"variant": name, "seed": seed, "fold": fold, "train_s": round(time.perf_counter() - t0, 1)}
    with torch.no_grad():
        lh = predict(model, d, scored).log_hz
        row["cindex"] = float(harrell_cindex(d.time[scored], d.event[scored], lh))
        batch = {"event": torch.from_numpy(d.event[scored]), "time": torch.from_numpy(d.time[scored])}
        batch["site"] = torch.from_numpy(d.site[scored])
        row["loss"] = float(module.loss(batch, torch.from_numpy(lh)))
        row["log_hz"] = [float(x) for x in lh]
    row.update(best_epoch=info.get("best_epoch"), inner_val_cindex=info.get("best_val_cindex"),
               history=info.get("val_history", []))  # fmt: skip
    return row


def _run(jobs: int, tasks: list[tuple[str, int, int | None]], log: Path | None = None) -> list[dict[str, Any]]:
    """Every task's row (in task order); with ``log``, each row is appended to it as JSON when it finishes."""
    import json

    def done(row: dict[str, Any]) -> dict[str, Any]:
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps({k: v for k, v in row.items() if k not in ("history", "log_hz")}) + "\n")
        return row

    if jobs <= 1:
        return [done(fit_or_nan(*t)) for t in tasks]
    with mp.get_context("fork").Pool(jobs) as pool:
        rows = [done(r) for r in pool.imap_unordered(_fit_star, tasks)]
    order = {t: i for i, t in enumerate(tasks)}
    return sorted(rows, key=lambda r: order[(r["variant"], r["seed"], r["fold"])])


def _fit_star(task: tuple[str, int, int | None]) -> dict[str, Any]:
    return fit_or_nan(*task)


def fit_or_nan(name: str, seed: int, fold: int | None) -> dict[str, Any]:
    """:func:`fit_one`, or a row with NaN scores when the fit diverges (NaN log hazards: torchsurv refuses them)."""
    try:
        return fit_one(name, seed, fold)
    except ValueError as e:
        if "NaN" not in str(e):
            raise
        nan = float("nan")
        logging.getLogger(__name__).error("%s seed %d fold %s diverged (NaN log hazards)", name, seed, fold)
        return {"variant": name, "seed": seed, "fold": fold, "train_s": nan, "cindex": nan, "loss": nan,
                "best_epoch": -1, "inner_val_cindex": nan, "history": [], "log_hz": []}  # fmt: skip


def _summary(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    v = np.array([r[key] for r in rows], float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _base_config(run: Path, cohort: Path | None) -> Any:
    """The run's config (centralised), or the default config on ``run/cohort/cohort.yaml`` for a demo folder."""
    from data_specs import resolve_config

    ov = ["federated.enabled=false"]
    if (run / "config.yaml").is_file():
        base = resolve_config(run / "config.yaml", ov, out=run)
    else:
        base = resolve_config(None, ov, out=run, cohort=run / "cohort" / "cohort.yaml")
    return base.model_copy(update={"cohort": cohort}) if cohort is not None else base


def _validation_table(rows: list[dict[str, Any]], variants: list[str]) -> dict[str, float]:
    """Print held-out C (mean, sd), the paired difference from the default (same fold, same seed), loss,
    kept epoch; returns each variant's mean held-out C."""
    ref = {r["fold"]: r["cindex"] for r in rows if r["variant"] == "default"}
    head = ("C mean", "sd", "-default", "sd", "loss", "epoch", "fit s")
    print(f"{'variant':18s} " + " ".join(f"{h:>8s}" for h in head))
    means = {}
    for v in variants:
        rv = [r for r in rows if r["variant"] == v]
        (c, cs), (lo, _) = _summary(rv, "cindex"), _summary(rv, "loss")
        d = np.array([r["cindex"] - ref[r["fold"]] for r in rv if r["fold"] in ref])
        dm, ds = (d.mean(), d.std(ddof=1)) if len(d) > 1 else (float("nan"), float("nan"))
        means[v] = c
        ep = np.mean([np.nan if r["best_epoch"] is None else r["best_epoch"] for r in rv])  # None: a full-batch fit
        fs = np.mean([r["train_s"] for r in rv])
        print(f"{v:18s} {c:8.3f} {cs:8.3f} {dm:+8.3f} {ds:8.3f} {lo:8.3f} {ep:8.1f} {fs:8.0f}")
    return means


def _test_table(data: Any, test: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Test C per variant (mean, sd over seeds; the seed ensemble = mean log_hz), Coxnet baselines, oracle."""
    from pipeline.outputs.baselines import fit_baselines
    from pipeline.stats.metrics import harrell_cindex

    te = data.splits["test"]
    t, e = data.time[te], data.event[te]
    out: dict[str, Any] = {}
    for v in names:
        rv = [r for r in test if r["variant"] == v]
        c, cs = _summary(rv, "cindex")
        ens = harrell_cindex(t, e, np.mean([r["log_hz"] for r in rv], axis=0))
        lo, _ = _summary(rv, "loss")
        out[v] = {"cindex": c, "sd": cs, "per_seed": [r["cindex"] for r in rv], "ensemble": ens, "loss": lo}
        seeds = ", ".join(f"{x:.3f}" for x in out[v]["per_seed"])
        print(f"{v:18s} test C {c:.3f} +- {cs:.3f} ({seeds}); seed ensemble {ens:.3f}; test Cox loss {lo:.3f}")
    bl = fit_baselines(data)
    out["coxnet"] = {k: b["cindex"] for k, b in bl["baselines"].items()}
    out["coxnet_best_by_cv"] = bl.get("best")
    print(
        "Coxnet (centralised, alpha by CV on train+val): " + ", ".join(f"{k} {c:.3f}" for k, c in out["coxnet"].items())
    )
    truth = Path(str(_DATA[3].cohort)).parent / "truth" / "patients.csv"
    if truth.is_file():
        import pandas as pd

        o = pd.read_csv(truth).set_index("patient_id")["oracle_log_hz"]
        oracle = o.reindex([data.patient_ids[i] for i in te]).to_numpy(float)
        out["oracle"] = harrell_cindex(t, e, oracle)
        print(f"oracle (planted log hazard) on the same {len(te)} test patients: {out['oracle']:.3f}")
    return out


def main() -> None:
    global _DATA
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder (config.yaml or cohort/cohort.yaml, and features/)")
    ap.add_argument("--cohort", type=Path, help="cohort.yaml (default: the one the run's config names)")
    ap.add_argument("--variants", nargs="+", default=SEARCH, choices=list(VARIANTS))
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides under every variant's own")
    ap.add_argument("--folds", type=int, default=3, help="validation folds = training seeds per variant (<= 5)")
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--start-fold", type=int, default=0, help="validation: score folds start..folds-1 only")
    ap.add_argument("--choose", choices=list(VARIANTS), help="the variant to test (default: best mean held-out C)")
    ap.add_argument("--no-test", action="store_true", help="validation table only; never touch the test split")
    ap.add_argument("--also-test", nargs="+", choices=list(VARIANTS), help="further variants in the test table")
    ap.add_argument("--test-only", action="store_true", help="skip the validation fits (needs --choose)")
    ap.add_argument("--federated", action="store_true", help="test phase: train federated (the run's config)")
    ap.add_argument("--jobs", type=int, default=1, help="fits in parallel (forked processes, 1 thread each)")
    ap.add_argument("--json", type=Path, help="write every fit's numbers here")
    ap.add_argument("--log", type=Path, help="append each fit's row here (JSON lines) as it finishes")
    args = ap.parse_args()
    if not 1 <= args.folds <= 5:
        ap.error(f"--folds must be 1..5, got {args.folds}")
    if args.test_only and not args.choose:
        ap.error("--test-only needs --choose")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)

    from data_specs import load_cohort
    from pipeline.files import write_json
    from pipeline.training.data import load_run_data

    base = _base_config(args.run, args.cohort).with_overrides(args.set)
    data = load_run_data(load_cohort(base.cohort), base)
    pool = np.concatenate([data.splits["train"], data.splits["val"]])
    folds = _folds(data, 5, args.fold_seed)
    _DATA = (data, pool, folds, base, args.federated)
    print(f"{len(data.patient_ids)} patients; non-test {len(pool)} in 5 folds of ~{len(folds[0])}; {args.folds} used")
    out: dict[str, Any] = {}
    means: dict[str, float] = {}
    if not args.test_only:
        t0 = time.perf_counter()
        rows = _run(args.jobs, [(v, k, k) for k in range(args.start_fold, args.folds) for v in args.variants], args.log)
        print(f"validation fits: {len(rows)} in {time.perf_counter() - t0:.0f} s")
        means = _validation_table(rows, args.variants)
        out["validation"] = rows
    if not args.no_test:
        chosen = args.choose or max(means, key=means.__getitem__)
        print(f"chosen on validation: {chosen}; now, and only now, the test split (run's own train/val split)")
        names = list(dict.fromkeys(["default", chosen, *(args.also_test or [])]))
        test = _run(args.jobs, [(v, k, None) for k in range(args.folds) for v in names], args.log)
        out.update(test=test, chosen=chosen, test_summary=_test_table(data, test, names))
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
