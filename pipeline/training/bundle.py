"""TODO training.bundle."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from data_specs.cohort import Cohort
from data_specs.config import RunConfig
from models import build_model
from models.survival import MultimodalSurvival
from pipeline.training.data import CohortData, build_data
from pipeline.training.module import model_kwargs
from pipeline.training.predict import predict_log_hz

log = logging.getLogger(__name__)


BUNDLE_FORMAT = "histofuse-model/2"  # /2: time bins, MIL/fusion/head options; /1 bundles still load


_READABLE_FORMATS = ("histofuse-model/1", BUNDLE_FORMAT)


def save_bundle(path: Path, model: MultimodalSurvival, data: CohortData, cfg: RunConfig, extra: dict) -> None:
    """A self-contained model file: weights + everything needed to predict on a new cohort. Atomic."""
    train_lh, _ = predict_log_hz(model, data, data.splits["train"])
    bundle = {
        "format": BUNDLE_FORMAT,
        "config": cfg.to_dict(),
        "model_dims": data.model_dims(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "features": data.feature_attrs or None,
        "omics": data.omics_norm.state() if data.omics_norm else None,
        "clinical": data.clinical_norm.state() if data.clinical_norm else None,
        "sites": data.sites,
        "time_bins": model.get_buffer("bin_edges").tolist() if model.n_bins else None,  # also in state_dict
        "cutpoints": {
            "median": float(np.median(train_lh)) if len(train_lh) else 0.0,
            "tertiles": [float(v) for v in np.quantile(train_lh, [1 / 3, 2 / 3])] if len(train_lh) else [],
        },
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(bundle, tmp)
    tmp.replace(path)


def load_bundle(path: Path) -> tuple[MultimodalSurvival, dict]:
    """Rebuild the model from a bundle; returns ``(model in eval mode, bundle)``."""
    b = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(b, dict) or b.get("format") not in _READABLE_FORMATS:
        raise ValueError(
            f"{path}: not a histofuse model bundle (format {b.get('format') if isinstance(b, dict) else '?'}; "
            f"this version reads {list(_READABLE_FORMATS)})"
        )
    model = build_model(**b["model_dims"], **model_kwargs(b["config"]["model"], b["config"].get("train", {})))
    state = dict(b["state_dict"])
    if b["format"] == "histofuse-model/1":  # /1 had a bias on the attention score: a no-op under softmax
        state.pop("mil.attn_w.bias", None)
    model.load_state_dict(state)
    return model.eval(), b


def data_for_model(cohort: Cohort, bundle: dict, fdir: Path | None) -> CohortData:
    """Align a (possibly new) cohort to a trained model: its gene panel, normalisation and encoder."""
    from pipeline.omics.clinical import ClinicalNormaliser
    from pipeline.omics.normalise import OmicsNormaliser

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
