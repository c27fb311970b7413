"""The Flower ClientApp: a :class:`~pipeline.federated.site.SiteClient` behind Flower's client interface.

``make_client_app`` is the one recipe both runtimes use (embedded: ``embedded.py``; deployment:
``client_app`` below, the ``[tool.flwr.app.components]`` clientapp run by each SuperNode with
``--node-config "site='NAME' cohort='SPEC'"``). It adds Flower's ``secaggplus_mod`` for SecAgg+ stage
messages, and a deployed node answers the statistics exchange (``query.summaries`` /
``query.normalisers``) with :func:`~pipeline.federated.site.local_summaries`. Under SecAgg+ the numbers of
the statistics exchange and of the finish rounds leave only inside secure sums (``secure_sum_app``: the names
mod, and the innermost mod answering a secure-sum round from the same plain replies, checked first), and so does
each training round's validation (``evaluate``, :meth:`~pipeline.federated.site.SiteClient.secure_validation`);
a training reply's plain weight is 1 (:func:`_secagg_when_asked`). Local
training, the site's data and its summaries live in ``site.py``; this module only adapts them to Flower messages.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import recorddict_to_evaluateres, recorddict_to_fitins, recorddict_to_fitres

from data_specs.artifacts import RunFiles
from data_specs.config import RunConfig
from pipeline.federated.finish import check_site_reply, phase_of, site_reply
from pipeline.federated.ledger import MessageLedger, ledger_entry
from pipeline.federated.policy import (
    DisclosureError,
    SiteFacts,
    check_evaluate_reply,
    check_fit_reply,
    check_follow_up,
    check_histogram,
    check_names,
    check_secure_evaluation,
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
from pipeline.federated.secure_sum import SUMMED_KEYS, secure_phase
from pipeline.federated.secure_sum_app import compose_mods, names_mod, plain_query, plain_values, secure_sum_mod
from pipeline.federated.site import SiteClient, deployed_client, local_event_times, local_summaries
from pipeline.stats.curves import follow_up_ceiling, site_histogram, time_edges

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
        loss = m["loss_sum"] / m["events"] if m.get("events") and "loss_sum" in m else 0.0
        return float(loss), ev.num_examples, {**m, "site": self.site.site}


def _secagg_when_asked(msg: Message, ctxt: Context, call_next) -> Message:
    """Engage Flower's ``secaggplus_mod`` for SecAgg+ stage messages; plain train messages pass through.

    Flower's mod puts the update's weight inside the masked vector (the update times ``weight / max_weight``, that
    ratio appended) but leaves the training reply's ``fitres.num_examples`` (the site's patient count) in plain
    text: here it becomes 1, so the server learns only the consortium's total weight (from the unmasked sum)."""
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if cfg is None or Key.STAGE not in cfg:
        return call_next(msg, ctxt)
    stage = cfg[Key.STAGE]
    reply = secaggplus_mod(msg, ctxt, call_next)
    if stage == Stage.COLLECT_MASKED_VECTORS and reply.has_content():
        if WEIGHT_RECORD in reply.content.metric_records:
            reply.content.metric_records[WEIGHT_RECORD] = MetricRecord({"num_examples": 1})
    return reply


WEIGHT_RECORD = "fitres.num_examples"  # Flower's legacy FitRes weight, a metric record of the reply


SUMMARY_FACTS_KEY = "histofuse.summary_facts"  # node state only: the training count behind the summaries


