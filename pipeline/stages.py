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
from pipeline.outputs.writers import _atomic_csv, _nan_to_none, _write_json, risk_groups
from pipeline.slides.extract import extract_slides
from pipeline.slides.features import features_dir
from pipeline.training.bundle import _check_dims, data_for_model
from pipeline.training.data import CohortData, load_run_data
from pipeline.training.predict import predict_arrays as predict_outputs

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


def stage_train(
    cohort: Cohort, cfg: RunConfig, progress: bool = True, data: CohortData | None = None, resume: bool = False
) -> Path:
    """Train (federated across the cohort's sites, or centralised) and save ``model.pt``.

    ``data``: the cohort already built by :func:`load_run_data` (``histofuse run`` builds it once).
    ``resume``: federated only, continue after the last finished round checkpointed in ``out/federated``.
    """
    from pipeline.training.bundle import save_bundle
    from pipeline.training.module import fit_local

    data = load_run_data(cohort, cfg) if data is None else data
    n = {k: len(v) for k, v in data.splits.items()}
    log.info("training on %s patients (train/val/test), %d sites, modalities %s", n, len(data.sites), data.model_dims())
    if cfg.federated.enabled:
        from pipeline.federated.embedded import run_federated

        model, info = run_federated(data, cfg, cfg.out / "federated", progress=progress, resume=resume)
        info = {"mode": "federated", **info}
    else:
        module, info = fit_local(data, cfg, progress=progress)
        model, info = module.model.eval(), {"mode": "centralised", **info}
    splits = {data.patient_ids[i]: s for s, idx in data.splits.items() for i in idx}
    path = cfg.out / "model.pt"
    save_bundle(path, model, data, cfg, {"train_info": info, "splits": splits, **survival_summary(model, data)})
    _write_json(cfg.out / "train_summary.json", info)
    return path


def survival_summary(model, data: CohortData) -> dict:
    """What ``predict`` needs for survival curves, fixed on the training patients: a Breslow baseline
    (Cox heads; per site and pooled, built from per-site summaries) and default horizons."""
    from pipeline.stats.curves import BreslowBaseline, default_horizons
    from pipeline.training.predict import predict_log_hz

    tr = data.splits["train"]
    out: dict = {"horizons": default_horizons(data.time[tr], data.event[tr])}
    if getattr(model, "n_bins", 0) == 0 and data.event[tr].any():
        lh, _ = predict_log_hz(model, data, tr)
        out["baseline"] = BreslowBaseline.fit(data.time[tr], data.event[tr], lh, data.site[tr], data.sites).state()
    return out


def _modalities(data: CohortData, i: int) -> str:
    m = []
    if data.bags is not None and len(data.bags[i]):
        m.append("slides")
    if data.omics_present is not None and data.omics_present[i]:
        m.append("omics")
    if data.clinical_present is not None and data.clinical_present[i]:
        m.append("clinical")
    return "+".join(m)


def _model_data(model_path: Path, cohort: Cohort, fdir: Path | None, data: CohortData | None):
    """``(model, bundle, data)``: the cohort aligned to the model, or the run's own ``data`` when given."""
    from pipeline.training.bundle import load_bundle

    model, bundle = load_bundle(model_path)
    if data is None:
        data = data_for_model(cohort, bundle, fdir)
    else:
        _check_dims(data, bundle)
    return model, bundle, data


def stage_predict(
    model_path: Path,
    cohort: Cohort,
    out: Path,
    fdir: Path | None,
    overrides: list[str] | None = None,
    data: CohortData | None = None,
) -> Path:
    """``risk_scores.csv``: patient_id, site, split, risk (log hazard), risk_group, surv_t<h> (survival
    probability at each horizon), modalities, time, event; and ``survival_curves.csv`` (one row per
    patient, one column per time).

    Risk-group cut-points and the Breslow baseline come from the model (fixed on its training
    patients); ``overrides`` (``evaluate.risk_groups=tertiles``, ``evaluate.horizons=[365,730]``)
    change the model's saved settings for this prediction.
    """
    from pipeline.stats.curves import BreslowBaseline, survival_from_hazards

    model, bundle, data = _model_data(model_path, cohort, fdir, data)
    ev = _eval_cfg(bundle, overrides)
    idx = np.arange(len(data.patient_ids))
    lh, hz = predict_outputs(model, data, idx)
    site_names = [data.sites[k] for k in data.site]
    horizons = ev.horizons if ev.horizons is not None else bundle.get("horizons", [])
    times, surv = None, None
    if hz is not None:
        edges = model.get_buffer("bin_edges").double().numpy()
        times = edges[1:]
        surv = survival_from_hazards(hz, edges, times)
    elif bundle.get("baseline"):
        base = BreslowBaseline.from_state(bundle["baseline"])
        times = base.grid if len(base.grid) <= 200 else np.unique(np.quantile(base.grid, np.linspace(0, 1, 200)))
        surv = base.survival(lh, times, site_names)
    labels = {data.patient_ids[i]: s for s, ix in data.splits.items() for i in ix}
    df = pd.DataFrame(
        {
            "patient_id": data.patient_ids,
            "site": site_names,
            "split": [labels[p] for p in data.patient_ids],
            "risk": np.round(lh, 6),
            "risk_group": risk_groups(lh, bundle["cutpoints"], ev.risk_groups),
        }
    )
    if surv is not None and times is not None:
        from pipeline.stats.metrics import Curves

        at = Curves(times, surv).at(np.asarray(horizons, float)) if horizons else np.zeros((len(lh), 0))
        for j, h in enumerate(horizons):
            df[f"surv_t{h:g}"] = np.round(at[:, j], 5)
    df["modalities"] = [_modalities(data, i) for i in idx]
    df["time"], df["event"] = data.time, data.event.astype(int)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "risk_scores.csv"
    _atomic_csv(df, path)
    if surv is not None and times is not None:
        curves = pd.DataFrame(np.round(surv, 5), columns=[f"{t:g}" for t in times])
        curves.insert(0, "patient_id", data.patient_ids)
        _atomic_csv(curves, out / "survival_curves.csv")
    else:
        (out / "survival_curves.csv").unlink(missing_ok=True)
        log.warning("%s: no survival baseline in the model; risk scores only (no Brier score)", model_path)
    return path


