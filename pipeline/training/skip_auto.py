"""``model.skip=auto``, the default: the fitted linear offset where it can run, the plain network otherwise.

:func:`resolve_skip` replaces ``model.skip=auto`` and ``train.residual_penalty=auto`` by the values a run uses, once,
before anything is built or saved (``pipeline.stages.stage_train``; ``fit_local`` and the embedded federated run do it
for callers that have not), so ``config.yaml`` and the model file hold them and ``predict`` rebuilds the same
network. Why ``fitted`` cannot run: it is a Cox model fitted to its optimum (``train.linear_fit=cv``), and federated
its fit's messages get neither DP nor SecAgg+, needs sites with enough non-test patients for the minimum count, and a
Flower deployment's ServerApp cannot fit it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from data_specs.config import RunConfig
    from pipeline.training.data import CohortData

log = logging.getLogger(__name__)

# train.residual_penalty=auto with model.skip=fitted (docs/benchmarks.md, "A network that starts from the fitted
# linear model": penalty 1 was the best without validation and within 0.005 of 0 with it)
FITTED_RESIDUAL_PENALTY = 1.0


RUNTIMES = ("centralised", "embedded", "deployment")  # resolve_skip's runtime: where the model trains


def _why_not_fitted(cfg: RunConfig, data: CohortData | None, runtime: str) -> str | None:
    """Why ``model.skip=fitted`` cannot run with ``cfg`` in ``runtime`` (and ``data``, when given); None where it
    can."""
    m, t, fc = cfg.model, cfg.train, cfg.federated
    federated = runtime != "centralised"
    if m.family != "network":
        return f"model.family={m.family} has no network to start from a linear offset"
    if t.loss != "cox":
        return f"train.loss={t.loss}: the fitted offset is a Cox model"
    if t.linear_fit != "cv":
        return f"train.linear_fit={t.linear_fit}: the offset is the linear family's full-batch fit (linear_fit=cv)"
    if runtime == "deployment":
        return "a Flower deployment: its ServerApp cannot fit the offset (train model.skip=fitted embedded)"
    if federated and fc.dp_noise > 0:
        return f"federated.dp_noise={fc.dp_noise:g}: the offset's federated fit gets no differential privacy"
    if federated and fc.secagg:
        return "federated.secagg=true: the offset's federated fit is not masked by SecAgg+"
    if federated and data is not None:
        return _federated_fit_gap(data, cfg)
    return None


def _federated_fit_gap(data: CohortData, cfg: RunConfig) -> str | None:
    """Why no site could take part in the offset's federated fit (None: at least one can). A site takes part when
    every fold fit keeps at least ``federated.min_count`` (k) of its non-test patients, and its CV score, over
    all of them, is sent when they hold k patients and k events (``pipeline.federated.linear_sites``)."""
    k, n_folds = cfg.federated.min_count, cfg.train.linear_cv_folds
    idx = np.concatenate([data.splits["train"], data.splits["val"]]).astype(int)
    counts = {s: (len(g), int(data.event[g].sum())) for s, g in data.subset_sites(idx).items()}
    if any(n - -(-n // n_folds) >= k and ev >= k for n, ev in counts.values()):
        return None
    per_site = ", ".join(f"{s} {n}/{ev}" for s, (n, ev) in counts.items())
    return (
        f"no site has enough non-test patients for the offset's federated fit (federated.min_count={k} patients in "
        f"each of its {n_folds} fold fits and {k} events; patients/events per site: {per_site})"
    )


def resolve_skip(cfg: RunConfig, data: CohortData | None = None, runtime: str | None = None) -> tuple[RunConfig, dict]:
    """``cfg`` with ``model.skip=auto`` and ``train.residual_penalty=auto`` replaced by the values the run uses.

    auto is ``fitted`` where the fitted offset can run: the network family, the Cox loss, ``train.linear_fit=cv``,
    centralised or embedded federated without DP or SecAgg+ (whose protections the offset's fit does not get) and,
    federated with ``data`` given, a site with enough non-test patients for the fit's minimum count; otherwise
    ``none``, with one log line naming the reason. ``runtime``: one of :data:`RUNTIMES` (default: ``embedded`` when
    ``federated.enabled``, else ``centralised``); in a Flower ``deployment``, whose ServerApp cannot fit the offset,
    auto is ``none`` and an explicit ``fitted`` is refused (``ValueError``). The residual penalty's auto is
    :data:`FITTED_RESIDUAL_PENALTY` with ``fitted``, else 0. A resolved config is returned unchanged (call it once,
    before anything is built or saved: the saved config and model file then hold the values used).

    Returns the config and a record for the run's summary: ``requested``, ``used``, ``reason``, ``runtime``,
    ``residual_penalty``.
    """
    runtime = runtime or ("embedded" if cfg.federated.enabled else "centralised")
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime '{runtime}': valid names are {list(RUNTIMES)}")
    requested, used = cfg.model.skip, cfg.model.skip
    if requested == "auto":
        why_not = _why_not_fitted(cfg, data, runtime)
        used = "none" if why_not else "fitted"
        reason = why_not or "the fitted offset can run here (Cox loss, train.linear_fit=cv, no DP, no SecAgg+)"
        log.info("model.skip=auto -> %s: %s", used, reason)
    else:
        reason = "set in the config"
        if runtime == "deployment" and used == "fitted":
            raise ValueError(
                "model.skip=fitted cannot run in a Flower deployment (its ServerApp cannot fit the offset): use "
                "model.skip=auto (none here), none or linear, or train it embedded (histofuse train)"
            )
    pen = cfg.train.residual_penalty
    penalty = residual_penalty(used, pen)
    record = {"requested": requested, "used": used, "reason": reason, "runtime": runtime, "residual_penalty": penalty}
    if used == requested and pen != "auto":
        return cfg, record
    return cfg.with_overrides([f"model.skip={used}", f"train.residual_penalty={penalty}"]), record


def residual_penalty(skip: str, penalty: float | str) -> float:
    """The residual penalty a model of ``skip`` trains with (``auto``: :data:`FITTED_RESIDUAL_PENALTY` with
    ``fitted``, else 0)."""
    if penalty == "auto":
        return FITTED_RESIDUAL_PENALTY if skip == "fitted" else 0.0
    return float(penalty)