def _check_reply(msg: Message, reply: Message, ctxt: Context, client_fn, masked: bool = False) -> None:
    """The disclosure policy (:mod:`pipeline.federated.policy`) on one reply, by what it carries. Under SecAgg+ a
    phase whose numbers are summed (:mod:`pipeline.federated.secure_sum`) may send none of them in plain
    (``masked``: values about to go into a secure sum, checked by the same rules)."""
    c = reply.content
    if secure_phase(msg.metadata.group_id) is not None:
        _check_masked(ctxt, c)
    elif (phase := phase_of(msg.metadata.message_type)) is not None:
        body = {k: v for k, v in c.config_records["finish"].items() if k != "site"}
        client = client_fn(ctxt)
        if client.cfg.federated.secagg and (plain := sorted(set(body) & SUMMED_KEYS[phase])):
            raise DisclosureError(f"site {client.site}: disclosure policy: {phase}: {plain} in plain text under "
                                  "federated.secagg (they leave only inside a secure sum)")  # fmt: skip
        check_site_reply(client, phase, body)
    elif msg.metadata.message_type in ("query.summaries", "query.event_histogram"):
        site, _, cfg = _node_site(ctxt)
        if cfg.federated.secagg and not masked and set(c.config_records) != {"layout"}:
            raise DisclosureError(f"site {site}: disclosure policy: {msg.metadata.message_type}: "
                                  f"{sorted(c.config_records)} in plain text under federated.secagg (numbers leave "
                                  "only inside a secure sum; the plain reply holds names only)")  # fmt: skip
        if "layout" in c.config_records:
            check_names(site, decode_record(str(c.config_records["layout"]["json"])))
            return
        facts = _summary_facts(ctxt, site, cfg.federated.min_count)
        if "histogram" in c.config_records:
            check_histogram(facts, "histogram.counts", c.config_records["histogram"]["counts"], facts.n_train_events)
            return
        check_summaries(facts, decode_record(str(c.config_records["summaries"]["json"])))
        if "follow_up" in c.config_records:
            check_follow_up(facts, c.config_records["follow_up"]["ceiling"])
    elif "fitres.metrics" in c.config_records:
        res = recorddict_to_fitres(c, keep_input=True)
        shapes = [a.shape for a in parameters_to_ndarrays(res.parameters)]
        check_fit_reply(client_fn(ctxt).facts(), res.num_examples, dict(res.metrics), shapes)
    elif "evaluateres.metrics" in c.config_records:
        res = recorddict_to_evaluateres(c)
        check_evaluate_reply(client_fn(ctxt).facts(), res.num_examples, dict(res.metrics))


def _check_masked(ctxt: Context, c: RecordDict) -> None:
    """A secure-sum stage reply: SecAgg+ keys, shares and masked vectors only, weight 1 and no metric (the plain
    values were checked before masking, in :func:`secure_answer`)."""
    site = str(ctxt.node_config.get("site", f"node {ctxt.node_id}"))
    if any(len(rec) for rec in c.array_records.values()) or set(c.metric_records) - {"fitres.num_examples"}:
        raise DisclosureError(f"site {site}: disclosure policy: plain arrays or metrics in a secure-sum reply")
    if "fitres.metrics" in c.config_records:
        res = recorddict_to_fitres(c, keep_input=True)
        if res.num_examples != 1 or res.metrics:
            raise DisclosureError(f"site {site}: disclosure policy: a secure-sum reply with weight "
                                  f"{res.num_examples} or metrics {sorted(res.metrics)}")  # fmt: skip


def _phase(msg: Message) -> str:
    kind = msg.metadata.message_type
    if (phase := phase_of(kind)) is not None:
        return phase
    if kind.startswith("query."):
        return "statistics." + kind.removeprefix("query.")
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if cfg is not None and Key.STAGE in cfg:  # a secure sum's stages are named by its phase, training's by "train"
        return f"{secure_phase(msg.metadata.group_id) or kind}.secagg.{cfg[Key.STAGE]}"
    return kind


def _round(msg: Message) -> int | None:
    if msg.has_content():
        for name in ("fitins.config", "evaluateins.config"):
            rec = msg.content.config_records.get(name)
            if rec is not None and "round" in rec:
                return int(rec["round"])
    return None


