"""Where the gap to the oracle is on the demo: the slide representation or the genes? (centralised diagnostic)

    python scripts/oracle_gap.py DIR [DIR ...] [--folds 5] [--repeats 1] [--test] [--linear pcs composition both]

Each ``DIR`` holds a demo cohort with its tile features (``histofuse demo --out DIR``, or ``histofuse demo
--build-only`` then ``histofuse extract``) and its planted truth (``DIR/cohort/truth``). Scikit-survival
``CoxnetSurvivalAnalysis`` (l1_ratio 0.5, alpha by inner 5-fold CV, as the run's baselines) on designs that swap the
observed inputs for the planted ones, block by block:

- ``a_truth``: true tumour fraction + true programmes ``s_g`` + age (the oracle's inputs, fitted coefficients);
- ``b_tf_genes``: true tumour fraction + observed genes + clinical (the genes' share of the gap);
- ``c_pcs_s``: 10 PCs of mean tiles + true ``s_g`` + clinical (the slides' share);
- ``d_current``: 10 PCs + genes + clinical (the current design, the run's Coxnet ``all``);
- ``e_comp``: the tile-phenotype composition (K = 8 fractions, :mod:`pipeline.training.slide_clusters`, fitted on
  the fitting patients' tiles) + genes + clinical; ``f_both``: PCs and composition + genes + clinical;
  ``g_comp_s``: composition + true ``s_g`` + clinical;
- ``oracle``: the planted log hazard itself (no fit).

Scored by nested K-fold CV over the non-test patients (the outer folds of ``scripts/linear_representation.py``: every
block's PCA, clustering and standardisation and Coxnet's alpha refitted inside each outer fold), outer split repeated
with seeds ``0..R-1``. ``r2_*``: the out-of-fold R^2 of an ordinary least-squares fit of the true tumour fraction on
the 10 PCs, on the composition, on both (same folds). ``--linear``: the linear family itself
(:func:`pipeline.training.linear_fit.fit_linear_centralised`, the default config with ``model.linear_slide`` set) on
the same outer folds, the score the default's decision is made on. ``--test``: designs a-d fitted on all non-test
patients and scored on the test patients, a diagnostic only (no choice is made on it); ``--test-all``: every design
and the ``--linear`` variants too, for after a decision.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

DESIGNS = {
    "a_truth": ("tf", "s", "age"),
    "b_tf_genes": ("tf", "genes", "clin"),
    "c_pcs_s": ("pcs", "s", "clin"),
    "d_current": ("pcs", "genes", "clin"),
    "e_comp": ("comp", "genes", "clin"),
    "f_both": ("pcs", "comp", "genes", "clin"),
    "g_comp_s": ("comp", "s", "clin"),
}
K = 8  # tile phenotypes, the option's default (fixed a priori)
TEST_DESIGNS = ("a_truth", "b_tf_genes", "c_pcs_s", "d_current")  # --test: no composition on test before the decision


def truth_table(run: Path, data) -> dict[str, np.ndarray]:
    """The planted per-patient truth in ``data``'s patient order: ``tf [P]``, ``age [P]``, ``s [P, 5]``, ``log_hz``."""
    with (run / "cohort" / "truth" / "patients.csv").open() as fh:
        rows = {r["patient_id"]: r for r in csv.DictReader(fh)}
    got = [rows[p] for p in data.patient_ids]
    s_cols = [c for c in got[0] if c.startswith("s_")]
    return {
        "tf": np.array([float(r["tumour_fraction"]) for r in got]),
        "age": np.array([float(r["age"]) for r in got]),
        "s": np.array([[float(r[c]) for c in s_cols] for r in got]),
        "log_hz": np.array([float(r["oracle_log_hz"]) for r in got]),
    }


