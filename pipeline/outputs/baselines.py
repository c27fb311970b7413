"""Reference models beside the network: centralised linear Cox baselines and modality contributions.

:func:`fit_baselines` fits an elastic-net Cox model (scikit-survival ``CoxnetSurvivalAnalysis``) on each
modality alone and on all of them together, on the run's own split, and scores it on the test patients
next to the model (paired bootstrap CI of the C-index difference). These baselines pool every patient's
features in one place, so they are labelled ``centralised``. :func:`modality_contributions` removes one
modality at inference and reports the model's C-index without it. :mod:`pipeline.outputs.baseline_report`
renders both for the console and the report.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_specs.artifacts import RunFiles
from pipeline.outputs.baseline_report import summary_lines
from pipeline.outputs.scoring import BaselineSettings, scored, verdict
from pipeline.stats.metrics import harrell_cindex

if TYPE_CHECKING:
    from data_specs.config import RunConfig
    from pipeline.training.data import CohortData

log = logging.getLogger(__name__)

MODALITIES = ("slides", "omics", "clinical")
PredictFn = Callable[["CohortData", np.ndarray], np.ndarray]


def _has(data: CohortData, m: str) -> bool:
    return {"slides": data.bags is not None, "omics": data.omics is not None, "clinical": data.clinical is not None}[m]


def _raw_block(data: CohortData, m: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X [P, k], present [P] bool)`` for one modality; slides as the mean of each patient's tiles."""
    if m == "slides":
        assert data.bags is not None
        present = np.array([len(b) > 0 for b in data.bags])
        x = np.stack([b.mean(0) if len(b) else np.zeros(data.feature_dim) for b in data.bags]).astype(np.float64)
        return x, present
    x, present = (data.omics, data.omics_present) if m == "omics" else (data.clinical, data.clinical_present)
    assert x is not None and present is not None
    return np.asarray(x, np.float64), np.asarray(present, bool)


def modality_block(data: CohortData, m: str, train: np.ndarray, n_pcs: int = 10) -> tuple[np.ndarray, dict]:
    """One modality as a standardised design matrix ``[P, k]``, every statistic fitted on ``train`` only.

    Slides: PCA (``min(n_pcs, training slides - 1, D)`` components) of the mean-pooled tile features (``n_pcs``
    <= 0: every feature dimension, no PCA). Each
    column is standardised with the mean/SD of the training patients who have the modality; a patient
    without it gets the training mean (0 after standardising). Returns the matrix and what was done.
    """
    x, present = _raw_block(data, m)
    tr = np.asarray(train)[present[train]]
    if len(tr) < 2:
        raise ValueError(f"modality {m}: {len(tr)} training patients have it (need >= 2)")
    info: dict = {"columns": x.shape[1], "train_with_modality": len(tr), "imputed": int((~present).sum())}
    if m == "slides" and n_pcs > 0:
        from sklearn.decomposition import PCA

        k = min(n_pcs, len(tr) - 1, x.shape[1])  # n centred slides span at most n - 1 directions
        pca = PCA(n_components=k, random_state=0).fit(x[tr])
        x = pca.transform(x)
        info.update(columns=k, pca_explained=float(pca.explained_variance_ratio_.sum()))
    mu, sd = x[tr].mean(0), x[tr].std(0)
    const = sd <= 1e-8 * np.maximum(1.0, np.abs(mu))  # constant on training patients: carries nothing
    z = np.where(const, 0.0, (x - mu) / np.where(const, 1.0, sd))
    z[~present] = 0.0  # missing modality: the training mean
    return z, info


def _folds(event: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold, StratifiedKFold

    k = min(n_folds, int(event.sum()), int((~event).sum()))
    if k >= 2:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(event, event))
    return list(KFold(min(n_folds, len(event)), shuffle=True, random_state=seed).split(event))