def ledger_head(msg: Message, site: str) -> dict:
    """A ledger line's header, read from the incoming ``msg`` before any mod consumes it: phase, Flower
    group (round), absolute round when the server sent one, site, and the message it answers."""
    return {
        "phase": _phase(msg),
        "group": msg.metadata.group_id,
        "round": _round(msg),
        "site": site,
        "reply_to": msg.metadata.message_id,
    }


def disclosure_mod(client_fn, ledger_for=None):
    """The outermost ClientApp mod: every reply the site sends passes :func:`_check_reply` and, with
    ``ledger_for(context) -> MessageLedger | None``, is recorded in the site's privacy ledger (a refused
    reply as an error line). A violation is a :class:`SiteDataError` (the run stops, nothing of the reply
    leaves the site)."""

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        site = str(ctxt.node_config.get("site", f"node {ctxt.node_id}"))
        ledger = ledger_for(ctxt) if ledger_for is not None else None
        head = ledger_head(msg, site) if ledger is not None else {}
        try:
            reply = call_next(msg, ctxt)
            if reply.has_content():
                _check_reply(msg, reply, ctxt, client_fn)
        except Exception as e:
            if ledger is not None:
                ledger.record(ledger_entry(head, None, type(e).__name__))
            if isinstance(e, DisclosureError):
                raise site_data_error(site, e) from e
            raise
        if ledger is not None:
            ledger.record(ledger_entry(head, reply))
        return reply

    return mod


def finish_mod(client_fn):
    """Answer the post-training query rounds (``query.finish_*``, :mod:`pipeline.federated.finish`) from the site's
    own patients; the site's risk scores go to ``node_config["out"]`` (else the run config's ``out``)."""

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        kind = phase_of(msg.metadata.message_type)
        if kind is None:
            return call_next(msg, ctxt)
        client = client_fn(ctxt)
        try:
            body = site_reply(client, kind, decode_record(str(msg.content.config_records["query"]["json"])),
                              _site_out(ctxt))  # fmt: skip
        except REPEATING_ERRORS as e:
            raise site_data_error(client.site, e) from e
        if client.cfg.federated.secagg:  # its numbers leave only inside a secure sum (secure_answer)
            body = {k: v for k, v in body.items() if k not in SUMMED_KEYS[kind]}
        return Message(RecordDict({"finish": ConfigRecord({**body, "site": client.site})}), reply_to=msg)

    return mod


def _site_out(ctxt: Context) -> Path | None:
    out = str(ctxt.node_config.get("out", "") or ctxt.run_config.get("out", "") or "")
    return Path(out) if out else None


def secure_answer(client_fn, plain):
    """``answer(phase, request, context)``: the site's plain values for a secure sum (:mod:`.secure_sum_app`),
    the plain reply of the same query (``plain``: the app's statistics mods; the finish replies from
    ``client_fn``), checked by the same disclosure policy before they are masked."""

    def answer(phase: str, request: dict, ctxt: Context, msg: Message) -> dict:
        if phase == "evaluate":  # a training round's validation on the weights the sum carries
            client = client_fn(ctxt)
            try:
                arrays = parameters_to_ndarrays(recorddict_to_fitins(msg.content, keep_input=True).parameters)
                if len(arrays) != len(names := client.param_names()):
                    raise ValueError(f"site {client.site}: got {len(arrays)} arrays, the model has {len(names)}")
                values = client.secure_validation(dict(zip(names, arrays, strict=True)))
            except REPEATING_ERRORS as e:
                raise site_data_error(client.site, e) from e
            check_secure_evaluation(client.facts(), values)
            return values
        if phase.startswith("finish."):
            client = client_fn(ctxt)
            try:
                body = site_reply(client, phase, request, _site_out(ctxt))
                check_site_reply(client, phase, body)
            except REPEATING_ERRORS as e:
                raise site_data_error(client.site, e) from e
            return {k: v for k, v in body.items() if k in SUMMED_KEYS[phase]}
        query, reply = plain_query(plain, phase, request, ctxt, msg)
        _check_reply(query, reply, ctxt, client_fn, masked=True)
        return plain_values(phase, request, reply.content)

    return answer


