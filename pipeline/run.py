"""The stages, as functions the CLI (and users' scripts) call: extract, train, predict, evaluate, attribute.

Output folder of a run::

    config.yaml                   the resolved config
    features/<encoder>_<px>px_<mpp>mpp/<slide_id>.h5 (+ thumb, mask, extract_report.csv)
    model.pt                      weights + config + gene panel + normalisation + cut-points
    train_summary.json            training history (federated rounds or epochs)
    risk_scores.csv               patient_id, site, split, risk, risk_group, modalities
    metrics.json, km_test.png     C-index pooled and per site; Kaplan-Meier by risk group
    attributions/                 tiles.csv, heatmaps/*.png, genes.csv, gene_ig.csv
    report.html                   one self-contained page
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from data_specs.cohort import Cohort
from data_specs.config import RunConfig
from pipeline.data import CohortData, build_data
from pipeline.extract import extract_slides, features_dir

log = logging.getLogger(__name__)


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    tmp.replace(path)


def stage_extract(cohort: Cohort, cfg: RunConfig, progress: bool = True) -> Path | None:
    """Features for every slide of the cohort; returns the features folder (None if no slides)."""
    from models.encoders import build_encoder

    slides = [s for p in cohort.patients for s in p.slides]
    if not slides:
        return None
    e = cfg.extract
    enc = build_encoder(e.encoder, weights=e.weights, random_weights=e.random_weights)
    out = features_dir(cfg.out, e)
    res = extract_slides(slides, out, enc, e, cohort.slide_mpp, progress=progress)
    failed = [r for r in res if r.status == "failed"]
    n = sum(r.tiles for r in res)
    log.info("extracted %d slides (%d tiles) into %s; %d failed", len(res) - len(failed), n, out, len(failed))
    for r in failed:
        log.error("  %s: %s", r.slide_path, r.error)
    return out


def load_run_data(cohort: Cohort, cfg: RunConfig) -> CohortData:
    fdir = features_dir(cfg.out, cfg.extract) if any(p.slides for p in cohort.patients) else None
    t = cfg.train
    return build_data(
        cohort,
        fdir,
        seed=t.seed,
        val_fraction=t.val_fraction,
        test_fraction=t.test_fraction,
        gene_panel=cfg.omics.gene_panel,
        max_genes=cfg.omics.max_genes,
        gene_sets=cfg.omics.gene_sets,
        min_pathway_genes=cfg.omics.min_pathway_genes,
    )


def stage_train(cohort: Cohort, cfg: RunConfig, progress: bool = True) -> Path:
    """Train (federated across the cohort's sites, or centralised) and save ``model.pt``."""
    from pipeline.train import fit_local, save_bundle

    data = load_run_data(cohort, cfg)
    n = {k: len(v) for k, v in data.splits.items()}
    log.info("training on %s patients (train/val/test), %d sites, modalities %s", n, len(data.sites), data.model_dims())
    if cfg.federated.enabled:
        from pipeline.federated import run_federated

        model, info = run_federated(data, cfg, cfg.out / "federated", progress=progress)
        info = {"mode": "federated", **info}
    else:
        module, info = fit_local(data, cfg, progress=progress)
        model, info = module.model.eval(), {"mode": "centralised", **info}
    splits = {data.patient_ids[i]: s for s, idx in data.splits.items() for i in idx}
    path = cfg.out / "model.pt"
    save_bundle(path, model, data, cfg, {"train_info": info, "splits": splits})
    _write_json(cfg.out / "train_summary.json", info)
    return path


def _modalities(data: CohortData, i: int) -> str:
    m = []
    if data.bags is not None and len(data.bags[i]):
        m.append("slides")
    if data.omics_present is not None and data.omics_present[i]:
        m.append("omics")
    if data.clinical_present is not None and data.clinical_present[i]:
        m.append("clinical")
    return "+".join(m)


def data_for_model(cohort: Cohort, bundle: dict, fdir: Path | None) -> CohortData:
    """Align a (possibly new) cohort to a trained model: its gene panel, normalisation and encoder."""
    from pipeline.omics import ClinicalNormaliser, OmicsNormaliser

    if bundle["model_dims"]["n_genes"] and cohort.omics is None:
        log.warning("the model uses omics but the cohort has none: every patient's omics is masked")
    splits_saved = bundle.get("splits", {})
    labels = np.array([splits_saved.get(p.patient_id, p.split or "predict") for p in cohort.patients])
    splits = {s: np.flatnonzero(labels == s) for s in ("train", "val", "test", "predict")}
    feat = bundle.get("features")
    expect = (
        {
            "encoder": feat["encoder"],
            "weights": feat["weights"],
            "tile_px": feat["tile_px"],
            "target_mpp": feat["target_mpp"],
        }
        if feat
        else None
    )
    data = build_data(
        cohort,
        fdir,
        splits=splits,
        omics_norm=OmicsNormaliser.from_state(bundle["omics"]) if bundle.get("omics") else None,
        clinical_norm=ClinicalNormaliser.from_state(bundle["clinical"]) if bundle.get("clinical") else None,
        expect_features=expect,
    )
    if data.model_dims() != bundle["model_dims"]:
        raise ValueError(f"cohort modalities {data.model_dims()} do not match the model's {bundle['model_dims']}")
    return data


def stage_predict(model_path: Path, cohort: Cohort, out: Path, fdir: Path | None) -> Path:
    """``risk_scores.csv``: patient_id, site, split, risk (log hazard), risk_group, modalities."""
    from pipeline.train import load_bundle, predict_log_hz

    model, bundle = load_bundle(model_path)
    data = data_for_model(cohort, bundle, fdir)
    idx = np.arange(len(data.patient_ids))
    lh, _ = predict_log_hz(model, data, idx)
    cut = bundle["cutpoints"]["median"]
    labels = {data.patient_ids[i]: s for s, ix in data.splits.items() for i in ix}
    df = pd.DataFrame(
        {
            "patient_id": data.patient_ids,
            "site": [data.sites[k] for k in data.site],
            "split": [labels[p] for p in data.patient_ids],
            "risk": np.round(lh, 6),
            "risk_group": np.where(lh > cut, "high", "low"),
            "modalities": [_modalities(data, i) for i in idx],
            "time": data.time,
            "event": data.event.astype(int),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "risk_scores.csv"
    df.to_csv(path.with_name(".risk_scores.csv.tmp"), index=False)
    path.with_name(".risk_scores.csv.tmp").replace(path)
    return path


def stage_evaluate(risk_csv: Path, out: Path, split: str = "test") -> dict:
    """C-index (pooled, per site) for one split of ``risk_scores.csv``; KM plot by risk group."""
    from pipeline.evaluate import km_by_group, survival_metrics

    df = pd.read_csv(risk_csv)
    d = df[df.split == split] if split != "all" else df
    if d.empty:
        raise ValueError(f"{risk_csv}: no patients in split '{split}'")
    sites = sorted(d.site.unique())
    m = survival_metrics(
        d.time.to_numpy(), d.event.to_numpy(bool), d.risk.to_numpy(), np.array([sites.index(s) for s in d.site]), sites
    )
    m["split"] = split
    m["logrank_p"] = km_by_group(
        d.time.to_numpy(), d.event.to_numpy(), d.risk_group.to_numpy(), out / f"km_{split}.png", title=f"{split} set:"
    )
    _write_json(out / "metrics.json", m)
    return m


def stage_attribute(
    model_path: Path, cohort: Cohort, out: Path, fdir: Path | None, split: str = "test", max_heatmaps: int = 6
) -> dict[str, Path]:
    """Tile attention (CSV + heatmaps) and gene integrated gradients (per patient + ranked) for ``split``."""
    from pipeline.attribution import (
        attention_heatmap,
        gene_integrated_gradients,
        rank_genes,
        tile_attention,
        write_gene_attributions,
    )
    from pipeline.train import load_bundle

    model, bundle = load_bundle(model_path)
    data = data_for_model(cohort, bundle, fdir)
    idx = data.splits.get(split, np.zeros(0, int))
    if len(idx) == 0:
        idx = np.arange(len(data.patient_ids))
        log.warning("no patients in split '%s': attributing all %d patients", split, len(idx))
    adir = out / "attributions"
    adir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if data.bags is not None and fdir is not None:
        from pipeline.train import predict_log_hz

        lh, attn = predict_log_hz(model, data, idx, with_attention=True)  # one pass: risk and attention
        tiles = tile_attention(data, idx, attn or [])
        tiles.to_csv(adir / "tiles.csv", index=False)
        written["tiles"] = adir / "tiles.csv"
        (adir / "heatmaps").mkdir(exist_ok=True)
        order = np.argsort(-lh)  # the highest- and lowest-risk patients are the most telling
        pick = list(dict.fromkeys([*order[: max_heatmaps // 2], *order[::-1][: max_heatmaps - max_heatmaps // 2]]))
        for j in pick:
            for sid in dict.fromkeys(s for s, _, _ in data.tiles[idx[j]]):  # type: ignore[index]
                attention_heatmap(tiles, fdir, sid, adir / "heatmaps" / f"{sid}.png")
    if data.omics is not None:
        attr = gene_integrated_gradients(model, data, idx)
        ids = [data.patient_ids[i] for i in idx]
        write_gene_attributions(adir / "gene_ig.csv", attr, ids, data.genes)
        ranked = rank_genes(attr, data.omics[idx], data.omics_present[idx], data.genes)  # type: ignore[index]
        ranked.to_csv(adir / "genes.csv", index=False)
        written["genes"] = adir / "genes.csv"
    return written