def fit_coxnet(x: np.ndarray, time: np.ndarray, event: np.ndarray, s: BaselineSettings) -> tuple[object, float, dict]:
    """Coxnet on exactly these rows: the alpha path from all of them, alpha by K-fold CV (mean fold C).

    Args:
        x: ``[n, k]`` design matrix of the fitting patients; time ``[n]`` float; event ``[n]`` bool.

    Returns the path model (predict with ``alpha=``), the chosen alpha and the CV record. Ties go to the
    larger (more regularised) alpha.
    """
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    event = np.asarray(event, bool)
    if event.sum() < 2:
        raise ValueError(f"{int(event.sum())} events among the {len(event)} fitting patients (need >= 2)")
    kw = {"l1_ratio": s.l1_ratio, "fit_baseline_model": False, "alpha_min_ratio": s.alpha_min_ratio}
    y = Surv.from_arrays(event, time)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at the smallest alphas
        path = CoxnetSurvivalAnalysis(n_alphas=s.n_alphas, **kw).fit(x, y)
        alphas = path.alphas_
        scores = np.full((s.n_folds, len(alphas)), np.nan)
        for f, (a, b) in enumerate(_folds(event, s.n_folds, s.seed)):
            try:
                m = CoxnetSurvivalAnalysis(alphas=alphas, **kw).fit(x[a], y[a])
            except ArithmeticError as e:  # sksurv gives up on a diverging path
                log.warning("baseline CV fold %d: %s", f, e)
                continue
            for j, al in enumerate(alphas):
                scores[f, j] = harrell_cindex(time[b], event[b], m.predict(x[b], alpha=al))
    mean = np.nanmean(scores, 0) if np.isfinite(scores).any() else np.zeros(len(alphas))
    mean = np.nan_to_num(mean, nan=-1.0)
    j = int(np.flatnonzero(mean == mean.max())[0])  # alphas_ decrease: first max = largest alpha
    return path, float(alphas[j]), {"cv_cindex": float(mean[j]), "alpha_index": j, "n_alphas": len(alphas)}


def _names(data: CohortData, m: str, k: int) -> list[str]:
    pcs = [f"slide_pc{j + 1}" for j in range(k)]
    names = {"slides": pcs, "omics": data.genes, "clinical": data.clinical_columns}[m]
    return list(names) if len(names) == k else [f"{m}_{j}" for j in range(k)]


def _fit_scored(
    x: np.ndarray,
    names: list[str],
    data: CohortData,
    fit: np.ndarray,
    test: np.ndarray,
    ref: np.ndarray | None,
    s: BaselineSettings,
) -> tuple[dict, np.ndarray]:
    """Coxnet on ``x [P, k]`` rows ``fit``, scored on rows ``test``: its record and test ``log_hz``."""
    t, e = data.time.astype(float), data.event.astype(bool)
    path, alpha, cv = fit_coxnet(x[fit], t[fit], e[fit], s)
    lh = path.predict(x[test], alpha=alpha)
    coef = path.coef_[:, cv["alpha_index"]]
    top = [j for j in np.argsort(-np.abs(coef), kind="stable")[:10] if coef[j] != 0]
    rec = {
        "features": int(x.shape[1]),
        "nonzero": int((coef != 0).sum()),
        "alpha": alpha,
        **cv,
        **scored(t[test], e[test], lh, ref, s),
        "top_coef": {names[j]: float(coef[j]) for j in top},
    }
    return rec, lh


def _method(s: BaselineSettings, n_fit: int) -> dict:
    return {
        "model": "scikit-survival CoxnetSurvivalAnalysis",
        "l1_ratio": s.l1_ratio,
        "alpha": f"{s.n_folds}-fold CV stratified by event on train+val patients (mean fold Harrell C)",
        "slides": f"mean-pooled tile features -> PCA (<= {s.n_pcs} components) fitted on training slides",
        "standardise": "each column on training patients who have the modality",
        "missing_modality": "imputed with the training mean",
        "fit_patients": n_fit,
        "bootstrap": {"resamples": s.n_boot, "seed": s.seed, "unit": "patient"},
    }


