"""Why the linear family loses to Coxnet on the demo: slide representation or penalty? (centralised diagnostic)

    python scripts/linear_representation.py DIR [DIR ...] [--variants ...] [--folds 5] [--repeats 5] [--test]
    python scripts/linear_representation.py --tcga PATH/TO/tcga_brca [--seeds 42 ...] --variants lin_pc10_en ...

Each ``DIR`` holds a demo cohort with its tile features (``histofuse demo --out DIR``). On the run's own split, with
the blocks of :func:`pipeline.outputs.baselines.modality_block` (genes and clinical standardised on training
patients; slides as the mean-pooled tile features, either reduced to ``r`` principal components or every dimension
standardised), scikit-survival ``CoxnetSurvivalAnalysis`` at a given ``l1_ratio`` (alpha by inner K-fold CV, as the
run's baselines) is scored by **nested** K-fold CV over the non-test patients: in each outer fold the PCA, the
standardisation and the alpha are fitted on the other folds only and the fold's patients are scored (Harrell C);
the outer split is repeated with seeds ``0..R-1`` and the score is the mean over folds and repeats.
The variant name is ``<slides>_<penalty>``: slides ``pc<r>`` or ``all``; penalty ``en`` (l1_ratio 0.5) or
``ridge`` (l1_ratio 0.01, sksurv's Coxnet needs l1_ratio > 0). ``lin_<slides>_<penalty>[_patients][_unstrat]`` is the
linear family instead (:func:`pipeline.training.linear_fit.fit_linear_centralised`: site-stratified, penalty by its
own K-fold CV; ``ridge`` is l1_ratio 0 there, ``auto`` the mix chosen by that CV; slide PCs from tile moments, or
``_patients``: from mean-tile moments; ``_unstrat``: one stratum instead of one per site; ``_grouped<K>``: one
stratum on times grouped into ``K`` public bins (every fit patient's time replaced by its bin's index, the bins
from the fit patients' pooled site histograms of event times, :func:`pipeline.stats.curves.discrete_time_bins`,
as a federation computes them: the grouped partial likelihood a federated unstratified fit could use; scored on
the exact times); ``_relax``: the relaxed elastic net, ``train.linear_relax=auto``; ``_cidx``: the penalty and mix
chosen by the CV's out-of-fold concordance, ``train.linear_cv_criterion=cindex``, instead of its partial likelihood;
each row then also gives the inner fits' mean rounds and chosen mixes and gammas). ``--test`` also prints
each variant's test C (fitted on all non-test patients), as a final check only: choices are made on the nested CV
score. ``--tcga``: the same nested CV on TCGA-BRCA clinical (FLamby's split, :func:`pipeline.cohorts.tcga_brca.
build_cohort` with each of ``--seeds``, ``train.seed`` the same; its non-test patients only).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

PENALTIES = {"en": 0.5, "ridge": 0.01, "l1": 1.0, "en9": 0.9, "en1": 0.1}
DEFAULT_VARIANTS = ("pc10_en", "pc10_ridge", "all_en", "all_ridge")


def parse(variant: str) -> tuple[int, float | str]:
    """``pc<r>_<pen>`` or ``all_<pen>`` -> (n_pcs, 0 for every dimension; l1_ratio, or ``auto``: linear family)."""
    slides, pen = variant.removeprefix("lin_").split("_")[:2]
    r = 0 if slides == "all" else int(slides.removeprefix("pc"))
    if pen == "auto":
        if not variant.startswith("lin_"):
            raise ValueError(f"variant {variant!r}: 'auto' (the mix chosen by the CV) is the linear family's only")
        return r, "auto"
    return r, 0.0 if variant.startswith("lin_") and pen == "ridge" else PENALTIES[pen]


def linear_overrides(variant: str) -> list[str]:
    """``lin_<slides>_<pen>[_patients][_unstrat][_relax][_cidx]``: the linear family's config (slide PCs, l1_ratio,
    moment level, strata, relaxation, CV criterion)."""
    r, l1 = parse(variant)
    level = "patients" if "_patients" in variant else "tiles"
    ov = ["model.family=linear", f"model.linear_slide_pcs={r}", f"train.linear_l1_ratio={l1}",
          f"model.linear_slide_moments={level}"]  # fmt: skip
    ov += ["train.linear_relax=auto"] if "_relax" in variant else []
    ov += ["train.linear_cv_criterion=cindex"] if "_cidx" in variant else []
    return ov + (["train.stratify=false"] if "_unstrat" in variant or "_grouped" in variant else [])


def grouped_times(data, cfg, fit: np.ndarray, variant: str):
    """``data`` with every time replaced by its bin index on ``K`` public bins fitted on ``fit``
    (``_grouped<K>``; ``data`` itself without it): ties within a bin, censored patients at risk through it."""
    import re
    from dataclasses import replace as dc_replace

    from pipeline.stats.curves import discrete_time_bins

    m = re.search(r"_grouped(\d+)", variant)
    if m is None:
        return data
    k, mc = int(m.group(1)), cfg.federated.min_count
    edges = discrete_time_bins(data.time[fit], data.event[fit], data.site[fit], k, mc)
    # time in (a_{j-1}, a_j] -> j: a bin's events share its risk set, which holds everyone entering the bin
    return dc_replace(data, time=np.searchsorted(edges[1:-1], data.time, side="left").astype(np.float32))


FITS: list[dict] = []  # every linear-family fit's record of the current variant: rounds, chosen mix and gamma


def linear_fit_score(data, cfg, fit: np.ndarray, score: np.ndarray, variant: str) -> float:
    """The linear family (pooled, site-stratified, penalty by its K-fold CV on ``fit``), Harrell C on ``score``."""
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.linear_fit import fit_linear_centralised
    from pipeline.training.module import new_model
    from pipeline.training.predict import predict

    c = cfg.with_overrides(linear_overrides(variant))
    model = new_model(data, c)
    rec = fit_linear_centralised(model, grouped_times(data, c, fit, variant), fit, c)["linear_fit"]
    FITS.append({k: rec.get(k) for k in ("rounds", "l1_ratio", "relax", "penalty", "nonzero")})
    return float(harrell_cindex(data.time[score], data.event[score], predict(model, data, score).log_hz))


def design(data, train: np.ndarray, n_pcs: int) -> np.ndarray:
    """Every present modality's block (fitted on ``train``), concatenated: ``[P, k]``."""
    from pipeline.outputs.baselines import MODALITIES, modality_block

    blocks = []
    for m in MODALITIES:
        if {"slides": data.bags, "omics": data.omics, "clinical": data.clinical}[m] is not None:
            blocks.append(modality_block(data, m, train, n_pcs)[0])
    return np.concatenate(blocks, 1)


