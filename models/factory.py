"""The model factory: a family name -> builder (``network``: :class:`MultimodalSurvival`, ``linear``:
:class:`LinearSurvival`), both taking the same inputs and returning :class:`~models.survival.SurvivalOutput`."""

from __future__ import annotations

from collections.abc import Callable

from models.linear import LinearSurvival
from models.survival import MultimodalSurvival

SurvivalModel = MultimodalSurvival | LinearSurvival


def _linear(feature_dim: int, n_genes: int, n_clinical: int, **kw: object) -> LinearSurvival:
    # the network's architecture settings (mil, fusion, hidden, ...) do not apply to a linear model
    return LinearSurvival(feature_dim, n_genes, n_clinical, n_bins=int(kw.get("n_bins", 0)))  # type: ignore[call-overload]


def _network(feature_dim: int, n_genes: int, n_clinical: int, **kw: object) -> MultimodalSurvival:
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