def fit_baselines(
    data: CohortData,
    model_log_hz: np.ndarray | None = None,
    settings: BaselineSettings | None = None,
    return_predictions: bool = False,
) -> dict | tuple[dict, dict[str, np.ndarray]]:
    """Centralised Coxnet baselines on the run's split, scored on its test patients (a dict for metrics.json).

    Args:
        data: the run's data; ``splits`` must hold ``train`` and ``test`` (``val`` joins the fitting set).
        model_log_hz: the model's ``log_hz [len(test)]`` in ``data.splits["test"]`` order, for the paired
            bootstrap CI of (model - baseline) C-index; None: baselines only.

    Each modality alone and ``all`` of them: blocks from :func:`modality_block` (PCA and standardisation on
    the training patients), alpha by stratified K-fold CV and the final fit on train + val patients; test
    patients are only scored. ``best`` is the baseline with the highest CV C-index (chosen without test data).
    With ``return_predictions``, also each baseline's test ``log_hz``.
    """
    s = settings or BaselineSettings()
    train, fit, test = _split_indices(data)
    blocks, notes = _modality_blocks(data, train, s)
    sets = {m: [m] for m in blocks}
    if len(blocks) > 1:
        sets["all"] = list(blocks)
    ref = None if model_log_hz is None else np.asarray(model_log_hz, float)
    if ref is not None and len(ref) != len(test):
        raise ValueError(f"model_log_hz: {len(ref)} values for {len(test)} test patients")
    res: dict = {}
    preds: dict[str, np.ndarray] = {}
    for name, parts in sets.items():
        x = np.concatenate([blocks[m][0] for m in parts], axis=1)
        names = [n for m in parts for n in _names(data, m, blocks[m][0].shape[1])]
        try:
            res[name], preds[name] = _fit_scored(x, names, data, fit, test, ref, s)
        except ValueError as err:
            notes[name] = str(err)
            continue
        res[name] = {"modalities": parts, **res[name]}
        res[name]["imputed_test"] = {m: int((~_raw_block(data, m)[1][test]).sum()) for m in parts}
    out: dict = {
        "label": "centralised",
        "why": "fitted on pooled patient data in one place; not available to a federation without pooling",
        "method": _method(s, len(fit)),
        "baselines": res,
        "notes": notes,
        "modality_info": {m: b[1] for m, b in blocks.items()},
    }
    if res:
        out.update(_best(data, res, test, ref, s))
    return (out, preds) if return_predictions else out


def _split_indices(data: CohortData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, fit, test)`` patient indices: fit is train + val, sorted; raises if it overlaps test."""
    train, test = np.asarray(data.splits["train"]), np.asarray(data.splits["test"])
    fit = np.sort(np.concatenate([train, np.asarray(data.splits.get("val", []), int)]))
    if len(np.intersect1d(fit, test)):
        raise ValueError("splits: train/val and test overlap; baselines need disjoint splits")
    return train, fit, test


def _modality_blocks(
    data: CohortData, train: np.ndarray, s: BaselineSettings
) -> tuple[dict[str, tuple[np.ndarray, dict]], dict[str, str]]:
    """Each present modality's :func:`modality_block`, and why any could not be built (``notes``)."""
    blocks, notes = {}, {}
    for m in (m for m in MODALITIES if _has(data, m)):
        try:
            blocks[m] = modality_block(data, m, train, s.n_pcs)
        except ValueError as e:
            notes[m] = str(e)
    return blocks, notes


def _best(data: CohortData, res: dict, test: np.ndarray, ref: np.ndarray | None, s: BaselineSettings) -> dict:
    """The baseline with the highest CV C-index and, given the model's ``ref`` log_hz, the model's score
    and its difference from that baseline in plain words."""
    best = max(res, key=lambda k: res[k]["cv_cindex"])
    out: dict = {"best": best}
    if ref is not None:
        t, e = data.time.astype(float), data.event.astype(bool)
        out["model"] = scored(t[test], e[test], ref, None, s)
        out["model_minus_best"] = {**res[best]["model_minus_this"], "verdict": ""}
        out["model_minus_best"]["verdict"] = verdict(out["model_minus_best"])
    return out


def mask_modality(data: CohortData, m: str) -> CohortData:
    """A copy of ``data`` with modality ``m`` removed for every patient (empty bags, or present = False)."""
    if m == "slides":
        assert data.bags is not None
        empty = [np.zeros((0, data.feature_dim), np.float32) for _ in data.bags]
        return replace(data, bags=empty, tiles=[[] for _ in data.bags])
    if m == "omics":
        assert data.omics_present is not None
        return replace(data, omics_present=np.zeros_like(data.omics_present, bool))
    if m == "clinical":
        assert data.clinical_present is not None
        return replace(data, clinical_present=np.zeros_like(data.clinical_present, bool))
    raise ValueError(f"modality '{m}': expected one of {', '.join(MODALITIES)}")


