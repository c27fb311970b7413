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
from typing import Any

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
    per_slide = cohort.slide_mpp_overrides()
    res = extract_slides(slides, out, enc, e, cohort.slide_mpp, progress=progress, slide_mpps=per_slide)
    failed = [r for r in res if r.status == "failed"]
    n = sum(r.tiles for r in res)
    log.info("extracted %d slides (%d tiles) into %s; %d failed", len(res) - len(failed), n, out, len(failed))
    for r in failed:
        log.error("  %s: %s", r.slide_path, r.error)
    return out


def load_run_data(cohort: Cohort, cfg: RunConfig, out: Path | None = None, **normalisers: Any) -> CohortData:
    """The cohort's data as the run config asks (splits, gene panel/HVG/pathways); features from ``out``
    (default ``cfg.out``). ``normalisers``: ``omics_norm`` / ``clinical_norm`` fitted elsewhere (e.g. from the
    federation's site summaries), passed on to ``build_data``."""
    fdir = features_dir(out or cfg.out, cfg.extract) if any(p.slides for p in cohort.patients) else None
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
        **normalisers,
    )


def stage_train(
    cohort: Cohort, cfg: RunConfig, progress: bool = True, data: CohortData | None = None, resume: bool = False
) -> Path:
    """Train (federated across the cohort's sites, or centralised) and save ``model.pt``.

    ``data``: the cohort already built by :func:`load_run_data` (``histofuse run`` builds it once).
    ``resume``: federated only, continue after the last finished round checkpointed in ``out/federated``.
    """
    from pipeline.train import fit_local, save_bundle

    data = load_run_data(cohort, cfg) if data is None else data
    n = {k: len(v) for k, v in data.splits.items()}
    log.info("training on %s patients (train/val/test), %d sites, modalities %s", n, len(data.sites), data.model_dims())
    if cfg.federated.enabled:
        from pipeline.federated import run_federated

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
    from pipeline.curves import BreslowBaseline, default_horizons
    from pipeline.train import predict_log_hz

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
    _check_dims(data, bundle)
    return data


def _check_dims(data: CohortData, bundle: dict) -> None:
    if data.model_dims() != bundle["model_dims"]:
        have, want = data.model_dims(), bundle["model_dims"]
        diff = ", ".join(f"{k} {have.get(k)} (model: {want.get(k)})" for k in want if have.get(k) != want.get(k))
        raise ValueError(f"the cohort does not match the model: {diff}")


def _model_data(model_path: Path, cohort: Cohort, fdir: Path | None, data: CohortData | None):
    """``(model, bundle, data)``: the cohort aligned to the model, or the run's own ``data`` when given."""
    from pipeline.train import load_bundle

    model, bundle = load_bundle(model_path)
    if data is None:
        data = data_for_model(cohort, bundle, fdir)
    else:
        _check_dims(data, bundle)
    return model, bundle, data


