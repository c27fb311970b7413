"""Cross-validation: K folds by patient, or one fold per site (leave-site-out: does the model transfer to a new
hospital?), repeated over seeds; every fold scored beside the centralised Coxnet baselines and, on request,
retrained without each modality.

Orchestration only (the CLI's ``histofuse cv``): folds from :mod:`pipeline.training.splits`, training through
:func:`pipeline.stages.stage_train`, scores from :mod:`pipeline.outputs.cv` and
:mod:`pipeline.outputs.baselines`, every file written through :mod:`pipeline.files`. Output folder::

    config.yaml          the resolved config
    cv_summary.json      every metric's mean +- sd over seeds; per fold (per held-out site) C-index
    folds.csv, fold_<f>/ (each fold's model; without_<m>/ with the ablation), cv_risk_scores.csv,
    cv_results.json      one seed's cross-validation: in the folder itself for one seed, in seed-<k>/ for several

Everything is staged and replaces a previous cross-validation's files only when every fold of every seed
succeeded (:func:`pipeline.staging.staged_run`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_specs.artifacts import RunFiles
from data_specs.cohort import Cohort
from data_specs.config import RunConfig
from pipeline.files import write_csv, write_json, write_text
from pipeline.slides.features import features_dir
from pipeline.training.data import Bags, CohortData, build_data, load_bags
from pipeline.training.splits import assign_folds, fold_splits, site_folds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CVPlan:
    """What a cross-validation does besides training the folds.

    Attributes:
        k: folds by patient (ignored with ``leave_site_out``: one fold per site).
        leave_site_out: each site in turn is the test set; the other sites train and validate.
        seeds: repeat with seeds ``0..seeds-1`` (``train.seed`` and the fold / validation seed); 1: ``train.seed``.
        modality_ablation: also retrain each fold without each modality.
        baselines: score the centralised Coxnet baselines on each fold's split.
    """

    k: int = 5
    leave_site_out: bool = False
    seeds: int = 1
    modality_ablation: bool = False
    baselines: bool = True


@dataclass(frozen=True)
class CVResult:
    """``runs``: each seed's ``cv_results.json`` content; ``summary``: ``cv_summary.json``'s."""

    runs: list[dict]
    summary: dict


@dataclass(frozen=True)
class _Inputs:
    """What every fold of every seed shares: the cohort, its tile features (read once), the final run folder."""

    cohort: Cohort
    fdir: Path | None
    bags: Bags | None
    out: Path
    plan: CVPlan
    progress: bool


def run_cv(cohort: Cohort, cfg: RunConfig, plan: CVPlan | None = None, progress: bool = False) -> CVResult:
    """Cross-validate ``cfg``'s model on ``cohort`` as ``plan`` says; see the module docstring for the files.

    For fold ``f`` (:func:`pipeline.training.splits.fold_splits`): test = the fold's patients (a whole site with
    ``leave_site_out``), validation carved (seeded) from the rest per (site, event) stratum, normalisers refitted
    on the fold's training patients. Each fold trains through :func:`~pipeline.stages.stage_train` (centralised
    by default; federated with ``federated.enabled``, the held-out site then is not a federated site). The
    cohort's own ``split`` column and ``train.test_sites`` are ignored: every patient is tested once.
    """
    from pipeline.outputs.cv import summarise_seeds
    from pipeline.staging import staged_run

    plan = plan or CVPlan()
    if plan.seeds < 1:
        raise ValueError(f"--seeds {plan.seeds}: must be >= 1")
    if plan.leave_site_out:
        site_folds(cohort)  # refuses a one-site cohort before anything is written
    if any(p.split for p in cohort.patients) or cfg.train.test_sites:
        log.info(
            "cross-validation ignores the cohort's split column and train.test_sites: every patient is tested once"
        )
    fdir = features_dir(cfg.out, cfg.extract) if any(p.slides for p in cohort.patients) else None
    bags = load_bags(cohort, fdir) if fdir is not None else None  # read once, shared by every fold and seed
    inputs = _Inputs(cohort, fdir, bags, Path(cfg.out), plan, progress)
    seeds = [cfg.train.seed] if plan.seeds == 1 else list(range(plan.seeds))
    with staged_run(inputs.out) as stage:
        rf = RunFiles(root=stage)
        write_text(rf.config, cfg.to_yaml())
        runs = []
        for s in seeds:
            scfg = cfg.with_overrides([f"train.seed={s}"])
            where = (
                (rf, RunFiles(root=inputs.out)) if plan.seeds == 1 else (rf.seed(s), RunFiles(root=inputs.out).seed(s))
            )
            runs.append(_one_seed(inputs, scfg, *where))
        summary = summarise_seeds(runs)
        write_json(rf.cv_summary, summary)
    return CVResult(runs, summary)


def _one_seed(inputs: _Inputs, cfg: RunConfig, rf: RunFiles, final: RunFiles) -> dict:
    """Every fold for ``cfg.train.seed``, written under ``rf`` (staged; ``final`` is where it will live)."""
    from pipeline.outputs.cv import folds_table, summarise

    cohort, plan, seed = inputs.cohort, inputs.plan, cfg.train.seed
    folds = site_folds(cohort) if plan.leave_site_out else assign_folds(cohort, plan.k, seed)
    k = int(folds.max()) + 1
    write_csv(rf.folds, folds_table(cohort, folds))
    oof = np.full(len(cohort.patients), np.nan)
    rows = []
    for f in range(k):
        row, test, lh = _one_fold(inputs, cfg, folds, f, rf.fold(f).root, final.fold(f).root)
        oof[test] = lh
        rows.append(row)
        held = f"site {row['site']} held out" if "site" in row else f"{row['n_test']} patients"
        log.info("seed %d fold %d/%d (%s): test C-index %.3f (n=%d, events=%d)", seed, f + 1, k, held, row["cindex"],
                 row["n_test"], row["test_events"])  # fmt: skip
    mode = "federated" if cfg.federated.enabled else "centralised"
    res = summarise(rows, k, seed, mode, "site" if plan.leave_site_out else "patient")
    write_csv(rf.cv_risk_scores, folds_table(cohort, folds, oof))
    write_json(rf.cv_results, res)
    return res


def _one_fold(
    inputs: _Inputs, cfg: RunConfig, folds: np.ndarray, f: int, stage: Path, final: Path
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Train fold ``f`` into ``stage``; returns its ``cv_results.json`` row, test indices and test ``log_hz``."""
    from pipeline.outputs.cv import score_fold

    cohort, t, o, ev = inputs.cohort, cfg.train, cfg.omics, cfg.evaluate
    splits = fold_splits(cohort, folds, f, t.val_fraction, t.seed)
    data = build_data(cohort, inputs.fdir, splits=splits, seed=t.seed, gene_panel=o.gene_panel, max_genes=o.max_genes,
                      gene_sets=o.gene_sets, min_pathway_genes=o.min_pathway_genes, bags=inputs.bags)  # fmt: skip
    lh = _train_predict(cohort, cfg, data, stage, final, inputs.progress)
    row = score_fold(f, data, splits, lh, ev.bootstrap, ev.seed)
    if inputs.plan.leave_site_out:
        row = {"fold": f, "site": cohort.sites[f], **{k: v for k, v in row.items() if k != "fold"}}
    if inputs.plan.baselines:
        row["baselines"] = _fold_baselines(data, lh, cfg)
    if inputs.plan.modality_ablation:
        row["retrained_without"] = _ablation(inputs, cfg, data, row["cindex"], stage, final)
    return row, splits["test"], lh


