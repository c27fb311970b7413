"""The Flower apps: one ClientApp and one ServerApp, run unchanged by two runtimes.

- Embedded (default, ``histofuse train``): :class:`InProcessGrid` implements Flower's ``Grid`` in-process,
  so the real ServerApp workflow and ClientApp (with its mods) exchange real ``Message`` objects without
  Ray, sockets or threads; deterministic.
- Deployment: ``client_app`` / ``server_app`` below are the ``[tool.flwr.app.components]`` of the project;
  a SuperLink on the coordinator, one SuperNode per site (``--node-config "site='NAME' cohort='SPEC'"``),
  ``flwr run``. See README "Across hospitals" and ``scripts/flower/``.

The server runs Flower's legacy workflow (``LegacyContext`` + ``DefaultWorkflow``) because SecAgg+ is
available only there: ``fit_workflow=SecAggPlusWorkflow(...)`` when ``federated.secagg`` is on, with the
client's ``secaggplus_mod`` engaged by the SecAgg+ stage messages. Strategy maths, DP, validation pooling
and checkpoints live in :class:`pipeline.federated.FederatedServer`; local training in
:class:`pipeline.federated.SiteClient`. Neither imports Flower; this module adapts them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from data_specs.config import RunConfig
from pipeline.federated.protocol import STATS_KEY, Arrays, Evaluation, Update, _dumps, _loads
from pipeline.federated.site import SiteClient

log = logging.getLogger(__name__)


class HistofuseClient(NumPyClient):
    """A :class:`SiteClient` behind Flower's NumPyClient interface (arrays travel as an ordered list)."""

    def __init__(self, site: SiteClient):
        self.site = site
        self.names = list(site.initial_arrays())

    def _arrays(self, parameters: list[np.ndarray]) -> Arrays:
        if len(parameters) != len(self.names):
            raise ValueError(f"site {self.site.site}: got {len(parameters)} arrays, the model has {len(self.names)}")
        return dict(zip(self.names, parameters, strict=True))

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return list(self.site.initial_arrays().values())

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        upd: Update = self.site.fit(self._arrays(parameters), config)
        metrics = {**upd.metrics, "site": self.site.site}
        return [upd.arrays[k] for k in self.names], upd.num_examples, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        ev: Evaluation = self.site.evaluate(self._arrays(parameters), config)
        m = ev.metrics
        loss = m["loss_sum"] / m["events"] if m.get("events") else 0.0
        return float(loss), ev.num_examples, {**m, "site": self.site.site}


def _secagg_when_asked(msg: Message, ctxt: Context, call_next) -> Message:
    """Engage Flower's ``secaggplus_mod`` for SecAgg+ stage messages; plain train messages pass through."""
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if cfg is not None and Key.STAGE in cfg:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def make_client_app(client_fn, mods: list | None = None) -> ClientApp:
    """The one ClientApp recipe: ``client_fn(context) -> SiteClient``, wrapped, with the SecAgg+ mod."""
    return ClientApp(
        client_fn=lambda context: HistofuseClient(client_fn(context)).to_client(),
        mods=[*(mods or []), _secagg_when_asked],
    )


def _run_config(user_config: dict) -> RunConfig:
    """The histofuse run config from Flower's run config (``config`` YAML path, ``overrides``, ``out``)."""
    from data_specs import resolve_config

    ov = [o.strip() for o in str(user_config.get("overrides", "")).split(";") if o.strip()]
    yaml_path = str(user_config.get("config", "")) or None
    out = str(user_config.get("out", "")) or None
    return resolve_config(yaml_path, ov, out=out)


_DEPLOYED: dict[tuple, SiteClient] = {}


def _node_site(context: Context) -> tuple[str, Path, RunConfig]:
    nc = context.node_config
    for key in ("site", "cohort"):
        if not str(nc.get(key, "")):
            raise ValueError(
                f"SuperNode --node-config lacks '{key}' (got {dict(nc)}); e.g. \"site='A' cohort='a.yaml'\""
            )
    return str(nc["site"]), Path(str(nc["cohort"])), _run_config(dict(context.run_config))


