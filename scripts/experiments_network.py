"""Why does the network lose to a linear Cox on the demo? Centralised variants, chosen on validation only.

    python scripts/experiments_network.py RUN --jobs 2 --json RUN/experiments_network.json

``RUN`` is the folder of a finished ``histofuse demo`` / ``histofuse run`` (its ``config.yaml``, its
``features/`` and the cohort the config names; ``--cohort`` overrides it). The data are loaded once.

Validation (``--folds`` K, default 3): the run's non-test patients (train + val) are cut into 5 folds
stratified by event (seeded by ``--fold-seed``); fold k is the validation set of the k-th fit, which
also uses training seed k, so each variant is scored on K different validation sets (e.g. 54 distinct
patients for K = 3 of 90) instead of one noisy 18-patient set. Each fit keeps the epoch of lowest
validation loss (as ``histofuse run`` does), except variants that ask for a fixed number of epochs.
Normalisers (omics, clinical) stay those fitted on the run's training split: unsupervised statistics
only, the same for every variant.

Variants are a name and a list of config overrides, plus optional changes the config does not expose
(tile standardisation with training statistics, an input LayerNorm or a mean-pooling term in the MIL,
training without early stopping). The variant with the best mean validation C is chosen, unless
``--choose`` names one (chosen before looking at any test number); only then is the test split
touched: the chosen variant and the default are refitted on the run's own train/val split with the
``--folds`` training seeds and their test C-index printed. The test patients take no part before that.
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
# embedding), meanpool (attention output + mean of the tile embeddings), noes (no early stopping)
VARIANTS: dict[str, tuple[list[str], set[str]]] = {
    "default": ([], set()),
    "tile_std": ([], {"std"}),
    "tile_layernorm": ([], {"ln"}),
    "hidden64": (["model.hidden=64"], set()),
    "hidden256": (["model.hidden=256"], set()),
    "dropout0.5": (["model.dropout=0.5"], set()),
    "dropout0.1": (["model.dropout=0.1"], set()),
    "wd1e-2": (["train.weight_decay=1e-2"], set()),
    "wd1e-1": (["train.weight_decay=1e-1"], set()),
    "lr1e-3": (["train.lr=1e-3"], set()),
    "lr3e-4": (["train.lr=3e-4"], set()),
    "epochs30_noES": (["train.epochs=30"], {"noes"}),
    "epochs60_noES": ([], {"noes"}),
    "epochs120": (["train.epochs=120"], set()),
    "omics_linear": (["model.omics_encoder=linear"], set()),
    "meanpool": ([], {"meanpool"}),
}

_DATA: Any = None  # (data, non-test index, folds): set once in the parent, inherited by forked workers


def _folds(data: Any, k: int, seed: int) -> list[np.ndarray]:
    """The non-test patients cut into ``k`` folds stratified by event (each fold: cohort indices)."""
    pool = np.concatenate([data.splits["train"], data.splits["val"]])
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for ev in (True, False):
        idx = rng.permutation(pool[data.event[pool] == ev])
        for j, i in enumerate(idx):
            folds[j % k].append(int(i))
    return [np.sort(np.array(f)) for f in folds]


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
        if model.mil is not None and "ln" in extras:
            model.mil.embed = nn.Sequential(nn.LayerNorm(feature_dim), *model.mil.embed)
        if model.mil is not None and "meanpool" in extras:
            model.mil = MeanPlusAttention(model.mil)
        return model

    return build


def fit_one(name: str, seed: int, fold: int | None) -> dict[str, Any]:
    """Fit variant ``name`` with training seed ``seed``; validate on fold ``fold`` (None: the run's val split,
    and the test split is scored too)."""
    import torch

    import pipeline.training.module as module_mod
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.predict import predict

    torch.set_num_threads(1)
    data, pool, folds, base = _DATA
    overrides, extras = VARIANTS[name]
    cfg = base.with_overrides([*overrides, f"train.seed={seed}"])
    if fold is None:
        tr, va = data.splits["train"], data.splits["val"]
    else:
        va = folds[fold]
        tr = np.setdiff1d(pool, va)
    d = _standardised(data, tr) if "std" in extras else data
    module_mod.build_model = _patch_model(extras)
    t0 = time.perf_counter()
    module, info = module_mod.fit_local(d, cfg, tr, np.array([], int) if "noes" in extras else va)
    model = module.model.eval()
    row = {"variant": name, "seed": seed, "fold": fold, "train_s": round(time.perf_counter() - t0, 1)}
    with torch.no_grad():
        lh = predict(model, d, va).log_hz
        row["val_cindex"] = float(harrell_cindex(d.time[va], d.event[va], lh))
        batch = {"event": torch.from_numpy(d.event[va]), "time": torch.from_numpy(d.time[va])}
        batch["site"] = torch.from_numpy(d.site[va])
        row["val_loss"] = float(module.loss(batch, torch.from_numpy(lh)))
        if fold is None:
            te = d.splits["test"]
            row["test_cindex"] = float(harrell_cindex(d.time[te], d.event[te], predict(model, d, te).log_hz))
    row["best_epoch"] = info["best_epoch"]
    return row


def _run(jobs: int, tasks: list[tuple[str, int, int | None]]) -> list[dict[str, Any]]:
    if jobs <= 1:
        return [fit_one(*t) for t in tasks]
    with mp.get_context("fork").Pool(jobs) as pool:
        return pool.starmap(fit_one, tasks)


def _summary(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    v = np.array([r[key] for r in rows], float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def main() -> None:
    global _DATA
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run folder (config.yaml, features/)")
    ap.add_argument("--cohort", type=Path, help="cohort.yaml (default: the one the run's config names)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--folds", type=int, default=3, help="validation folds = training seeds per variant (<= 5)")
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--choose", choices=list(VARIANTS), help="the variant to test (default: best mean val C)")
    ap.add_argument("--no-test", action="store_true", help="validation table only; never touch the test split")
    ap.add_argument("--jobs", type=int, default=1, help="fits in parallel (forked processes, 1 thread each)")
    ap.add_argument("--json", type=Path, help="write every fit's numbers here")
    args = ap.parse_args()
    if not 1 <= args.folds <= 5:
        ap.error(f"--folds must be 1..5, got {args.folds}")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)

    from data_specs import load_cohort, resolve_config
    from pipeline.files import write_json
    from pipeline.training.data import load_run_data

    base = resolve_config(args.run / "config.yaml", ["federated.enabled=false"], out=args.run)
    cohort_path = args.cohort or base.cohort
    if cohort_path is None:
        ap.error("the run's config names no cohort: pass --cohort")
    data = load_run_data(load_cohort(cohort_path), base)
    pool = np.concatenate([data.splits["train"], data.splits["val"]])
    folds = _folds(data, 5, args.fold_seed)
    _DATA = (data, pool, folds, base)
    print(f"{len(data.patient_ids)} patients; non-test {len(pool)} in 5 folds of ~{len(folds[0])}; {args.folds} used")

    t0 = time.perf_counter()
    rows = _run(args.jobs, [(v, k, k) for v in args.variants for k in range(args.folds)])
    print(f"validation fits: {len(rows)} in {time.perf_counter() - t0:.0f} s")
    print(f"{'variant':16s} {'val C mean':>10s} {'sd':>6s} {'val loss':>9s} {'sd':>6s} {'epoch':>6s} {'fit s':>6s}")
    means = {}
    for v in args.variants:
        rv = [r for r in rows if r["variant"] == v]
        (c, cs), (lo, ls) = _summary(rv, "val_cindex"), _summary(rv, "val_loss")
        means[v] = c
        ep = np.mean([r["best_epoch"] for r in rv])
        print(f"{v:16s} {c:10.3f} {cs:6.3f} {lo:9.3f} {ls:6.3f} {ep:6.0f} {np.mean([r['train_s'] for r in rv]):6.0f}")
    out: dict[str, Any] = {"validation": rows}
    if not args.no_test:
        chosen = args.choose or max(means, key=means.__getitem__)
        print(f"chosen on validation: {chosen}; now, and only now, the test split (run's own train/val split)")
        names = [chosen] if chosen == "default" else ["default", chosen]
        test = _run(args.jobs, [(v, k, None) for v in names for k in range(args.folds)])
        for v in names:
            c, cs = _summary([r for r in test if r["variant"] == v], "test_cindex")
            print(f"{v:16s} test C {c:.3f} +- {cs:.3f} over {args.folds} training seeds")
        out["test"] = test
        out["chosen"] = chosen
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