def _train_predict(
    cohort: Cohort, cfg: RunConfig, data: CohortData, stage: Path, final: Path, progress: bool
) -> np.ndarray:
    """Train on ``data``'s train/val split into ``stage`` (the config naming ``final``); test ``log_hz``."""
    from pipeline.stages import stage_train
    from pipeline.training.bundle import load_bundle
    from pipeline.training.predict import predict

    fcfg = cfg.model_copy(update={"out": final})
    model, _ = load_bundle(stage_train(cohort, fcfg, progress, data, stage=stage))
    return predict(model, data, data.splits["test"]).log_hz


def _fold_baselines(data: CohortData, lh: np.ndarray, cfg: RunConfig) -> dict:
    """The centralised Coxnet baselines on the fold's split (fitted on its train+val patients), in brief."""
    from pipeline.outputs.baselines import BaselineSettings, fit_baselines
    from pipeline.outputs.cv import baseline_row

    s = BaselineSettings(n_boot=cfg.evaluate.bootstrap, seed=cfg.evaluate.seed)
    try:
        bl = fit_baselines(data, lh, s)
    except ValueError as e:  # too few events or patients in this fold: say so, keep the fold
        log.warning("fold baselines not fitted: %s", e)
        return {"label": "centralised", "cindex": {}, "notes": {"all": str(e)}}
    assert isinstance(bl, dict)
    return baseline_row(bl)


def _ablation(inputs: _Inputs, cfg: RunConfig, data: CohortData, full: float, stage: Path, final: Path) -> dict:
    """The fold retrained without each modality (``without_<m>/``): its test C-index and the drop from ``full``."""
    from pipeline.outputs.cv import without_modality
    from pipeline.stats.metrics import harrell_cindex

    present = [
        m for m, x in (("slides", data.bags), ("omics", data.omics), ("clinical", data.clinical)) if x is not None
    ]
    if len(present) < 2:
        return {}  # one modality: nothing is left to train on without it
    te = data.splits["test"]
    out = {}
    for m in present:
        sub = f"without_{m}"
        lh = _train_predict(inputs.cohort, cfg, without_modality(data, m), stage / sub, final / sub, inputs.progress)
        c = harrell_cindex(data.time[te], data.event[te], lh)
        out[m] = {"cindex": c, "drop": full - c}
    return out
