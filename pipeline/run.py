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
    per_slide = cohort.slide_mpp_overrides()
    res = extract_slides(slides, out, enc, e, cohort.slide_mpp, progress=progress, slide_mpps=per_slide)
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
    from data_specs.config import EvaluateConfig, resolve_config

    base = (bundle or {}).get("config", {}).get("evaluate") or {}
    ov = [f"evaluate.{k}={json.dumps(v)}" for k, v in base.items()] + list(overrides or [])
    return resolve_config(None, ov).evaluate if ov else EvaluateConfig()


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
