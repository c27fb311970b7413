"""Secure sums over Flower's SecAgg+: the server learns only the sum over sites of a phase's numbers.

Under ``federated.secagg`` the statistics exchange (site summaries and follow-up ceilings, the discrete-time
event histogram), each training round's validation (:func:`secure_validation`, the round's weights as the sum's
``FitIns`` parameters) and the post-training ``finish.*`` rounds send their numbers this way instead of in plain
text.
:func:`secure_sum` drives Flower's legacy ``SecAggPlusWorkflow`` over one fit round whose "update" is the
phase's vector (:mod:`pipeline.federated.secure_sum`: every count and fixed-point digit a whole SecAgg+ input, so
the sum is exact) and whose weight is 1 at every site; the site side is :func:`secure_sum_mod`, the innermost
ClientApp mod, which answers the round's ``train`` message from the site's own patients after the disclosure
policy has checked the plain values (cells and bins under k are suppressed or merged first, as in plain runs).
Every stage reply is in the site's ledger as ``<phase>.secagg.<stage>`` (e.g. ``statistics.summaries.secagg.
collect_masked_vectors``). Names (genes, columns, categories) travel in plain first: the layout of the sum.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from data_specs.config import RunConfig
from data_specs.summaries import site_summaries_from_wire
from pipeline.federated.protocol import (
    SiteDataError,
    decode_record,
    encode_record,
    is_repeating_failure,
    secagg_shares_threshold,
    site_data_error,
)
from pipeline.federated.secure_sum import (
    CLIP,
    GROUP_PREFIX,
    MAX_SITES,
    MODULUS,
    QUANTISATION,
    REQUEST_KEY,
    decode,
    encode,
    largest_ceiling,
    merge_names,
    phase_layout,
    summaries_from_sum,
    summaries_values,
    summary_names,
)
from pipeline.stats.curves import TIME_BINS

log = logging.getLogger(__name__)

SecureAsk = Callable[[str, dict], dict[str, np.ndarray]]


class _SumStrategy(Strategy):
    """The legacy Strategy SecAgg+ needs: every node asked once for ``phase``; keeps the unmasked sum."""

    def __init__(self, grid: Grid, nodes: list[int], phase: str, request: dict, parameters: Parameters | None = None,
                 rnd: int | None = None):  # fmt: skip
        self.grid, self.nodes = grid, nodes
        self.config: dict = {REQUEST_KEY: phase, "json": encode_record(request)}
        if rnd is not None:
            self.config["round"] = rnd  # the training round it belongs to (the site's ledger line names it)
        self.parameters = parameters if parameters is not None else Parameters([], "numpy.ndarray")
        self.total: np.ndarray | None = None
        self.n_sites = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        ins = FitIns(self.parameters, dict(self.config))
        return [(GridClientProxy(n, self.grid, self.grid.run.run_id), ins) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if results:  # Flower hands the sum divided by the total weight (1 per site): scale it back
            self.n_sites = len(results)
            self.total = parameters_to_ndarrays(results[0][1].parameters)[0] * self.n_sites
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class ForwardingGrid(Grid):
    """A Grid that forwards every call to ``self.inner``; subclasses change :meth:`send_and_receive`."""

    inner: Grid

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class _Watched(ForwardingGrid):
    """Forwards to a Grid; a site's error reply that will repeat (:class:`SiteDataError`) stops the run."""

    def __init__(self, inner: Grid, phase: str, timeout: float | None):
        self.inner, self.phase, self.timeout = inner, phase, timeout

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.inner.send_and_receive(messages, timeout=timeout if timeout is not None else self.timeout))
        for r in replies:
            if r.has_error():
                if is_repeating_failure(r.error.reason):
                    raise SiteDataError(f"{self.phase} (secure sum): {r.error.reason}")
                log.warning("%s: node %s dropped from the secure sum (%s)", self.phase, r.metadata.src_node_id,
                            r.error.reason)  # fmt: skip
        return replies


