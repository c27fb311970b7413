"""The stages, as functions the CLI (and users' scripts) call: extract, train, predict, attribute.

This module only orchestrates: it loads what a stage needs, calls the compute in ``training/`` and
``outputs/``, and writes the results through :mod:`pipeline.files`. Output folder of a run::

    config.yaml                   the resolved config
    features/<encoder>_<px>px_<mpp>mpp/<slide_id>.h5 (+ thumb, mask, extract_report.csv)
    model.safetensors             weights + config + gene panel + normalisation + cut-points
    train_summary.json            training history (federated rounds or epochs)
    risk_scores.csv               patient_id, site, split, risk, risk_group, modalities
    metrics.json, km_test.png     C-index pooled and per site; Kaplan-Meier by risk group
    attributions/                 tiles.csv, heatmaps/*.png, genes.csv, gene_ig.csv
    report.html                   one self-contained page
Cross-validation is :mod:`pipeline.crossval` (its folds train through :func:`stage_train`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_specs.artifacts import RunFiles
from data_specs.cohort import Cohort
from data_specs.config import RunConfig
from pipeline.files import write_csv, write_json, write_text
from pipeline.outputs.predictions import curves_table, risk_groups, risk_table, survival_curves
from pipeline.progress import StepLog
from pipeline.slides.extract import extract_slides
from pipeline.slides.features import features_dir
from pipeline.training.bundle import check_dims, data_for_model, load_bundle
from pipeline.training.data import CohortData, load_run_data
from pipeline.training.predict import predict
from pipeline.training.survival_summary import survival_summary

log = logging.getLogger(__name__)


def stage_extract(cohort: Cohort, cfg: RunConfig, progress: bool = True) -> Path | None:
    """Features for every slide of the cohort; returns the features folder (None if no slides)."""
    from models.encoders import build_encoder

    slides = [s for p in cohort.patients for s in p.slides]
    if not slides:
        return None
    e = cfg.extract
    enc = build_encoder(e.encoder, weights=e.weights, random_weights=e.random_weights)
    out = features_dir(cfg.out, e)
    per_slide = cohort.slide_mpp_overrides()
    res = extract_slides(slides, out, enc, e, cohort.slide_mpp, progress=progress, slide_mpps=per_slide)
    failed = [r for r in res if r.status == "failed"]
    n = sum(r.tiles for r in res)
    log.info("extracted %d slides (%d tiles) into %s; %d failed", len(res) - len(failed), n, out, len(failed))
    for r in failed:
        log.error("  %s: %s", r.slide_path, r.error)
    return out


class NoEventsError(ValueError):
    """Training refused: no site has an event among its training or validation patients."""


def check_trainable(data: CohortData, source: object) -> None:
    """Raise :class:`NoEventsError` (naming ``source``, the cohort) when no site has an event in training or
    validation: a survival model cannot learn from all-censored patients (the validation loss would be NaN)."""
    idx = np.concatenate([data.splits.get("train", np.zeros(0, int)), data.splits.get("val", np.zeros(0, int))])
    idx = idx.astype(int)
    per_site = {s: int(data.event[idx][data.site[idx] == j].sum()) for j, s in enumerate(data.sites)}
    if not any(per_site.values()):
        raise NoEventsError(
            f"{source}: no site has an event among its training or validation patients (events per site: "
            f"{per_site}); a survival model cannot be trained on all-censored patients"
        )


def stage_train(
    cohort: Cohort,
    cfg: RunConfig,
    progress: bool = True,
    data: CohortData | None = None,
    resume: bool = False,
    stage: Path | None = None,
) -> Path:
    """Train (federated across the cohort's sites, or centralised); returns ``cfg.out``'s model file.

    config, model file, summary and federated checkpoints are staged and moved over ``cfg.out``'s only on
    success (:func:`pipeline.staging.staged_run`). ``data``: the cohort built by :func:`load_run_data`.
    ``resume``: federated only, continue after the last checkpointed round. ``stage``: a staging folder
    the caller commits (``histofuse run``); the staged model file is returned. ``model.skip=auto`` is resolved
    here, once, on the run's data (:func:`pipeline.training.skip_auto.resolve_skip`): ``config.yaml`` and the model
    file hold the value used, the training summary (``model_skip``) what was asked, what was used and why.
    """
    from pipeline.staging import staged_run
    from pipeline.training.bundle import save_bundle
    from pipeline.training.module import fit_local
    from pipeline.training.skip_auto import resolve_skip

    if stage is None:
        with staged_run(cfg.out, resume) as st:
            stage_train(cohort, cfg, progress, data, resume, stage=st)
        return RunFiles(root=cfg.out).model
    data = load_run_data(cohort, cfg) if data is None else data
    check_trainable(data, cfg.cohort or "the cohort")
    cfg, skip = resolve_skip(cfg, data)
    n = {k: len(v) for k, v in data.splits.items()}
    log.info("training on %s patients (train/val/test), %d sites, modalities %s", n, len(data.sites), data.model_dims())
    rf = RunFiles(root=stage)
    write_text(rf.config, cfg.to_yaml())
    parts = None
    if cfg.federated.enabled:
        from pipeline.federated.embedded import train_federated

        run = train_federated(data, cfg, rf.federated, progress=progress, resume=resume, cohort=cohort)
        model, info, parts = run.model, {"mode": "federated", **run.info, "model_skip": skip}, run.parts
    else:
        module, info = fit_local(data, cfg, progress=progress)
        model, info = module.model.eval(), {"mode": "centralised", **info, "model_skip": skip}
    if parts is not None:  # the finish query rounds' aggregates, as a deployment's model file has them
        save_federated_bundle(rf.model, model, data, cfg, parts, info)
    else:  # centralised: grid end and horizons by the same rule, in this process
        k = cfg.federated.min_count if cfg.federated.enabled else 1
        summary = survival_summary(model, data, cohort.time_unit, k)
        save_bundle(rf.model, model, data, cfg, {"train_info": info, **summary})
    write_json(rf.train_summary, info)
    return rf.model


def save_federated_bundle(path: Path, model, data: CohortData, cfg: RunConfig, parts: dict, info: dict) -> None:
    """The model file of an embedded federated run: its card's cut-points, horizons and baseline are the finish
    query rounds' (``parts``: from the sites' aggregates, as in a deployment's model file), the rest from ``data``
    (normalisers, features identity, split digest)."""
    from data_specs.artifacts import Cutpoints
    from pipeline.training.bundle import make_card, save_model

    extra = {"horizons": parts["horizons"], **({"baseline": parts["baseline"]} if "baseline" in parts else {})}
    card = make_card(model, data, cfg, train_info=info, **extra)
    save_model(path, model, card.model_copy(update={"cutpoints": Cutpoints(**parts["cutpoints"])}))


def _model_data(
    model_path: Path, cohort: Cohort, fdir: Path | None, data: CohortData | None, trust_pickle: bool = False
):
    """``(model, card, data)``: the cohort aligned to the model, or the run's own ``data`` when given."""
    model, card = load_bundle(model_path, trust_pickle=trust_pickle)
    if data is None:
        data = data_for_model(cohort, card, fdir)
    else:
        check_dims(data, card)
    return model, card, data


def stage_predict(model_path: Path, cohort: Cohort, out: Path, fdir: Path | None, overrides: list[str] | None = None,
                  data: CohortData | None = None, trust_pickle: bool = False) -> Path:  # fmt: skip
    """``risk_scores.csv`` (see :func:`pipeline.outputs.predictions.risk_table`) and ``survival_curves.csv``
    (long form: patient_id, time, survival).

    Risk-group cut-points and the Breslow baseline come from the model (fixed on its training
    patients); ``overrides`` (``evaluate.risk_groups=tertiles``, ``evaluate.horizons=[365,730]``)
    change the model's saved settings for this prediction.
    """
    model, card, data = _model_data(model_path, cohort, fdir, data, trust_pickle)
    ev = card.config.with_overrides(overrides).evaluate
    pred = predict(model, data, np.arange(len(data.patient_ids)))
    sites = [data.sites[k] for k in data.site]
    horizons = ev.horizons if ev.horizons is not None else card.horizons
    curves = survival_curves(pred, card.baseline, sites)
    table = risk_table(data, pred.log_hz, card.cutpoints.model_dump(), ev.risk_groups, horizons, curves,
                       cohort.time_unit)  # fmt: skip
    rf = RunFiles(root=out)
    path = write_csv(rf.risk_scores, table)
    if curves is not None:
        write_csv(rf.survival_curves, curves_table(data.patient_ids, curves))
    else:
        rf.survival_curves.unlink(missing_ok=True)
        log.warning("%s: no survival baseline in the model; risk scores only (no Brier score)", model_path)
    return path


def _slide_info(cohort: Cohort, fdir: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """slide_id -> slide path (from the cohort) and -> tile side in level-0 pixels (from the features file)."""
    from pipeline.slides.features import read_attrs, slide_id_of

    paths = {slide_id_of(s): Path(s) for p in cohort.patients for s in p.slides}
    attrs = {sid: read_attrs(Path(fdir) / f"{sid}.h5") for sid in paths}
    return paths, {sid: int(a["size0"]) for sid, a in attrs.items() if a is not None}  # type: ignore[call-overload]


@dataclass
class _TileResult:
    """What the tile part of :func:`stage_attribute` hands to the biomarker part."""

    faith: dict
    paths: dict[str, Path]
    size0: dict[str, int]
    phenotypes: Any = None  # pipeline.outputs.biomarkers.Phenotypes, when fitted
    fractions: pd.DataFrame | None = None  # [patients of the split, phenotypes]


@dataclass
class _GeneResult:
    faith: dict
    ranked: pd.DataFrame
    expression: pd.DataFrame  # [patients of the split, genes], NaN where a patient has no omics


def stage_attribute(model_path: Path, cohort: Cohort, out: Path, fdir: Path | None, split: str = "test",
                    overrides: list[str] | None = None, data: CohortData | None = None,
                    trust_pickle: bool = False) -> dict[str, Path]:  # fmt: skip
    """Attributions for the patients of ``split``, written under ``out/attributions/``:

    tiles.csv (attention, integrated gradients, the linear slide term's share where the model has one, phenotype
    per tile, level-0 coordinates), heatmaps/
    (attention and IG over the thumbnail), geojson/ (QuPath), galleries/ (top/bottom tiles at full
    resolution), genes.csv (ranked, with direction), gene_ig.csv and gene_attributions.h5ad,
    phenotypes.png + phenotype_fractions.csv, biomarkers.csv (+ .json), faithfulness.json + deletion.png.
    """
    from pipeline.outputs.plots import plot_deletion
    from pipeline.outputs.writers import run_provenance

    model, card, data = _model_data(model_path, cohort, fdir, data, trust_pickle)
    cfg = card.config.with_overrides(overrides)
    ac, scheme = cfg.attribute, cfg.evaluate.risk_groups
    idx = data.splits.get(split, np.zeros(0, int))
    if len(idx) == 0:
        idx = np.arange(len(data.patient_ids))
        log.warning("no patients in split '%s': attributing all %d patients", split, len(idx))
    rf = RunFiles(root=out)
    rf.attributions.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with_tiles = data.bags is not None and fdir is not None
    pred = predict(model, data, idx, attention=with_tiles)  # one pass: risks, and tile attention when needed
    held = pd.DataFrame(
        {
            "patient_id": [data.patient_ids[i] for i in idx],
            "site": [data.sites[data.site[i]] for i in idx],
            "split": split,
            "log_hz": pred.log_hz,
            "risk_group": risk_groups(pred.log_hz, card.cutpoints.model_dump(), scheme),
            "time": data.time[idx],
            "event": data.event[idx].astype(int),
        }
    )
    faith: dict = {"split": split, "patients": len(idx)}
    tiles, genes, steps = None, None, StepLog("attribute", with_tiles * (3 + ac.phenotypes) + (data.omics is not None))
    if with_tiles:
        tiles = _attribute_tiles(model, data, idx, pred, cohort, fdir, ac, rf, written, steps)
    if data.omics is not None:
        prov = run_provenance(model_path, cfg.model_dump(), ac.ig_steps, cohort.time_unit)
        what = f"genes IG, ranks and deletion curves ({len(idx)} patients, {ac.ig_steps} steps)"
        genes = steps.run(what, _attribute_genes, model, data, idx, held, ac, rf, written, prov)
    faith.update({k: r.faith for k, r in (("tiles", tiles), ("genes", genes)) if r is not None})
    if genes is not None or (tiles is not None and tiles.fractions is not None):
        _write_biomarkers(held, tiles, genes, ac.top_genes, split, rf, written)
    if "tiles" in faith or "genes" in faith:
        written["faithfulness"] = write_json(rf.faithfulness, faith)
        plot_deletion({k: v for k, v in faith.items() if isinstance(v, dict)}, rf.deletion_png)
    return written


def _attribute_tiles(model, data, idx, pred, cohort, fdir, ac, rf: RunFiles, written: dict, steps) -> _TileResult:
    """Tile attention (from ``pred``, the split's prediction), IG and phenotypes -> tiles.csv
    (+ phenotype_fractions.csv), pictures, deletion curves; each part logged as a step of ``steps``."""
    from pipeline.outputs.attribution import (
        attention_role,
        linear_slide_term,
        mean_tile_feature,
        tile_attention,
        tile_deletion_curves,
        tile_linear_shares,
    )
    from pipeline.outputs.attribution import tile_integrated_gradients as tile_ig

    attn, lh = pred.attn or [], pred.log_hz
    tiles = tile_attention(data, idx, attn)
    tr, what = data.splits.get("train", np.zeros(0, int)), f"tiles IG ({len(idx)} patients, {ac.ig_steps} steps)"
    ig = steps.run(what, tile_ig, model, data, idx, mean_tile_feature(data, tr if len(tr) else idx), ac.ig_steps)
    tiles["ig"] = np.concatenate(ig) if ig else np.zeros(0)
    scores: dict[str, list[np.ndarray]] = {"attention": attn, "ig": ig}
    lin = linear_slide_term(model)
    if lin is not None:  # the linear slide term's exact share per tile (no IG steps, no baseline)
        scores["linear_share"] = tile_linear_shares(lin, data, idx)
        tiles["linear_share"] = np.concatenate(scores["linear_share"]) if len(idx) else np.zeros(0)
    paths, size0 = _slide_info(cohort, fdir)
    res = _TileResult({}, paths, size0)
    if ac.phenotypes:
        steps.run("tile phenotypes (Leiden)", _tile_phenotypes, data, idx, tr, tiles, ac, rf, res, written)
    written["tiles"] = write_csv(rf.tiles, tiles)
    steps.run("tile GeoJSON, heatmaps and galleries", _tile_pictures, data, idx, lh, tiles, fdir, res, ac, rf)
    ph = res.phenotypes
    if ac.phenotypes and ph is not None and all(s in paths for s, _, _ in sum(ph.examples.values(), [])):
        written["phenotype_png"] = rf.phenotypes_png
    res.faith = steps.run("tile deletion curves", tile_deletion_curves, model, data, idx, scores, ac.deletion_steps,
                          seed=ac.seed)  # fmt: skip
    res.faith["attention_role"] = attention_role(model)
    return res


def _tile_phenotypes(data, idx, tr, tiles: pd.DataFrame, ac, rf: RunFiles, res: _TileResult, written: dict) -> None:
    """Leiden phenotypes fitted on the training tiles, assigned to the split's: a column of ``tiles`` and
    ``phenotype_fractions.csv``; skipped with a warning when they cannot be fitted."""
    from pipeline.outputs.biomarkers import fit_phenotypes

    try:
        fit_on = tr if len(tr) else idx
        ph = fit_phenotypes(data.bags, data.tiles, fit_on, ac.max_phenotype_tiles, ac.leiden_resolution,
                            seed=ac.seed, assign_idx=idx)  # fmt: skip
    except ValueError as e:
        log.warning("phenotypes skipped: %s", e)
        return
    tiles["phenotype"] = np.concatenate([ph.labels[i] for i in idx]) if len(idx) else []
    res.phenotypes, res.fractions = ph, pd.DataFrame(ph.fractions[idx], columns=ph.names)
    pf = res.fractions.copy()
    pf.insert(0, "patient_id", [data.patient_ids[i] for i in idx])
    written["phenotypes"] = write_csv(rf.phenotype_fractions, pf)


def _tile_pictures(data, idx, lh, tiles: pd.DataFrame, fdir: Path, res: _TileResult, ac, rf: RunFiles) -> None:
    """QuPath GeoJSON per slide; heatmaps and galleries for the highest- and lowest-risk patients."""
    from pipeline.outputs.plots import attention_heatmap, tile_gallery
    from pipeline.outputs.writers import write_geojson

    for folder in (rf.heatmaps, rf.geojson_dir, rf.galleries):
        folder.mkdir(exist_ok=True)
    for sid, t in tiles.groupby("slide_id", sort=False):
        write_geojson(t, res.size0[sid], rf.geojson(sid))
    order = np.argsort(-lh)  # the highest- and lowest-risk patients are the most telling
    k = ac.max_heatmaps
    pick = list(dict.fromkeys([*order[: (k + 1) // 2], *order[::-1][: k // 2]]))[:k]
    for j in pick:
        for sid in dict.fromkeys(s for s, _, _ in data.tiles[idx[j]]):
            t = tiles[tiles.slide_id == sid]
            attention_heatmap(tiles, fdir, sid, rf.heatmap(sid))
            attention_heatmap(tiles, fdir, sid, rf.heatmap(sid, ig=True), column="ig")
            if sid in res.paths and len(t) >= 2:
                tile_gallery(t, res.paths[sid], res.size0[sid], rf.gallery(sid), ac.gallery_k)
                tile_gallery(t, res.paths[sid], res.size0[sid], rf.gallery(sid, ig=True), ac.gallery_k, "ig")


def _attribute_genes(model, data, idx, held: pd.DataFrame, ac, rf: RunFiles, written: dict, prov: dict) -> _GeneResult:
    """Gene IG -> gene_ig.csv, genes.csv (ranked), gene_attributions.h5ad, deletion curves."""
    from pipeline.outputs.attribution import gene_deletion_curves, gene_integrated_gradients, rank_genes
    from pipeline.outputs.writers import write_gene_attributions, write_gene_h5ad

    attr = gene_integrated_gradients(model, data, idx, ac.ig_steps)
    present = data.omics_present[idx]
    write_gene_attributions(rf.gene_ig, attr, held.patient_id.tolist(), data.genes, present)
    rank = rank_genes(attr, data.omics[idx], present, data.genes)
    written["genes"] = write_csv(rf.genes, rank)
    obs = held.assign(omics_present=present)
    norm = data.omics_norm
    logx = norm.log_expression(data.omics[idx]) if norm is not None and not norm.pathways else None
    write_gene_h5ad(rf.gene_h5ad, attr, data.omics[idx], obs, rank, data.genes, logx, prov,
                    norm.values if norm is not None else "counts")  # fmt: skip
    written["genes_h5ad"] = rf.gene_h5ad
    expression = pd.DataFrame(np.where(present[:, None], data.omics[idx], np.nan), columns=data.genes)
    faith = gene_deletion_curves(model, data, idx, attr, ac.deletion_steps, seed=ac.seed)
    return _GeneResult(faith, rank, expression)


def _write_biomarkers(held, tiles: _TileResult | None, genes: _GeneResult | None, top_genes: int, split: str,
                      rf: RunFiles, written: dict) -> None:  # fmt: skip
    """biomarkers.csv/.json (Cox tests of genes and phenotypes on the split) and phenotypes.png."""
    from pipeline.outputs.biomarkers import biomarker_table
    from pipeline.outputs.plots import phenotype_examples_png

    fractions = tiles.fractions if tiles is not None else None
    gene_x, rank = (genes.expression, genes.ranked) if genes is not None else (None, None)
    table, info = biomarker_table(held, gene_x, rank, fractions, top_genes)
    written["biomarkers"] = write_csv(rf.biomarkers, table)
    write_json(rf.biomarkers_info, {"split": split, **info})
    if "phenotype_png" in written and tiles is not None:
        kind = table[table.kind == "phenotype"]
        phenotype_examples_png(tiles.phenotypes, tiles.paths, tiles.size0, written["phenotype_png"], kind)