def _eval_cfg(bundle: dict | None, overrides: list[str] | None):
    """The evaluate section: the model's saved one (if any), then ``overrides``."""
    return _section(bundle, overrides, "evaluate")


def _slide_info(cohort: Cohort, fdir: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """slide_id -> slide path (from the cohort) and -> tile side in level-0 pixels (from the features file)."""
    import h5py

    from pipeline.slides.features import slide_id_of

    paths = {slide_id_of(s): Path(s) for p in cohort.patients for s in p.slides}
    size0 = {}
    for sid in paths:
        f = Path(fdir) / f"{sid}.h5"
        if f.is_file():
            with h5py.File(f, "r") as h:
                size0[sid] = int(h.attrs["size0"])
    return paths, size0


def stage_attribute(
    model_path: Path,
    cohort: Cohort,
    out: Path,
    fdir: Path | None,
    split: str = "test",
    overrides: list[str] | None = None,
    data: CohortData | None = None,
) -> dict[str, Path]:
    """Attributions for the patients of ``split``, written under ``out/attributions/``:

    tiles.csv (attention, integrated gradients, phenotype per tile, level-0 coordinates), heatmaps/
    (attention and IG over the thumbnail), geojson/ (QuPath), galleries/ (top/bottom tiles at full
    resolution), genes.csv (ranked, with direction), gene_ig.csv and gene_attributions.h5ad,
    phenotypes.png + phenotype_fractions.csv, biomarkers.csv (+ .json), faithfulness.json + deletion.png.
    """
    from pipeline.outputs.attribution import (
        gene_deletion_curves,
        gene_integrated_gradients,
        mean_tile_feature,
        rank_genes,
        tile_attention,
        tile_deletion_curves,
        tile_integrated_gradients,
    )
    from pipeline.outputs.biomarkers import biomarker_table, fit_phenotypes
    from pipeline.outputs.plots import attention_heatmap, phenotype_examples_png, plot_deletion, tile_gallery
    from pipeline.outputs.writers import write_gene_attributions, write_gene_h5ad, write_geojson

    model, bundle, data = _model_data(model_path, cohort, fdir, data)
    ac = _section(bundle, overrides, "attribute")
    idx = data.splits.get(split, np.zeros(0, int))
    if len(idx) == 0:
        idx = np.arange(len(data.patient_ids))
        log.warning("no patients in split '%s': attributing all %d patients", split, len(idx))
    adir = out / "attributions"
    adir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    lh, _ = predict_outputs(model, data, idx)
    ids = [data.patient_ids[i] for i in idx]
    held = pd.DataFrame(
        {
            "patient_id": ids,
            "site": [data.sites[data.site[i]] for i in idx],
            "split": split,
            "risk": lh,
            "time": data.time[idx],
            "event": data.event[idx].astype(int),
        }
    )
    faith: dict = {"split": split, "patients": len(idx)}
    gene_x = rank = phen_x = ph = None
    if data.bags is not None and fdir is not None:
        from pipeline.training.predict import predict_log_hz

        _, attn = predict_log_hz(model, data, idx, with_attention=True)
        tiles = tile_attention(data, idx, attn or [])
        tr = data.splits.get("train", np.zeros(0, int))
        base = mean_tile_feature(data, tr if len(tr) else idx)
        ig = tile_integrated_gradients(model, data, idx, base, ac.ig_steps)
        tiles["ig"] = np.concatenate(ig) if ig else np.zeros(0)
        paths, size0 = _slide_info(cohort, fdir)
        if ac.phenotypes:
            try:
                fit_on = tr if len(tr) else idx
                ph = fit_phenotypes(data.bags, data.tiles, fit_on, ac.max_phenotype_tiles,  # type: ignore[arg-type]
                                      ac.leiden_resolution, seed=ac.seed, assign_idx=idx)  # fmt: skip
                tiles["phenotype"] = np.concatenate([ph.labels[i] for i in idx]) if len(idx) else []
                phen_x = pd.DataFrame(ph.fractions[idx], columns=ph.names)
                pf = phen_x.copy()
                pf.insert(0, "patient_id", ids)
                _atomic_csv(pf, adir / "phenotype_fractions.csv")
                written["phenotypes"] = adir / "phenotype_fractions.csv"
            except ValueError as e:
                log.warning("phenotypes skipped: %s", e)
        _atomic_csv(tiles, adir / "tiles.csv")
        written["tiles"] = adir / "tiles.csv"
        for sub in ("heatmaps", "geojson", "galleries"):
            (adir / sub).mkdir(exist_ok=True)
        for sid, t in tiles.groupby("slide_id", sort=False):
            write_geojson(t, size0[sid], adir / "geojson" / f"{sid}.geojson")
        order = np.argsort(-lh)  # the highest- and lowest-risk patients are the most telling
        k = ac.max_heatmaps
        pick = list(dict.fromkeys([*order[: (k + 1) // 2], *order[::-1][: k // 2]]))[:k]
        for j in pick:
            for sid in dict.fromkeys(s for s, _, _ in data.tiles[idx[j]]):  # type: ignore[index]
                t = tiles[tiles.slide_id == sid]
                attention_heatmap(tiles, fdir, sid, adir / "heatmaps" / f"{sid}.png")
                attention_heatmap(tiles, fdir, sid, adir / "heatmaps" / f"{sid}_ig.png", column="ig")
                if sid in paths and len(t) >= 2:
                    tile_gallery(t, paths[sid], size0[sid], adir / "galleries" / f"{sid}.png", ac.gallery_k)
                    tile_gallery(t, paths[sid], size0[sid], adir / "galleries" / f"{sid}_ig.png", ac.gallery_k, "ig")
        if ac.phenotypes and ph is not None and all(s in paths for s, _, _ in sum(ph.examples.values(), [])):
            written["phenotype_png"] = adir / "phenotypes.png"
        faith["tiles"] = tile_deletion_curves(
            model, data, idx, {"attention": attn or [], "ig": ig}, ac.deletion_steps, seed=ac.seed
        )
    if data.omics is not None:
        attr = gene_integrated_gradients(model, data, idx, ac.ig_steps)
        write_gene_attributions(adir / "gene_ig.csv", attr, ids, data.genes)
        present = data.omics_present[idx]  # type: ignore[index]
        rank = rank_genes(attr, data.omics[idx], present, data.genes)
        _atomic_csv(rank, adir / "genes.csv")
        written["genes"] = adir / "genes.csv"
        obs = held.assign(omics_present=present)
        write_gene_h5ad(adir / "gene_attributions.h5ad", attr, data.omics[idx], obs, rank, data.genes)
        written["genes_h5ad"] = adir / "gene_attributions.h5ad"
        gene_x = pd.DataFrame(np.where(present[:, None], data.omics[idx], np.nan), columns=data.genes)
        faith["genes"] = gene_deletion_curves(model, data, idx, attr, ac.deletion_steps, seed=ac.seed)
    if gene_x is not None or phen_x is not None:
        table, info = biomarker_table(held, gene_x, rank, phen_x, ac.top_genes)
        _atomic_csv(table, adir / "biomarkers.csv")
        _write_json(adir / "biomarkers.json", {"split": split, **info})
        written["biomarkers"] = adir / "biomarkers.csv"
        if "phenotype_png" in written:
            phenotype_examples_png(ph, paths, size0, written["phenotype_png"], table[table.kind == "phenotype"])
    if "tiles" in faith or "genes" in faith:
        _write_json(adir / "faithfulness.json", _nan_to_none(faith))
        plot_deletion({k: v for k, v in faith.items() if isinstance(v, dict)}, adir / "deletion.png")
        written["faithfulness"] = adir / "faithfulness.json"
    return written


def _section(bundle: dict | None, overrides: list[str] | None, name: str):
    """A config section: the model's saved one (if any), then ``overrides`` (``name.key=value``)."""
    from data_specs.config import resolve_config

    base = (bundle or {}).get("config", {}).get(name) or {}
    ov = [f"{name}.{k}={json.dumps(v)}" for k, v in base.items()] + [o for o in overrides or [] if o.startswith(name)]
    return getattr(resolve_config(None, ov), name)
