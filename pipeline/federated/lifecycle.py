"""A federated run's lifecycle at the server, Flower-free: what both runtimes do around the training rounds.

:func:`~pipeline.federated.server_app.run_server` (the ServerApp body of the deployment and of the embedded
runtime) runs the statistics exchange, the training rounds and then :func:`after_training`: the history of the
rounds, and the post-training query rounds of :mod:`pipeline.federated.finish` (moments, cut-points, horizons,
baseline, test pair counts), each answered by the sites from their own patients. A deployment writes its run
folder with :func:`write_deployment`: the model file, metrics and summary (``finish.write_outputs``) and what
``histofuse report`` needs to build a report from them (:data:`SITE_LOCAL`: what stays at the sites).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from data_specs.config import RunConfig
from pipeline.federated.finish import Ask, finish_run, write_outputs
from pipeline.federated.server import FederatedServer
from pipeline.files import write_json

log = logging.getLogger(__name__)

HISTORY_FILE = "federated_history.json"  # in the run folder's federated/, beside the server checkpoint
SITE_LOCAL_FILE = "site_local.json"  # a deployment's run folder: what the server does not have (report)

# What a deployment's server never holds (it stays at each site): the report lists it instead of showing it
SITE_LOCAL = {
    "risk_scores.<site>.csv": "each site's patients' log hazards, risk groups, times and events (written at the site)",
    "survival curves": "per-patient survival curves (computed at a site from the model file's baseline)",
    "Kaplan-Meier and td-AUC plots, IBS, Uno's C, bootstrap CIs": "need per-patient times and risks",
    "cohort table": "patients, events and follow-up per site and split",
    "centralised baselines (Coxnet, clinical Cox)": "fitted on pooled patient rows",
    "attributions and biomarker table": "tile and gene attributions of each site's patients",
}


@dataclass
class LifecycleResult:
    """What the server holds after a run: ``info`` (the rounds' summary and the sites), ``stats`` (the statistics
    exchange's normalisers, discrete-time bins and follow-up ceilings) and ``parts`` (the finish rounds' model,
    card fields and metrics; None when they were not run)."""

    info: dict
    stats: dict
    parts: dict | None = None
    sites: list[str] = field(default_factory=list)


def warn_unset_min_sites(cfg: RunConfig, roster: int) -> None:
    """A deployment without ``federated.min_sites``: every node connected at the statistics exchange must answer."""
    if cfg.federated.min_sites is None:
        log.warning(
            "federated.min_sites not set: every one of the %d SuperNode(s) connected now must answer every round "
            "(set federated.min_sites to the consortium's size so the run waits for late sites)",
            roster,
        )


def after_training(
    ask: Ask | None, cfg: RunConfig, stats: dict, server: FederatedServer, node_site: dict[int, str]
) -> LifecycleResult:
    """The rounds' summary (``federated_history.json`` in the server's folder, written before the finish rounds
    so a failed finish keeps it), then, with ``ask``, the finish query rounds on the kept weights."""
    sites = sorted(set(node_site.values()))
    info = {**server.summary(), "sites": sites}
    if server.out is not None:
        write_json(Path(server.out) / HISTORY_FILE, info)
    log.info("federated run finished: best round %d", info["best_round"])
    if ask is None:
        return LifecycleResult(info, stats, None, sites)
    assert server.best is not None
    return LifecycleResult(info, stats, finish_run(ask, cfg, stats, server.best[2]), sites)


def write_deployment(root: Path, cfg: RunConfig, result: LifecycleResult) -> dict[str, Path]:
    """A deployment's run folder from the server's aggregates: model file, ``metrics.json``,
    ``train_summary.json``, ``config.yaml`` (``finish.write_outputs``) and :data:`SITE_LOCAL_FILE` (what the
    report cannot show: it stays at the sites), so ``histofuse report ROOT`` builds from it."""
    assert result.parts is not None, "the finish rounds were not run"
    metrics = result.parts.get("metrics", {})
    local = {
        "runtime": "deployment",
        "site_local": SITE_LOCAL,
        "sites": result.parts.get("sites", result.sites),
        "sites_without_metrics": metrics.get("sites_without_metrics", []),
    }
    site_local = write_json(Path(root) / SITE_LOCAL_FILE, local)  # first: train_summary.json is written last
    info = {"mode": "federated", "runtime": "deployment", **result.info}
    written = {**write_outputs(Path(root), cfg, result.stats, result.parts, info), "site_local": site_local}
    log.info("model and test metrics from the sites' aggregates: %s", ", ".join(str(p) for p in written.values()))
    return written
