"""A ``model.skip=fitted`` network's offset fitted federated before the rounds (Flower-free).

The offset is the linear family (:class:`models.linear.LinearSurvival`) fitted to its optimum from summed full-batch
site gradients, its penalty by federated CV (:func:`pipeline.federated.linear_sites.train_linear_federated`: the same
fit as the run's federated linear baseline, its messages in the privacy ledger). Its weights are then part of the
rounds' global arrays and reach every site unchanged: they get no gradient and no optimiser step, so every site's
update of them is exactly 0 under FedAvg, FedProx, FedAdam, FedYogi and FedSGD. Its buffers (slide standardisation,
the slide projection) are not trainable arrays: each in-process site's model builder is given the fitted offset's
state. A deployment would have to send that state to the sites; it is not built (a deployment resolves
``model.skip=auto`` to ``none`` and refuses ``fitted``: train it embedded). The fit's record keeps its CV candidates,
so the run's federated linear baseline (:mod:`pipeline.outputs.federated_linear`) reuses this fit instead of
repeating it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from data_specs.config import RunConfig
    from models.survival import MultimodalSurvival
    from pipeline.federated.site import SiteClient
    from pipeline.training.data import CohortData


def fit_offset_federated(
    model: MultimodalSurvival, data: CohortData, cfg: RunConfig, out: Path | None, clients: list[SiteClient]
) -> dict | None:
    """``model.skip=fitted``: the linear family fitted federated first (summed full-batch site gradients, penalty by
    federated CV; its messages in the privacy ledger) and copied into ``model``'s frozen offset, whose weights then
    travel in the rounds' arrays unchanged (no gradient, not optimised). Returns the fit's record, its CV candidates
    included (None: no offset).
    ``ValueError`` under DP or SecAgg+, whose protections the linear fit's messages do not get."""
    if getattr(model, "offset", None) is None:
        return None
    from pipeline.federated.linear_sites import full_batch_linear, train_linear_federated
    from pipeline.training.module import offset_config, set_offset

    lin_cfg = offset_config(cfg)
    if not full_batch_linear(lin_cfg):
        raise ValueError("model.skip=fitted: the offset's federated fit has no DP or SecAgg+; use model.skip=linear")
    linear, info = train_linear_federated(data, lin_cfg, out)
    set_offset(model, linear)
    for client in clients:  # every site's models carry the fitted offset (weights and buffers)
        client.new_model = _with_offset(client.new_model, linear)  # type: ignore[method-assign]
    return {**info["linear_fit"], "candidates": info["cv_candidates"]}


def _with_offset(build: Callable[[], torch.nn.Module], fitted: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    from pipeline.training.module import set_offset

    def new_model() -> torch.nn.Module:
        model = build()
        set_offset(model, fitted)
        return model

    return new_model
