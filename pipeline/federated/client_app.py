"""The Flower ClientApp: a :class:`~pipeline.federated.site.SiteClient` behind Flower's client interface.

``make_client_app`` is the one recipe both runtimes use (embedded: ``embedded.py``; deployment:
``client_app`` below, the ``[tool.flwr.app.components]`` clientapp run by each SuperNode with
``--node-config "site='NAME' cohort='SPEC'"``). It adds Flower's ``secaggplus_mod`` for SecAgg+ stage
messages, and a deployed node answers the statistics exchange (``query.summaries`` /
``query.normalisers``) with :func:`~pipeline.federated.site.local_summaries`. Local training, the
site's data and its summaries live in ``site.py``; this module only adapts them to Flower messages.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common.recorddict_compat import recorddict_to_evaluateres, recorddict_to_fitres

from data_specs.config import RunConfig
from pipeline.federated.policy import (
    DisclosureError,
    SiteFacts,
    check_evaluate_reply,
    check_fit_reply,
    check_summaries,
)
from pipeline.federated.protocol import (
    REPEATING_ERRORS,
    STATS_KEY,
    Arrays,
    Evaluation,
    Update,
    decode_record,
    encode_record,
    run_config_from_flower,
    site_data_error,
)
from pipeline.federated.site import SiteClient, deployed_client, local_summaries

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
        try:
            upd: Update = self.site.fit(self._arrays(parameters), config)
        except REPEATING_ERRORS as e:
            raise site_data_error(self.site.site, e) from e
        metrics = {**upd.metrics, "site": self.site.site}
        return [upd.arrays[k] for k in self.names], upd.num_examples, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        try:
            ev: Evaluation = self.site.evaluate(self._arrays(parameters), config)
        except REPEATING_ERRORS as e:
            raise site_data_error(self.site.site, e) from e
        m = ev.metrics
        loss = m["loss_sum"] / m["events"] if m.get("events") else 0.0
        return float(loss), ev.num_examples, {**m, "site": self.site.site}


def _secagg_when_asked(msg: Message, ctxt: Context, call_next) -> Message:
    """Engage Flower's ``secaggplus_mod`` for SecAgg+ stage messages; plain train messages pass through."""
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if cfg is not None and Key.STAGE in cfg:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


SUMMARY_FACTS_KEY = "histofuse.summary_facts"  # node state only: the training count behind the summaries


def _check_reply(msg: Message, reply: Message, ctxt: Context, client_fn) -> None:
    """The disclosure policy (:mod:`pipeline.federated.policy`) on one reply, by what it carries."""
    c = reply.content
    if msg.metadata.message_type == "query.summaries":
        n = int(ctxt.state.config_records[SUMMARY_FACTS_KEY]["n_train"])
        site = str(ctxt.node_config.get("site", ""))
        check_summaries(SiteFacts(site, n, 0, 0, 0, ()), decode_record(str(c.config_records["summaries"]["json"])))
    elif "fitres.metrics" in c.config_records:
        res = recorddict_to_fitres(c, keep_input=True)
        shapes = [a.shape for a in parameters_to_ndarrays(res.parameters)]
        check_fit_reply(client_fn(ctxt).facts(), res.num_examples, dict(res.metrics), shapes)
    elif "evaluateres.metrics" in c.config_records:
        res = recorddict_to_evaluateres(c)
        check_evaluate_reply(client_fn(ctxt).facts(), res.num_examples, dict(res.metrics))


def disclosure_mod(client_fn):
    """The outermost ClientApp mod: every reply the site sends passes :func:`_check_reply`; a violation
    is a :class:`SiteDataError` (the run stops, nothing of the reply leaves the site)."""

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        reply = call_next(msg, ctxt)
        if reply.has_content():
            try:
                _check_reply(msg, reply, ctxt, client_fn)
            except DisclosureError as e:
                raise site_data_error(str(ctxt.node_config.get("site", f"node {ctxt.node_id}")), e) from e
        return reply

    return mod


def make_client_app(client_fn, mods: list | None = None) -> ClientApp:
    """The one ClientApp recipe: ``client_fn(context) -> SiteClient``, wrapped, with the SecAgg+ mod.

    A site whose data cannot be loaded or used (``ValueError``, ``FileNotFoundError``) answers with a
    :class:`~pipeline.federated.protocol.SiteDataError` naming it, which stops the run at the server.
    """

    def build(context: Context):
        try:
            return HistofuseClient(client_fn(context)).to_client()
        except REPEATING_ERRORS as e:
            raise site_data_error(str(context.node_config.get("site", f"node {context.node_id}")), e) from e

    return ClientApp(client_fn=build, mods=[disclosure_mod(client_fn), *(mods or []), _secagg_when_asked])


_DEPLOYED: dict[tuple, SiteClient] = {}


def _node_site(context: Context) -> tuple[str, Path, RunConfig]:
    nc = context.node_config
    for key in ("site", "cohort"):
        if not str(nc.get(key, "")):
            raise ValueError(
                f"SuperNode --node-config lacks '{key}' (got {dict(nc)}); e.g. \"site='A' cohort='a.yaml'\""
            )
    return str(nc["site"]), Path(str(nc["cohort"])), run_config_from_flower(dict(context.run_config))


def _cohort_statistics_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Site side of the statistics exchange: answer ``query.summaries`` with this site's summaries; keep
    the cohort-level normalisers sent in ``query.normalisers`` in the node's state for later rounds."""
    kind = msg.metadata.message_type
    if kind == "query.summaries":
        site, spec, cfg = _node_site(ctxt)
        try:
            summaries, n_train = local_summaries(spec, site, cfg)
        except REPEATING_ERRORS as e:
            raise site_data_error(site, e) from e
        ctxt.state.config_records[SUMMARY_FACTS_KEY] = ConfigRecord({"n_train": n_train})
        body = encode_record(summaries)
        return Message(RecordDict({"summaries": ConfigRecord({"json": body})}), reply_to=msg)
    if kind == "query.normalisers":
        ctxt.state.config_records[STATS_KEY] = ConfigRecord({"json": str(msg.content.config_records["stats"]["json"])})
        return Message(RecordDict({"ack": ConfigRecord({"ok": True})}), reply_to=msg)
    return call_next(msg, ctxt)


def _deployed_site(context: Context) -> SiteClient:
    """A SuperNode's site (``node_config``: ``site``, ``cohort``, optional ``out``, ``rank``), built once per
    (site, spec, config, statistics) in this process."""
    site, spec, cfg = _node_site(context)
    rec = context.state.config_records.get(STATS_KEY)
    stats_json = str(rec["json"]) if rec is not None else ""
    key = (site, str(spec.resolve()), cfg.digest(), stats_json)
    if key not in _DEPLOYED:
        nc = context.node_config
        rank = int(nc["rank"]) if "rank" in nc else None
        out = Path(str(nc.get("out", cfg.out)))
        _DEPLOYED[key] = deployed_client(spec, site, cfg, decode_record(stats_json) if stats_json else {}, out, rank)
    return _DEPLOYED[key]


client_app = make_client_app(_deployed_site, [_cohort_statistics_mod])