def _z(x: np.ndarray, fit: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    mu, sd = x[fit].mean(0), x[fit].std(0)
    return (x - mu) / np.where(sd > 1e-12, sd, 1.0)


def composition(data, fit: np.ndarray, k: int = K) -> np.ndarray:
    """Every patient's tile fractions ``[P, k]`` under phenotypes fitted on the tiles of ``fit`` (pooled path of
    :func:`pipeline.training.slide_clusters.prepare_slide_term` with ``slide="composition"``)."""
    from models.linear import LinearSurvival
    from pipeline.training.slide_clusters import bag_fractions, prepare_slide_term

    m = LinearSurvival(data.feature_dim, 0, 0)
    prepare_slide_term(m, data, fit, 10, "tiles", None, "composition", k)
    return bag_fractions(m, data.bags)


def blocks(data, truth: dict, fit: np.ndarray, need: set[str]) -> dict[str, np.ndarray]:
    from pipeline.outputs.baselines import modality_block

    out = {"tf": _z(truth["tf"], fit), "s": _z(truth["s"], fit), "age": _z(truth["age"], fit)}
    if "genes" in need:
        out["genes"] = modality_block(data, "omics", fit)[0]
    if "clin" in need:
        out["clin"] = modality_block(data, "clinical", fit)[0]
    if "pcs" in need:
        out["pcs"] = modality_block(data, "slides", fit, 10)[0]
    if "comp" in need:
        out["comp"] = _z(composition(data, fit), fit)
    return out


def coxnet_c(x: np.ndarray, data, fit: np.ndarray, score: np.ndarray, seed: int) -> float:
    from pipeline.outputs.baselines import fit_coxnet
    from pipeline.outputs.scoring import BaselineSettings
    from pipeline.stats.metrics import harrell_cindex

    t, e = data.time.astype(float), data.event.astype(bool)
    path, alpha, _ = fit_coxnet(x[fit], t[fit], e[fit], replace(BaselineSettings(), l1_ratio=0.5, seed=seed))
    return float(harrell_cindex(t[score], e[score], path.predict(x[score], alpha=alpha)))


LINEAR_SET: list[str] = []  # --linear-set: further overrides of the linear family's config (diagnostics)


def linear_c(data, cfg, slide: str, fit: np.ndarray, score: np.ndarray) -> float:
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.linear_fit import fit_linear_centralised
    from pipeline.training.module import new_model
    from pipeline.training.predict import predict

    c = cfg.with_overrides(["model.family=linear", f"model.linear_slide={slide}", *LINEAR_SET])
    model = new_model(data, c)
    fit_linear_centralised(model, data, fit, c)
    return float(harrell_cindex(data.time[score], data.event[score], predict(model, data, score).log_hz))


def _ols_oof(x: np.ndarray, y: np.ndarray, fit: np.ndarray, score: np.ndarray) -> np.ndarray:
    a = np.c_[np.ones(len(fit)), x[fit]]
    coef = np.linalg.lstsq(a, y[fit], rcond=None)[0]
    return np.c_[np.ones(len(score)), x[score]] @ coef


def one(run: Path, folds: int, repeats: int, test: bool, linear: list[str], test_all: bool = False) -> list[dict]:
    from sklearn.model_selection import StratifiedKFold

    from data_specs import load_cohort, resolve_config
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.data import load_run_data

    spec = run / "cohort" / "cohort.yaml"
    cfg = resolve_config(None, [], out=run).model_copy(update={"cohort": spec})
    data = load_run_data(load_cohort(spec), cfg)
    truth = truth_table(run, data)
    pool = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    need = {b for d in DESIGNS.values() for b in d}
    scores: dict[str, list[float]] = {k: [] for k in [*DESIGNS, "oracle", *(f"lin_{s}" for s in linear)]}
    oof = {k: np.zeros(len(data.time)) for k in ("pcs", "comp", "both")}
    t0 = time.perf_counter()
    for seed in range(repeats):
        outer = StratifiedKFold(folds, shuffle=True, random_state=seed).split(pool, data.event[pool])
        for a, b in outer:
            fit, score = pool[a], pool[b]
            bl = blocks(data, truth, fit, need)
            for name, parts in DESIGNS.items():
                scores[name].append(coxnet_c(np.concatenate([bl[p] for p in parts], 1), data, fit, score, seed))
            scores["oracle"].append(float(harrell_cindex(data.time[score], data.event[score], truth["log_hz"][score])))
            for s in linear:
                scores[f"lin_{s}"].append(linear_c(data, cfg, s, fit, score))
            if seed == 0 and {"pcs", "comp"} <= set(bl):
                xs = {"pcs": bl["pcs"], "comp": bl["comp"], "both": np.c_[bl["pcs"], bl["comp"]]}
                for k, x in xs.items():
                    oof[k][score] = _ols_oof(x, truth["tf"], fit, score)
    y = truth["tf"][pool]
    row: dict = {"run": run.name, "n_pool": len(pool), "repeats": repeats}
    row.update({f"cv_{k}": float(np.mean(v)) for k, v in scores.items()})
    if {"pcs", "comp"} <= need:
        row.update({f"r2_{k}": float(1 - ((v[pool] - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
                    for k, v in oof.items()})  # fmt: skip
    if test or test_all:
        te = np.asarray(data.splits["test"])
        bl = blocks(data, truth, pool, need)
        for name, parts in ((n, p) for n, p in DESIGNS.items() if n in TEST_DESIGNS or test_all):
            row[f"test_{name}"] = coxnet_c(np.concatenate([bl[p] for p in parts], 1), data, pool, te, 0)
        row["test_oracle"] = float(harrell_cindex(data.time[te], data.event[te], truth["log_hz"][te]))
        for s in linear if test_all else []:
            row[f"test_lin_{s}"] = linear_c(data, cfg, s, pool, te)
    row.update(cluster_purity(run, data, pool))
    row["seconds"] = time.perf_counter() - t0
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return [row]


def cluster_purity(run: Path, data, pool: np.ndarray) -> dict:
    """How the K phenotypes fitted on the non-test tiles split tumour from other tiles (truth/tiles.csv): the
    tile-weighted mean of each cluster's majority share, and per cluster its tumour share and its tiles' sites."""
    from models.linear import LinearSurvival
    from pipeline.training.slide_clusters import prepare_slide_term

    with (run / "cohort" / "truth" / "tiles.csv").open() as fh:
        tumour = {(r["slide_id"], int(r["x"]), int(r["y"])): r["is_tumour"] in ("1", "True", "true") for r in
                  csv.DictReader(fh)}  # fmt: skip
    m = LinearSurvival(data.feature_dim, 0, 0)
    prepare_slide_term(m, data, pool, 10, "tiles", None, "composition", K)
    import torch

    labs, tum, site = [], [], []
    for i in pool:
        if not len(data.bags[i]):
            continue
        x = torch.from_numpy(data.bags[i])[None]
        mean, comps = m.get_buffer("slide_mean").double(), m.get_buffer("slide_components").double()
        t = ((x.double() - mean) @ comps.T)[0]
        cents = m.get_buffer("slide_centroids").double()
        labs.append(torch.cdist(t, cents).argmin(1).numpy())
        tum.append([tumour.get((str(s), int(a), int(b)), np.nan) for s, a, b in data.tiles[i]])
        site.append(np.full(len(data.bags[i]), data.site[i]))
    lab, is_t, st = np.concatenate(labs), np.asarray(np.concatenate(tum), float), np.concatenate(site)
    known = np.isfinite(is_t)
    out = {"tiles_matched": float(known.mean())}
    shares = []
    for k in range(K):
        sel = (lab == k) & known
        share = float(is_t[sel].mean()) if sel.any() else float("nan")
        shares.append((int(sel.sum()), share, np.bincount(st[lab == k], minlength=len(data.sites)).tolist()))
    n = sum(s[0] for s in shares)
    out["purity"] = float(sum(c * max(sh, 1 - sh) for c, sh, _ in shares if c) / max(n, 1))
    out["clusters"] = " ".join(f"{c}:{sh:.2f}:{'/'.join(map(str, ss))}" for c, sh, ss in shares)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="outer CV repeated with seeds 0..R-1")
    ap.add_argument("--test", action="store_true", help="also the test C of designs a-d (a diagnostic, not a choice)")
    ap.add_argument("--test-all", action="store_true", help="test C of every design and --linear (after a decision)")
    ap.add_argument("--linear", nargs="*", default=[], help="linear family with these model.linear_slide values")
    ap.add_argument("--only-linear", action="store_true", help="skip the Coxnet designs (the decision's runs)")
    ap.add_argument("--linear-set", action="append", default=[], help="override for --linear (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="JSON rows")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    if args.only_linear:
        DESIGNS.clear()
    LINEAR_SET.extend(args.linear_set)
    rows = [r for run in args.runs for r in one(run, args.folds, args.repeats, args.test, args.linear, args.test_all)]
    if args.out is not None:
        from pipeline.files import write_json

        write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