def secure_sum(grid: Grid, cfg: RunConfig, phase: str, request: dict, parameters: Parameters | None = None,
               rnd: int | None = None) -> tuple[dict[str, np.ndarray], int]:  # fmt: skip
    """The sum over every node of its ``phase`` vector for ``request`` (SecAgg+, weight 1 per site), decoded on
    :func:`~pipeline.federated.secure_sum.phase_layout`; and the number of sites in the sum. The shares and the
    reconstruction threshold are the training's (``federated.secagg_shares`` / ``secagg_threshold``).
    ``parameters``: model weights the sites compute on (sent as the round's ``FitIns`` parameters, binary, once
    per site); ``rnd``: the training round the sum belongs to."""
    nodes = sorted(grid.get_node_ids())
    if not 2 <= len(nodes) <= MAX_SITES:
        raise ValueError(f"{phase}: a secure sum needs 2..{MAX_SITES} sites, {len(nodes)} connected")
    fc = cfg.federated
    n_shares, threshold = secagg_shares_threshold(fc.secagg_shares, fc.secagg_threshold, len(nodes))
    strategy = _SumStrategy(grid, nodes, phase, request, parameters, rnd)
    ctx = LegacyContext(Context(grid.run.run_id, SUPERLINK_NODE_ID, {}, RecordDict(), {}), strategy=strategy)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: GROUP_PREFIX + phase})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters([]), True)
    workflow = SecAggPlusWorkflow(
        num_shares=n_shares if n_shares > 2 else 1.0,
        reconstruction_threshold=threshold,
        max_weight=1.0,
        clipping_range=CLIP,
        quantization_range=QUANTISATION,
        modulus_range=MODULUS,
        timeout=fc.round_timeout,
    )
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)
    try:
        workflow(_Watched(grid, phase, fc.round_timeout), ctx)
    finally:
        flwr_log.setLevel(level)
    if strategy.total is None:
        raise RuntimeError(f"{phase}: the secure sum did not complete (too few sites answered every SecAgg+ stage)")
    return decode(phase_layout(phase, request), strategy.total), strategy.n_sites


def secure_summaries(grid: Grid, nodes: list[int], cfg: RunConfig) -> tuple[list[dict], list[float]]:
    """The statistics exchange under SecAgg+: each site sends the names of its summaries in plain
    (``query.summaries`` with ``want.layout``), then its counts, sums and follow-up ceiling (one-hot on the
    pre-agreed grid) in a secure sum on the merged names. Returns ``([summed summaries], [largest ceiling])``,
    the form of the plain exchange's per-site lists (the normalisers and grids use only their sums and maximum)."""
    want = RecordDict({"want": ConfigRecord({"layout": True})})
    ask = [Message(want, nid, "query.summaries", group_id="statistics") for nid in nodes]
    names = []
    for reply in grid.send_and_receive(ask, timeout=cfg.federated.round_timeout):
        if reply.has_error():
            if is_repeating_failure(reply.error.reason):
                raise SiteDataError(f"statistics exchange: {reply.error.reason}")
            log.warning("node %s sent no summary names (%s)", reply.metadata.src_node_id, reply.error.reason)
            continue
        names.append(decode_record(str(reply.content.config_records["layout"]["json"])))
    merged = merge_names(names)
    total, n = secure_sum(grid, cfg, "statistics.summaries", {"layout": merged})
    log.info("site summaries: the sum over %d site(s) under SecAgg+", n)
    return [summaries_from_sum(merged, total)], [largest_ceiling(total["follow_up"])]


def secure_event_histogram(grid: Grid, end: float, cfg: RunConfig) -> np.ndarray:
    """The summed training event-time histogram on ``time_edges(end)`` (bins under k merged at each site)."""
    return secure_sum(grid, cfg, "statistics.event_histogram", {"end": float(end), "bins": TIME_BINS})[0]["counts"]


def secure_validation(grid: Grid, cfg: RunConfig, parameters: Parameters, rnd: int) -> tuple[dict[str, float], int]:
    """A training round's validation under SecAgg+: every site's :data:`~pipeline.federated.policy.SECURE_EVAL_FIELDS`
    for the global weights ``parameters`` in one secure sum (phase ``evaluate``); the decoded totals (counts as
    whole floats) and the number of sites that answered every stage."""
    total, n = secure_sum(grid, cfg, "evaluate", {}, parameters, rnd)
    return {k: float(v[0]) for k, v in total.items()}, n


def secure_finish_ask(grid: Grid, cfg: RunConfig) -> SecureAsk | None:
    """``secure(kind, request) -> summed fields`` for :func:`pipeline.federated.finish.finish_run` under SecAgg+
    (None otherwise: every finish reply is then plain)."""
    if not cfg.federated.secagg:
        return None
    return lambda kind, request: secure_sum(grid, cfg, kind, request)[0]


