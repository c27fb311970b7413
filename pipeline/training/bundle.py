"""The model file: the only code that writes or reads it.

One ``model.safetensors``: the weights as safetensors tensors, and in the header's metadata the
:class:`~data_specs.artifacts.ModelCard` as JSON (config, input sizes, normaliser states, cut-points,
baseline on a coarse grid, a digest of the training splits (no patient id), and each tensor's shape plus a
SHA-256 of the weights). Reading parses JSON and raw tensor bytes only, so a file from another hospital
cannot run code. A legacy ``.pt`` pickle is refused unless the caller passes ``trust_pickle=True``; a
truncated, tampered or foreign file raises :class:`ModelFileError` naming the path and what is wrong.
:func:`data_for_model` aligns a cohort to a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from data_specs.artifacts import MODEL_FORMAT, Cutpoints, FeatureAttrs, ModelCard, TensorSpec
from data_specs.cohort import Cohort
from data_specs.config import RunConfig
from models import build_model
from models.survival import MultimodalSurvival
from pipeline.files import json_safe, write_bytes
from pipeline.training.data import CohortData, build_data
from pipeline.training.module import model_kwargs
from pipeline.training.predict import predict
from pipeline.training.splits import assign_splits

log = logging.getLogger(__name__)

CARD_KEY = "histofuse_card"  # the safetensors metadata entry holding the card JSON
_LEGACY_FORMATS = ("histofuse-model/1", "histofuse-model/2")


class ModelFileError(ValueError):
    """A model file that cannot be used: truncated, tampered, not a histofuse model, or an untrusted pickle."""


class PickleModelError(ModelFileError):
    """A legacy pickled model file (``model.pt``) opened without ``trust_pickle=True``."""


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split_digest(patient_ids: list[str], splits: dict[str, np.ndarray]) -> str:
    """SHA-256 over the sorted ``patient_id<TAB>split`` lines: one value naming a cohort's split, no id in it."""
    lines = sorted(f"{patient_ids[i]}\t{s}" for s, idx in splits.items() for i in idx)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def make_card(model: MultimodalSurvival, data: CohortData, cfg: RunConfig, **extra: Any) -> ModelCard:
    """The card for ``model`` trained on ``data``: cut-points from its training patients' risks (histograms), the
    :func:`split_digest` of ``data``'s splits.

    ``extra``: further card fields (``train_info``, ``horizons``, ``baseline``); never ``splits`` (patient ids).
    """
    from pipeline.stats.curves import risk_cutpoints

    tr = data.splits["train"]
    # from the sum of the sites' log-hazard histograms (federated: bins of fewer than federated.min_count merged),
    # never a training patient's own log hazard
    k = cfg.federated.min_count if cfg.federated.enabled else 1
    cut = risk_cutpoints(predict(model, data, tr).log_hz, data.site[tr], k)
    return card_from_parts(
        model,
        cfg,
        data.model_dims(),
        cut,
        features=data.feature_attrs,
        omics=data.omics_norm.state() if data.omics_norm else None,
        clinical=data.clinical_norm.state() if data.clinical_norm else None,
        sites=data.sites,
        split_digest=split_digest(data.patient_ids, data.splits),
        **extra,
    )


def card_from_parts(
    model: MultimodalSurvival, cfg: RunConfig, model_dims: dict[str, int], cutpoints: dict, **fields: Any
) -> ModelCard:
    """The card of ``model`` from aggregates alone (what a deployment's server holds): input sizes, risk
    cut-points, and further card fields (``features``, ``omics``/``clinical`` normaliser states, ``sites``,
    ``horizons``, ``baseline``, ``train_info``, ``split_digest``); never ``splits`` (patient ids).
    ``time_bins`` and the tensor specs and digest are read off ``model``."""
    if fields.get("splits"):
        raise ValueError("a model card holds no patient ids: pass no 'splits' (the card keeps their digest)")
    fields.pop("splits", None)
    state = model.state_dict()
    return ModelCard(
        config=cfg,
        model_dims=dict(model_dims),
        time_bins=model.get_buffer("bin_edges").tolist() if model.n_bins else None,
        cutpoints=Cutpoints(**cutpoints),
        tensors={k: TensorSpec(shape=list(v.shape), dtype=str(v.dtype)) for k, v in state.items()},
        weights_sha256=weights_digest(state),
        **json_safe(fields),
    )


