"""The embedded runtime's Flower-free parts: its result, the site summaries an in-process site sends, and the
checks of the statistics exchange's results against what the in-process run uses (``embedded.py`` drives them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from data_specs.cohort import Cohort
from models.survival import MultimodalSurvival
from pipeline.federated.server import FederatedServer
from pipeline.federated.site import SiteClient
from pipeline.progress import fmt_seconds
from pipeline.training.data import CohortData

log = logging.getLogger(__name__)


@dataclass
class FederatedRun:
    """An embedded run's result: the kept ``model``, the rounds' ``info`` and the finish rounds' ``parts``
    (``cutpoints``, ``horizons``, ``baseline``, ``metrics``; None when they were not run)."""

    model: MultimodalSurvival
    info: dict
    parts: dict | None = None


class SiteInputs:
    """What an in-process site summarises in the statistics exchange: its own training patients, from its in-memory
    data, and ``cohort``'s raw omics/clinical tables (read once per run) as a deployed node reads its own."""

    def __init__(self, cohort: Cohort | None):
        self.cohort, self._read = cohort, False
        self.adata, self.clinical = None, None

    def event_times(self, client: SiteClient) -> tuple[np.ndarray, np.ndarray]:
        """``(time [P], event [P])`` of ``client``'s training patients."""
        tr = client.train_idx
        return client.data.time[tr].astype(float), client.data.event[tr].astype(bool)

    def summaries(self, client: SiteClient) -> dict:
        """``client``'s :func:`~pipeline.omics.normalise.site_summaries` of its own training patients (a deployed
        node's ``site.local_summaries``); none without a cohort (data built in memory: its normalisers are its own)."""
        from pipeline.omics.clinical import ClinicalNormaliser
        from pipeline.omics.normalise import site_summaries
        from pipeline.omics.readers import read_omics

        c = self.cohort
        if c is None:
            return {}
        if not self._read:
            self.adata = read_omics(c.omics) if c.omics is not None else None
            self.clinical = ClinicalNormaliser.read(c.clinical) if c.clinical is not None else None
            self._read = True
        ids = [client.data.patient_ids[i] for i in client.train_idx]
        values = c.omics.values if c.omics is not None else "counts"
        return site_summaries(client.site, ids, self.adata, values, self.clinical, client.cfg.federated.min_count)


def finish_rounds_apply(model: torch.nn.Module, data: CohortData, clients: list[SiteClient]) -> bool:
    """Whether the finish query rounds can give the run's model file: every client is one of the cohort's sites
    (a client over several sites' patients has no site to answer as) and the finish rounds' server model
    (``finish.server_model``: the trainable weights on a seeded network) is ``model``, which is not so when it
    has state the rounds do not carry (a slide standardisation: the linear family, ``model.skip``) and slide
    inputs. When not (a warning), the run's cut-points, horizons and baseline are computed in this process."""
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    other = sorted(set(model.state_dict()) - trainable - {"bin_edges"})
    if other and data.model_dims()["feature_dim"] > 0:
        log.warning("the finish rounds do not carry the model's slide statistics %s: cut-points, horizons and "
                    "baseline are computed in this process", other[:3])  # fmt: skip
        return False
    if strangers := sorted({c.site for c in clients} - set(data.sites)):
        log.warning("client(s) %s are not sites of the cohort: no finish rounds", strangers)
        return False
    return True


def check_exchange(data: CohortData, stats: dict, model: torch.nn.Module) -> None:
    """The statistics exchange's results against what the in-process run uses: the normalisers ``data`` was built
    with (a warning naming the field when they differ, e.g. a site left out of the federation was summarised),
    and its discrete-time bins, which the kept ``model`` takes."""
    for kind, norm in (("omics", data.omics_norm), ("clinical", data.clinical_norm)):
        if kind not in stats or norm is None:
            continue
        mine = norm.state()
        for key, v in stats[kind].items():
            same = (
                np.array_equal(v, mine.get(key))
                if not isinstance(v, np.ndarray)
                else (np.shape(v) == np.shape(mine.get(key)) and np.allclose(v, mine.get(key), rtol=1e-9, atol=1e-12))
            )
            if not same:
                log.warning("statistics exchange: the %s normaliser's %s differs from the one the run's data was "
                            "built with", kind, key)  # fmt: skip
    if "time_bins" in stats and getattr(model, "n_bins", 0):
        edges = torch.tensor(stats["time_bins"], dtype=torch.float64)
        if not torch.allclose(model.get_buffer("bin_edges").to(torch.float64), edges):
            log.warning("statistics exchange: discrete-time bins differ from the sites' own: the exchanged ones kept")
        model.set_bin_edges(edges)


def runtime_facts(server: FederatedServer, bytes_by_round: dict[str, dict[str, int]], start: int, took: float) -> dict:
    """Bytes each site sent per training round (into the server's history: Flower's group ids count the rounds of
    this call from 1) and the seconds the run took."""
    for rec in server.history:
        per = bytes_by_round.get(str(rec["round"] - start + 1))
        if per:
            rec["bytes_sent_per_site"] = {s: int(b) for s, b in per.items()}
    log.info("federated: %d round(s) in %s", len(server.history) - start, fmt_seconds(took))
    return {"runtime": "embedded", "seconds": took}