def _local_summaries(context: Context) -> dict:
    """This site's omics/clinical summaries of its own training patients (counts, sums, sums of squares)."""
    from data_specs import load_cohort
    from pipeline.omics.clinical import ClinicalNormaliser
    from pipeline.omics.normalise import OmicsNormaliser
    from pipeline.omics.readers import read_omics
    from pipeline.training.splits import assign_splits

    site, spec, cfg = _node_site(context)
    cohort = load_cohort(spec)
    t = cfg.train
    splits = assign_splits(cohort, t.val_fraction, t.test_fraction, t.seed)
    train_ids = [cohort.patients[i].patient_id for i in splits["train"] if cohort.patients[i].site == site]
    out: dict = {}
    if cohort.omics is not None:
        adata = read_omics(cohort.omics)
        out["omics"] = OmicsNormaliser.site_summary(adata, train_ids, cohort.omics.values)
    if cohort.clinical is not None:
        out["clinical"] = ClinicalNormaliser.site_summary(ClinicalNormaliser.read(cohort.clinical), train_ids)
    return out


def _cohort_statistics_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Site side of the statistics exchange: answer ``query.summaries`` with this site's summaries; keep
    the cohort-level normalisers sent in ``query.normalisers`` in the node's state for later rounds."""
    kind = msg.metadata.message_type
    if kind == "query.summaries":
        body = _dumps(_local_summaries(ctxt))
        return Message(RecordDict({"summaries": ConfigRecord({"json": body})}), reply_to=msg)
    if kind == "query.normalisers":
        ctxt.state.config_records[STATS_KEY] = ConfigRecord({"json": str(msg.content.config_records["stats"]["json"])})
        return Message(RecordDict({"ack": ConfigRecord({"ok": True})}), reply_to=msg)
    return call_next(msg, ctxt)


def _deployed_site(context: Context) -> SiteClient:
    """A SuperNode's site: ``node_config`` names it (``site``) and its cohort spec (``cohort``).

    The cohort spec lists the site's own patients (other sites' patients, if present, are ignored). The
    omics/clinical normalisers are the cohort-level ones the ServerApp computed from every site's summaries
    before training; a node that missed that exchange fits them on its own training patients (warning).
    """
    from data_specs import load_cohort
    from pipeline.omics.clinical import ClinicalNormaliser
    from pipeline.omics.normalise import OmicsNormaliser

    site, spec, cfg = _node_site(context)
    rec = context.state.config_records.get(STATS_KEY)
    stats_json = str(rec["json"]) if rec is not None else ""
    key = (site, str(spec.resolve()), cfg.digest(), stats_json)
    if key not in _DEPLOYED:
        cohort = load_cohort(spec)
        if site not in cohort.sites:
            raise ValueError(f"{spec}: node site '{site}' has no patients (sites: {cohort.sites})")
        stats = _loads(stats_json) if stats_json else {}
        if not stats:
            log.warning("site %s: no cohort-level statistics received; normalising on its own training patients", site)
        from pipeline.training.data import load_run_data

        data = load_run_data(
            cohort,
            cfg,
            out=Path(str(context.node_config.get("out", cfg.out))),
            omics_norm=OmicsNormaliser.from_state(stats["omics"]) if "omics" in stats else None,
            clinical_norm=ClinicalNormaliser.from_state(stats["clinical"]) if "clinical" in stats else None,
        )
        tr, va = data.subset_sites(data.splits["train"])[site], data.subset_sites(data.splits["val"])[site]
        rank = int(context.node_config.get("rank", data.sites.index(site)))
        _DEPLOYED[key] = SiteClient(site, data, tr, va, cfg, rank)
    return _DEPLOYED[key]


client_app = make_client_app(_deployed_site, [_cohort_statistics_mod])