def predict_outputs(model, data: CohortData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``log_hz [len(idx)]`` and, for discrete-time heads, ``hazards [len(idx), K]`` (else None)."""
    import torch

    from pipeline.data import make_loader, model_inputs

    model.eval()
    lh, hz = [], []
    with torch.inference_mode():
        for batch in make_loader(data, idx, 32, train=False):
            o = model(**model_inputs(batch))
            lh.append(o.log_hz.float().cpu().numpy())
            if getattr(o, "hazards", None) is not None:
                hz.append(o.hazards.float().cpu().numpy())
    return (np.concatenate(lh) if lh else np.zeros(0)), (np.concatenate(hz) if hz else None)


def risk_groups(log_hz: np.ndarray, cutpoints: dict, scheme: str) -> np.ndarray:
    """``low``/``high`` (median) or ``low``/``intermediate``/``high`` (tertiles), cut-points from training."""
    if scheme == "tertiles":
        lo, hi = cutpoints["tertiles"]
        return np.where(log_hz > hi, "high", np.where(log_hz > lo, "intermediate", "low"))
    if scheme != "median":
        raise ValueError(f"unknown risk_groups '{scheme}': valid names are ['median', 'tertiles']")
    return np.where(log_hz > cutpoints["median"], "high", "low")


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


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
    from pipeline.curves import BreslowBaseline, survival_from_hazards

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
        from pipeline.evaluate import Curves

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


def read_curves(path: Path, ids: list[str]):
    """Survival curves for ``ids`` from ``survival_curves.csv`` (None if absent or incomplete)."""
    from pipeline.evaluate import Curves

    if not path.is_file():
        return None
    c = pd.read_csv(path).set_index("patient_id")
    c.index = c.index.astype(str)
    missing = [p for p in ids if p not in c.index]
    if missing:
        log.warning("%s: no curves for %d patients (e.g. %s); no Brier score", path, len(missing), missing[0])
        return None
    return Curves(np.array([float(t) for t in c.columns]), c.loc[ids].to_numpy(float))


def stage_evaluate(risk_csv: Path, out: Path, split: str = "test", overrides: list[str] | None = None) -> dict:
    """Metrics for one split (``all``: every patient) of ``risk_scores.csv``, pooled and per site:
    Harrell and Uno C, td-AUC, integrated Brier score (from ``survival_curves.csv`` beside it), each
    with a patient-bootstrap CI, log-rank p by risk group; ``metrics.json`` and PNG plots."""
    from pipeline.evaluate import km_by_group, km_per_site, plot_td_auc, survival_metrics

    ev = _eval_cfg(None, overrides)
    risk_csv = Path(risk_csv)
    df = pd.read_csv(risk_csv, dtype={"patient_id": str})
    need = {"patient_id", "site", "split", "risk", "risk_group", "time", "event"}
    if not need <= set(df.columns):
        raise ValueError(f"{risk_csv}: missing columns {sorted(need - set(df.columns))}")
    d = df[df.split == split] if split != "all" else df
    if d.empty:
        raise ValueError(f"{risk_csv}: no patients in split '{split}' (splits: {sorted(df.split.unique())})")
    tr = df[df.split == "train"]
    horizons = ev.horizons
    if horizons is None:
        horizons = [float(c[6:]) for c in df.columns if c.startswith("surv_t")] or None
    sites = sorted(d.site.unique())
    curves = read_curves(risk_csv.with_name("survival_curves.csv"), d.patient_id.tolist())
    m = survival_metrics(
        d.time.to_numpy(float),
        d.event.to_numpy(bool),
        d.risk.to_numpy(float),
        np.array([sites.index(s) for s in d.site]),
        sites,
        group=d.risk_group.to_numpy(str),
        curves=curves,
        train=(tr.time.to_numpy(float), tr.event.to_numpy(bool)) if split not in ("train", "all") else None,
        horizons=horizons,
        n_boot=ev.bootstrap,
        seed=ev.seed,
    )
    m["split"] = split
    m["logrank_p"] = m["pooled"].get("logrank_p", float("nan"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    km_by_group(d.time.to_numpy(), d.event.to_numpy(), d.risk_group.to_numpy(), out / f"km_{split}.png",
                title=f"{split} set:")  # fmt: skip
    km_per_site(d.time.to_numpy(), d.event.to_numpy(), d.risk_group.to_numpy(), d.site.to_numpy(),
                out / f"km_{split}_sites.png")  # fmt: skip
    if m["horizons"]:
        plot_td_auc(m, out / f"td_auc_{split}.png")
    _write_json(out / "metrics.json", _nan_to_none(m))
    return m


def _nan_to_none(o):
    """Standard JSON: NaN becomes null (the reason is in the neighbouring ``notes``)."""
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_nan_to_none(v) for v in o]
    if isinstance(o, float | np.floating) and not np.isfinite(o):
        return None
    return o


def _slide_info(cohort: Cohort, fdir: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """slide_id -> slide path (from the cohort) and -> tile side in level-0 pixels (from the features file)."""
    import h5py

    from pipeline.extract import slide_id_of

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
    from pipeline import attribution as A
    from pipeline import biomarkers as B

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
        from pipeline.train import predict_log_hz

        _, attn = predict_log_hz(model, data, idx, with_attention=True)
        tiles = A.tile_attention(data, idx, attn or [])
        tr = data.splits.get("train", np.zeros(0, int))
        base = A.mean_tile_feature(data, tr if len(tr) else idx)
        ig = A.tile_integrated_gradients(model, data, idx, base, ac.ig_steps)
        tiles["ig"] = np.concatenate(ig) if ig else np.zeros(0)
        paths, size0 = _slide_info(cohort, fdir)
        if ac.phenotypes:
            try:
                fit_on = tr if len(tr) else idx
                ph = B.fit_phenotypes(data.bags, data.tiles, fit_on, ac.max_phenotype_tiles,  # type: ignore[arg-type]
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
            A.write_geojson(t, size0[sid], adir / "geojson" / f"{sid}.geojson")
        order = np.argsort(-lh)  # the highest- and lowest-risk patients are the most telling
        k = ac.max_heatmaps
        pick = list(dict.fromkeys([*order[: (k + 1) // 2], *order[::-1][: k // 2]]))[:k]
        for j in pick:
            for sid in dict.fromkeys(s for s, _, _ in data.tiles[idx[j]]):  # type: ignore[index]
                t = tiles[tiles.slide_id == sid]
                A.attention_heatmap(tiles, fdir, sid, adir / "heatmaps" / f"{sid}.png")
                A.attention_heatmap(tiles, fdir, sid, adir / "heatmaps" / f"{sid}_ig.png", column="ig")
                if sid in paths and len(t) >= 2:
                    A.tile_gallery(t, paths[sid], size0[sid], adir / "galleries" / f"{sid}.png", ac.gallery_k)
                    A.tile_gallery(t, paths[sid], size0[sid], adir / "galleries" / f"{sid}_ig.png", ac.gallery_k, "ig")
        if ac.phenotypes and ph is not None and all(s in paths for s, _, _ in sum(ph.examples.values(), [])):
            written["phenotype_png"] = adir / "phenotypes.png"
        faith["tiles"] = A.tile_deletion_curves(
            model, data, idx, {"attention": attn or [], "ig": ig}, ac.deletion_steps, seed=ac.seed
        )
    if data.omics is not None:
        attr = A.gene_integrated_gradients(model, data, idx, ac.ig_steps)
        A.write_gene_attributions(adir / "gene_ig.csv", attr, ids, data.genes)
        present = data.omics_present[idx]  # type: ignore[index]
        rank = A.rank_genes(attr, data.omics[idx], present, data.genes)
        _atomic_csv(rank, adir / "genes.csv")
        written["genes"] = adir / "genes.csv"
        obs = held.assign(omics_present=present)
        A.write_gene_h5ad(adir / "gene_attributions.h5ad", attr, data.omics[idx], obs, rank, data.genes)
        written["genes_h5ad"] = adir / "gene_attributions.h5ad"
        gene_x = pd.DataFrame(np.where(present[:, None], data.omics[idx], np.nan), columns=data.genes)
        faith["genes"] = A.gene_deletion_curves(model, data, idx, attr, ac.deletion_steps, seed=ac.seed)
    if gene_x is not None or phen_x is not None:
        table, info = B.biomarker_table(held, gene_x, rank, phen_x, ac.top_genes)
        _atomic_csv(table, adir / "biomarkers.csv")
        _write_json(adir / "biomarkers.json", {"split": split, **info})
        written["biomarkers"] = adir / "biomarkers.csv"
        if "phenotype_png" in written:
            B.phenotype_examples_png(ph, paths, size0, written["phenotype_png"], table[table.kind == "phenotype"])
    if "tiles" in faith or "genes" in faith:
        _write_json(adir / "faithfulness.json", _nan_to_none(faith))
        A.plot_deletion({k: v for k, v in faith.items() if isinstance(v, dict)}, adir / "deletion.png")
        written["faithfulness"] = adir / "faithfulness.json"
    return written


def _section(bundle: dict | None, overrides: list[str] | None, name: str):
    """A config section: the model's saved one (if any), then ``overrides`` (``name.key=value``)."""
    from data_specs.config import resolve_config

    base = (bundle or {}).get("config", {}).get(name) or {}
    ov = [f"{name}.{k}={json.dumps(v)}" for k, v in base.items()] + [o for o in overrides or [] if o.startswith(name)]
    return getattr(resolve_config(None, ov), name)