def fit_score(data, fit: np.ndarray, score: np.ndarray, n_pcs: int, l1: float, seed: int) -> float:
    """Coxnet (alpha by inner CV on ``fit``) fitted on ``fit``, Harrell C on ``score``."""
    from pipeline.outputs.baselines import fit_coxnet
    from pipeline.outputs.scoring import BaselineSettings
    from pipeline.stats.metrics import harrell_cindex

    x = design(data, fit, n_pcs)
    t, e = data.time.astype(float), data.event.astype(bool)
    path, alpha, _ = fit_coxnet(x[fit], t[fit], e[fit], replace(BaselineSettings(), l1_ratio=l1, seed=seed))
    return float(harrell_cindex(t[score], e[score], path.predict(x[score], alpha=alpha)))


def nested(data, cfg, variant: str, folds: int, seed: int) -> list[float]:
    """Outer-fold C of the whole procedure over the non-test patients (folds stratified by event)."""
    from sklearn.model_selection import StratifiedKFold

    pool = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    outer = StratifiedKFold(folds, shuffle=True, random_state=seed).split(pool, data.event[pool])
    return [score_variant(data, cfg, pool[a], pool[b], variant, seed) for a, b in outer]


def score_variant(data, cfg, fit: np.ndarray, score: np.ndarray, variant: str, seed: int) -> float:
    if variant.startswith("lin_"):
        return linear_fit_score(data, cfg, fit, score, variant)
    r, l1 = parse(variant)
    return fit_score(data, fit, score, r, float(l1), seed)


def one(run: Path, variants: list[str], folds: int, test: bool, repeats: int = 1, tcga_seed: int | None = None
        ) -> list[dict]:  # fmt: skip
    """Every variant on the demo cohort in ``run`` (or, with ``tcga_seed``, TCGA-BRCA clinical from ``run``)."""
    from data_specs import load_cohort, resolve_config
    from pipeline.training.data import load_run_data

    if tcga_seed is None:
        spec = run / "cohort" / "cohort.yaml"
        cfg = resolve_config(None, [], out=run).model_copy(update={"cohort": spec})
    else:
        import tempfile

        from pipeline.cohorts.tcga_brca import build_cohort

        tmp = Path(tempfile.mkdtemp(prefix="tcga_brca_"))
        spec = build_cohort(run, tmp / f"cohort_seed{tcga_seed}", tcga_seed)
        cfg = resolve_config(None, [f"train.seed={tcga_seed}"], out=tmp)
    data = load_run_data(load_cohort(spec), cfg)
    name = run.name if tcga_seed is None else f"tcga_brca_seed{tcga_seed}"
    pool = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    rows = []
    for v in variants:
        t0 = time.perf_counter()
        FITS.clear()
        reps = [float(np.mean(nested(data, cfg, v, folds, seed))) for seed in range(repeats)]
        row = {"run": name, "variant": v, "nested_cv_c": float(np.mean(reps)), "sd_repeats": float(np.std(reps))}
        row["repeats"] = [round(c, 3) for c in reps]
        if FITS:  # the nested CV's inner fits (one per outer fold and repeat)
            row["mean_rounds"] = float(np.mean([f["rounds"] for f in FITS]))
            row["chosen"] = sorted({(f["l1_ratio"], f["relax"]) for f in FITS})
            row["mean_nonzero"] = float(np.mean([f["nonzero"] for f in FITS]))
        if test:
            row["test_c"] = score_variant(data, cfg, pool, np.asarray(data.splits["test"]), v, 0)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="*")
    ap.add_argument("--tcga", type=Path, default=None, help="TCGA-BRCA folder (brca.csv, train_test_split.csv)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="--tcga: cohort / train seeds")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="outer CV repeated with seeds 0..R-1 (mean of means)")
    ap.add_argument("--test", action="store_true", help="also print the test C (a final check, not a choice)")
    ap.add_argument("--out", type=Path, default=None, help="JSON rows")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    rows = [r for run in args.runs for r in one(run, args.variants, args.folds, args.test, args.repeats)]
    if args.tcga is not None:
        rows += [r for s in args.seeds for r in one(args.tcga, args.variants, args.folds, args.test, args.repeats, s)]
    if args.out is not None:
        from pipeline.files import write_json

        write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