def modality_contributions(
    data: CohortData, predict_fn: PredictFn, settings: BaselineSettings | None = None, split: str = "test"
) -> dict:
    """The model's C-index on ``split`` with each modality masked at inference, and the drop from the full model.

    ``predict_fn(data, idx) -> log_hz [len(idx)]``. ``drop`` is C(full) - C(without), with the paired
    patient-bootstrap CI; a positive drop means the modality helps. The model is not retrained.
    """
    s = settings or BaselineSettings()
    idx = np.asarray(data.splits[split])
    t, e = data.time[idx].astype(float), data.event[idx].astype(bool)
    full = np.asarray(predict_fn(data, idx), float)
    out: dict = {"split": split, "how": "masked at inference (not retrained)", "full": scored(t, e, full, None, s)}
    for m in MODALITIES:
        if not _has(data, m):
            continue
        lh = np.asarray(predict_fn(mask_modality(data, m), idx), float)
        r = scored(t, e, lh, full, s)
        r["drop"] = r.pop("model_minus_this")
        out[f"without_{m}"] = r
    return out


def bundle_predict_fn(model_path: Path, trust_pickle: bool = False) -> PredictFn:
    """``predict_fn(data, idx) -> log_hz`` for a saved model (``model.safetensors``)."""
    from pipeline.training.bundle import load_bundle
    from pipeline.training.predict import predict as predict_model

    model, _ = load_bundle(model_path, trust_pickle=trust_pickle)  # trust_pickle: a legacy model.pt

    def predict(data: CohortData, idx: np.ndarray) -> np.ndarray:
        return predict_model(model, data, idx).log_hz

    return predict


def _saved_model(path: Path) -> tuple[object, Any] | None:
    """``(model, card)`` of the run's model file; None when there is none (or it is not read: a warning)."""
    from pipeline.training.bundle import load_bundle

    if not path.is_file():
        return None
    try:
        return load_bundle(path)
    except ValueError as e:  # a legacy pickle or an unreadable file: the baselines do without it
        log.warning("%s not read for the baselines: %s", path, e)
        return None


def add_to_run(
    out: Path, data: CohortData, predict_fn: PredictFn, n_boot: int = 200, seed: int = 0, cfg: RunConfig | None = None
) -> list[str]:
    """Baselines and modality contributions on the run's test split, added to ``out/metrics.json``
    (keys ``baselines`` and ``modality_contributions``); returns the console summary lines.

    With a federated ``cfg``, the linear family is also trained federated on the run's sites and split
    (:func:`pipeline.outputs.federated_linear.fit_federated_linear`), under ``baselines.federated_linear``;
    its checkpoints and privacy ledgers go to ``out/federated_linear/``. Where the run's model file (``out``'s) has a
    fitted offset that is that very fit (``model.skip=fitted``, :func:`~pipeline.outputs.federated_linear.run_offset`),
    the offset is the baseline: not fitted twice. The model file's ``model.skip`` choice (requested, used, why) is
    copied to ``metrics.json`` as ``model_skip``."""
    from pipeline.files import write_json

    s = BaselineSettings(n_boot=n_boot, seed=seed)
    rf = RunFiles(root=Path(out))
    path = rf.metrics
    m = json.loads(path.read_text())
    saved = _saved_model(rf.model)
    if saved is not None and "model_skip" in saved[1].train_info:
        m["model_skip"] = saved[1].train_info["model_skip"]
    ref = predict_fn(data, np.asarray(data.splits["test"]))
    try:
        m["baselines"] = fit_baselines(data, ref, s)
    except ValueError as e:  # too few events or patients: say so, keep the run
        log.warning("baselines not fitted: %s", e)
        m["baselines"] = {"label": "centralised", "baselines": {}, "notes": {"all": str(e)}}
    if cfg is not None and cfg.federated.enabled:
        from pipeline.outputs.federated_linear import fit_federated_linear, run_offset

        offset = run_offset(*saved, cfg) if saved is not None else None
        try:
            fl = fit_federated_linear(data, cfg, ref, s, Path(out) / "federated_linear", offset)
            fl["model_minus_this"]["verdict"] = verdict(fl["model_minus_this"])
            m["baselines"]["federated_linear"] = fl
        except ValueError as e:  # a site without training patients, too few sites: say so, keep the run
            log.warning("federated linear baseline not trained: %s", e)
            m["baselines"].setdefault("notes", {})["federated_linear"] = str(e)
    m["modality_contributions"] = modality_contributions(data, predict_fn, s)
    write_json(path, m)
    return summary_lines(m["baselines"], m["modality_contributions"])
