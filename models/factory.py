"""The model factory: a family name -> builder (``network``: :class:`MultimodalSurvival`, ``linear``:
:class:`LinearSurvival`), both taking the same inputs and returning :class:`~models.survival.SurvivalOutput`.

A network with ``skip="fitted"`` gets the linear family's model (built by the ``linear`` builder, so with the same
settings) as its frozen offset; the pipeline fits it before the network trains."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from models.linear import LinearSurvival
from models.survival import MultimodalSurvival

SurvivalModel = MultimodalSurvival | LinearSurvival


def _linear(feature_dim: int, n_genes: int, n_clinical: int, **kw: object) -> LinearSurvival:
    # the network's architecture settings (mil, fusion, hidden, ...) do not apply to a linear model. Its slide
    # projection (model.linear_slide_pcs) is not built here: the full-batch fits give it its rank and directions
    # (pipeline.training.slide_norm.prepare_slide_projection, centralised and federated), and a model file's state
    # brings its own shapes; the mini-batch path (train.linear_fit=sgd, DP / SecAgg+) computes none, so a projection
    # built here would stay empty there and silence the slide term (tests/test_linear_mix.py)
    return LinearSurvival(feature_dim, n_genes, n_clinical, n_bins=int(kw.get("n_bins", 0)))  # type: ignore[call-overload]


def _network(feature_dim: int, n_genes: int, n_clinical: int, **kw: object) -> MultimodalSurvival:
    if kw.get("skip") == "fitted":  # the offset: the linear family's model, fitted and frozen by the pipeline
        kw = {**kw, "offset": MODEL_FAMILIES["linear"](feature_dim, n_genes, n_clinical, **kw)}
    # the linear family's own settings do not apply to the network
    kw = {k: v for k, v in kw.items() if k in inspect.signature(MultimodalSurvival).parameters}
    return MultimodalSurvival(feature_dim, n_genes, n_clinical, **kw)  # type: ignore[arg-type]


MODEL_FAMILIES: dict[str, Callable[..., SurvivalModel]] = {"network": _network, "linear": _linear}


def build_model(
    feature_dim: int, n_genes: int, n_clinical: int, family: str = "network", **kw: object
) -> SurvivalModel:
    """The survival model of ``family`` sized for the cohort's modalities; ``kw`` are the network's keyword
    arguments (``MultimodalSurvival``; the linear family reads only ``n_bins``).

    Raises:
        ValueError: an unknown family (listing the valid names), or what the family's model raises.
    """
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family '{family}': valid names are {sorted(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[family](feature_dim, n_genes, n_clinical, **kw)