Answer = Callable[[str, dict, Context, Message], dict[str, Any]]


def secure_sum_mod(answer: Answer):
    """The innermost ClientApp mod: a ``train`` message whose config asks for a secure sum
    (:data:`~pipeline.federated.secure_sum.REQUEST_KEY`) is answered with the phase's vector, ``answer(phase,
    request, context, message)`` (the site's plain values, already through the disclosure policy), encoded for SecAgg+
    with weight 1; Flower's ``secaggplus_mod`` around it masks the vector before anything leaves."""

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        cfg = msg.content.config_records.get("fitins.config") if msg.has_content() else None
        if msg.metadata.message_type != "train" or cfg is None or REQUEST_KEY not in cfg:
            return call_next(msg, ctxt)
        phase, request = str(cfg[REQUEST_KEY]), decode_record(str(cfg["json"]))
        vec = encode(phase_layout(phase, request), answer(phase, request, ctxt, msg))
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vec]), 1, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    return mod


def compose_mods(mods: list) -> Callable[[Message, Context], Message]:
    """``mods`` (ClientApp mods) as one handler; a message none of them answers is a ``ValueError``."""

    def call(i: int, msg: Message, ctxt: Context) -> Message:
        if i == len(mods):
            raise ValueError(f"no statistics handler answers {msg.metadata.message_type!r}")
        return mods[i](msg, ctxt, lambda m, c: call(i + 1, m, c))

    return lambda msg, ctxt: call(0, msg, ctxt)


def _query(msg: Message, kind: str, content: RecordDict) -> Message:
    """A plain statistics query answered inside the site (never sent): ``msg``'s metadata, another type."""
    md = copy.copy(msg.metadata)
    md.message_type, md.group_id = kind, "statistics"
    return Message(metadata=md, content=content)


def plain_query(plain, phase: str, request: dict, ctxt: Context, msg: Message) -> tuple[Message, Message]:
    """The plain statistics query behind a secure-sum ``phase`` and the site's own reply to it (``plain``: its
    statistics mods): ``query.summaries`` (with the follow-up ceiling) or ``query.event_histogram``."""
    if phase == "statistics.summaries":
        query = _query(msg, "query.summaries", RecordDict({"want": ConfigRecord({"follow_up": True})}))
    elif phase == "statistics.event_histogram":
        grid = ConfigRecord({"end": float(request["end"]), "bins": int(request["bins"])})
        query = _query(msg, "query.event_histogram", RecordDict({"grid": grid}))
    else:
        raise ValueError(f"secure sum: no plain query for phase {phase!r}")
    return query, plain(query, ctxt)


def plain_values(phase: str, request: dict, content: RecordDict) -> dict:
    """The numbers of a plain statistics reply on the phase's secure-sum layout."""
    if phase == "statistics.event_histogram":
        return {"counts": list(content.config_records["histogram"]["counts"])}
    typed = site_summaries_from_wire(decode_record(str(content.config_records["summaries"]["json"])))
    fu = content.config_records.get("follow_up")
    return summaries_values(typed, request["layout"], float(fu["ceiling"]) if fu is not None else 0.0)


def names_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Under SecAgg+ the server first asks for the names of a site's summaries (``query.summaries`` with
    ``want.layout``): this mod asks the site's own statistics mods for its summaries and replies with their names
    only (:func:`~pipeline.federated.secure_sum.summary_names`); the numbers follow in the secure sum."""
    want = msg.content.config_records.get("want") if msg.has_content() else None
    if msg.metadata.message_type != "query.summaries" or want is None or not bool(want.get("layout", False)):
        return call_next(msg, ctxt)
    reply = call_next(_query(msg, "query.summaries", RecordDict({"want": ConfigRecord({})})), ctxt)
    if not reply.has_content():
        return reply
    site = str(ctxt.node_config.get("site", f"node {ctxt.node_id}"))
    try:
        typed = site_summaries_from_wire(decode_record(str(reply.content.config_records["summaries"]["json"])), site)
    except ValueError as e:
        raise site_data_error(site, e) from e
    names = ConfigRecord({"json": encode_record(summary_names(typed))})
    return Message(RecordDict({"layout": names}), reply_to=msg)