def _summary_facts(ctxt: Context, site: str, k: int) -> SiteFacts:
    state = ctxt.state.config_records[SUMMARY_FACTS_KEY]
    return SiteFacts(site, int(state["n_train"]), int(state["n_events"]), 0, 0, (), k)


def make_client_app(client_fn, mods: list | None = None, ledger_for=None) -> ClientApp:
    """The one ClientApp recipe: ``client_fn(context) -> SiteClient``, wrapped, with the SecAgg+ mod and the
    disclosure mod outermost (``ledger_for(context)``: the privacy ledger it records each reply in).

    A site whose data cannot be loaded or used (``ValueError``, ``FileNotFoundError``) answers with a
    :class:`~pipeline.federated.protocol.SiteDataError` naming it, which stops the run at the server.
    """

    def build(context: Context):
        try:
            return HistofuseClient(client_fn(context)).to_client()
        except REPEATING_ERRORS as e:
            raise site_data_error(str(context.node_config.get("site", f"node {context.node_id}")), e) from e

    answer = secure_answer(client_fn, compose_mods(mods or []))  # SecAgg+: the statistics mods' plain values
    mods = [disclosure_mod(client_fn, ledger_for), names_mod, *(mods or []), finish_mod(client_fn), _secagg_when_asked,
            secure_sum_mod(answer)]  # fmt: skip
    return ClientApp(client_fn=build, mods=mods)


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
    """Site side of the statistics exchange: answer ``query.summaries`` with this site's summaries (and, when
    asked, its :func:`~pipeline.stats.curves.follow_up_ceiling`), ``query.event_histogram`` with the histogram
    of its training event times on the server's grid; keep the cohort-level normalisers (and discrete-time
    bins) sent in ``query.normalisers`` in the node's state for later rounds."""
    kind = msg.metadata.message_type
    if kind in ("query.summaries", "query.event_histogram"):
        site, spec, cfg = _node_site(ctxt)
        k = cfg.federated.min_count
        try:
            time, event = local_event_times(spec, site, cfg)
            if kind == "query.event_histogram":  # on the grid the server fixed from the sites' ceilings
                grid = msg.content.config_records["grid"]
                edges = time_edges(float(grid["end"]), int(grid["bins"]))
                counts = [int(c) for c in site_histogram(time[event], edges, k)]
                return Message(RecordDict({"histogram": ConfigRecord({"counts": counts})}), reply_to=msg)
            summaries, n_train = local_summaries(spec, site, cfg)
        except REPEATING_ERRORS as e:
            raise site_data_error(site, e) from e
        facts = {"n_train": n_train, "n_events": int(event.sum())}
        ctxt.state.config_records[SUMMARY_FACTS_KEY] = ConfigRecord(facts)
        reply = RecordDict({"summaries": ConfigRecord({"json": encode_record(summaries)})})
        want = msg.content.config_records.get("want") if msg.has_content() else None
        if want is not None and bool(want.get("follow_up", False)):
            reply["follow_up"] = ConfigRecord({"ceiling": follow_up_ceiling(time, k)})
        return Message(reply, reply_to=msg)
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


_LEDGERS: dict[Path, MessageLedger] = {}


def _deployed_ledger(context: Context) -> MessageLedger | None:
    """A SuperNode's own ledger, ``<out>/privacy_ledger.<site>.jsonl`` (kept across node restarts; lines
    name the round), written after every reply."""
    try:
        site, _, cfg = _node_site(context)
    except ValueError:
        return None  # the node answers with that error itself
    path = RunFiles(root=Path(str(context.node_config.get("out", cfg.out)))).site_privacy_ledger(site)
    if path not in _LEDGERS:
        _LEDGERS[path] = MessageLedger(path, keep=True, autoflush=True)
    return _LEDGERS[path]


client_app = make_client_app(_deployed_site, [_cohort_statistics_mod], _deployed_ledger)