def save_bundle(path: Path, model: MultimodalSurvival, data: CohortData, cfg: RunConfig, extra: dict) -> ModelCard:
    """Write the model file (atomically): weights + card. Returns the card written."""
    return save_model(path, model, make_card(model, data, cfg, **extra))


def save_model(path: Path, model: MultimodalSurvival, card: ModelCard) -> ModelCard:
    """Write ``model``'s weights with ``card`` (from :func:`make_card` or :func:`card_from_parts`) atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    write_bytes(path, save(tensors, metadata={CARD_KEY: card.model_dump_json()}))
    return card


def _is_pickle(raw: bytes) -> bool:
    """A torch.save zip archive or a raw pickle. A safetensors file (8-byte header length, then ``{``) never is,
    even when the header length's low byte is 0x80, a pickle's first byte."""
    if raw[8:9] == b"{":
        return False
    return raw[:4] == b"PK\x03\x04" or raw[:1] == b"\x80"


def _read_header(path: Path, raw: bytes) -> dict:
    if len(raw) < 8:
        raise ModelFileError(f"{path}: {len(raw)} bytes: not a model file (truncated or empty)")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ModelFileError(f"{path}: header of {n} bytes but the file has {len(raw)}: truncated or not a model file")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: unreadable safetensors header ({e}): not a model file") from e
    if not isinstance(header, dict) or CARD_KEY not in (header.get("__metadata__") or {}):
        raise ModelFileError(f"{path}: a safetensors file without a histofuse model card")
    return header


def read_card(path: Path, trust_pickle: bool = False) -> ModelCard:
    """The model file's card, without building the network (weights are not checked here)."""
    return _read(Path(path), trust_pickle, weights=False)[0]


def _read(path: Path, trust_pickle: bool, weights: bool) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    raw = path.read_bytes()
    if _is_pickle(raw[:9]):
        if not trust_pickle:
            raise PickleModelError(
                f"{path}: a legacy pickled model file; loading a pickle runs any code it carries. Retrain, or pass "
                "--trust-pickle (trust_pickle=True) only for a file you made yourself"
            )
        return _read_legacy(path)
    header = _read_header(path, raw)
    try:
        card = ModelCard.model_validate_json(header["__metadata__"][CARD_KEY])
    except ValidationError as e:
        raise ModelFileError(f"{path}: invalid model card: {e}") from e
    if card.format != MODEL_FORMAT:
        raise ModelFileError(f"{path}: model format {card.format!r}; this version reads {MODEL_FORMAT!r}")
    if not weights:
        return card, {}
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(raw)
    except SafetensorError as e:
        raise ModelFileError(f"{path}: unreadable weights ({e}): truncated or corrupted") from e
    _check_weights(path, card, state)
    return card, state


def _check_weights(path: Path, card: ModelCard, state: dict[str, torch.Tensor]) -> None:
    have = {k: TensorSpec(shape=list(v.shape), dtype=str(v.dtype)) for k, v in state.items()}
    if have != card.tensors:
        diff = sorted(set(have) ^ set(card.tensors)) or [k for k in card.tensors if have[k] != card.tensors[k]]
        raise ModelFileError(f"{path}: weights do not match the card's tensor shapes/dtypes (e.g. {diff[:3]})")
    if weights_digest(state) != card.weights_sha256:
        raise ModelFileError(f"{path}: weights do not match the card's SHA-256: the file was altered or corrupted")


def _read_legacy(path: Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """A format /1 or /2 pickle (trusted by the caller), converted to a card and a state dict."""
    b = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(b, dict) or b.get("format") not in _LEGACY_FORMATS:
        fmt = b.get("format") if isinstance(b, dict) else "?"
        raise ModelFileError(f"{path}: not a histofuse model bundle (format {fmt}; pickles read: {_LEGACY_FORMATS})")
    state = dict(b["state_dict"])
    if b["format"] == "histofuse-model/1":  # /1 had a bias on the attention score: a no-op under softmax
        state.pop("mil.attn_w.bias", None)
    fields = ("omics", "clinical", "sites", "time_bins", "cutpoints", "horizons", "baseline", "train_info", "splits")
    known = {k: b[k] for k in fields if b.get(k) is not None}
    try:
        card = ModelCard(
            config=RunConfig.model_validate(b["config"]),  # keys a /1 file lacks take their (old) defaults
            model_dims=b["model_dims"],
            features=FeatureAttrs.from_h5_attrs(b["features"]) if b.get("features") else None,
            tensors={k: TensorSpec(shape=list(v.shape), dtype=str(v.dtype)) for k, v in state.items()},
            weights_sha256=weights_digest(state),
            **json_safe(known),
        )
    except ValidationError as e:
        raise ModelFileError(f"{path}: legacy model file with an invalid card: {e}") from e
    return card, state


def load_bundle(path: Path, trust_pickle: bool = False) -> tuple[MultimodalSurvival, ModelCard]:
    """Rebuild the model from its file; returns ``(model in eval mode, card)``.

    Raises:
        PickleModelError: a legacy ``.pt`` pickle and ``trust_pickle`` is False.
        ModelFileError: truncated, tampered (weights differ from the card) or not a histofuse model file.
    """
    path = Path(path)
    card, state = _read(path, trust_pickle, weights=True)
    model = build_model(**card.model_dims, **model_kwargs(card.config.model, card.config.train))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not fit the network the card describes: {e}") from e
    return model.eval(), card


def data_for_model(cohort: Cohort, card: ModelCard, fdir: Path | None) -> CohortData:
    """Align a (possibly new) cohort to a trained model: its gene panel, normalisation and encoder."""
    from pipeline.omics.clinical import ClinicalNormaliser
    from pipeline.omics.normalise import OmicsNormaliser

    if card.model_dims["n_genes"] and cohort.omics is None:
        log.warning("the model uses omics but the cohort has none: every patient's omics is masked")
    splits = cohort_splits(cohort, card)
    data = build_data(
        cohort,
        fdir,
        splits=splits,
        omics_norm=OmicsNormaliser.from_state(card.omics) if card.omics else None,
        clinical_norm=ClinicalNormaliser.from_state(card.clinical) if card.clinical else None,
        expect_features=card.features,
    )
    check_dims(data, card)
    return data


def cohort_splits(cohort: Cohort, card: ModelCard) -> dict[str, np.ndarray]:
    """The model's own splits when ``cohort`` is the one it was trained on (the training split rule re-run
    matches the card's :func:`split_digest`); otherwise each patient's manifest ``split``, or ``predict``.
    A legacy card's ``splits`` (patient ids) are used as they are."""
    if card.splits:
        labels = np.array([card.splits.get(p.patient_id, p.split or "predict") for p in cohort.patients])
    else:
        t = card.config.train
        own = assign_splits(cohort, t.val_fraction, t.test_fraction, t.seed, t.test_sites)
        if card.split_digest and split_digest([p.patient_id for p in cohort.patients], own) == card.split_digest:
            return {**own, "predict": np.zeros(0, int)}
        log.info("the cohort is not the model's training cohort: splits from its manifest, else 'predict'")
        labels = np.array([p.split or "predict" for p in cohort.patients])
    return {s: np.flatnonzero(labels == s) for s in ("train", "val", "test", "predict")}


def check_dims(data: CohortData, card: ModelCard) -> None:
    """``ValueError`` naming each input size where the cohort's data differs from the model's."""
    if data.model_dims() != card.model_dims:
        have, want = data.model_dims(), card.model_dims
        diff = ", ".join(f"{k} {have.get(k)} (model: {want.get(k)})" for k in want if have.get(k) != want.get(k))
        raise ValueError(f"the cohort does not match the model: {diff}")
