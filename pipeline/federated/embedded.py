"""The embedded runtime: the project's Flower ServerApp body and ClientApp, with every site in this process.

:class:`InProcessGrid` is Flower's ``Grid`` in-process (messages cross as Flower's protobuf wire format, no
Ray or sockets; deterministic; each site's handler waited for at most the round timeout).
:func:`train_federated` is what ``histofuse train`` calls: the cohort's sites as clients, and the deployment's
ServerApp body (:func:`~pipeline.federated.server_app.run_server`: statistics exchange, training rounds, finish
query rounds) over that grid, the ClientApp built by ``make_client_app`` with the statistics mod of
:func:`in_process_statistics_mod`; the best round's model back with the finish rounds' cut-points, horizons,
baseline and test pair counts, ``federated_history.json`` written through ``pipeline.files``.
:func:`run_embedded` runs the training rounds alone (strategy tests).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time as _time
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from data_specs.artifacts import RunFiles
from data_specs.cohort import Cohort
from data_specs.config import RunConfig
from models.survival import MultimodalSurvival
from pipeline.federated.client_app import SUMMARY_FACTS_KEY, make_client_app
from pipeline.federated.in_process import (
    FederatedRun,
    SiteInputs,
    check_exchange,
    finish_rounds_apply,
    runtime_facts,
)
from pipeline.federated.ledger import MessageLedger
from pipeline.federated.lifecycle import LifecycleResult
from pipeline.federated.offset_fit import fit_offset_federated
from pipeline.federated.protocol import (
    REPEATING_ERRORS,
    STATS_KEY,
    SiteDataError,
    decode_record,
    encode_record,
    load_arrays,
    site_data_error,
    trainable_arrays,
)
from pipeline.federated.server import FederatedServer
from pipeline.federated.server_app import run_server
from pipeline.federated.site import SiteClient, site_clients
from pipeline.files import write_json
from pipeline.stats.curves import follow_up_ceiling, site_histogram, time_edges
from pipeline.training.data import CohortData
from pipeline.training.module import new_model
from pipeline.training.skip_auto import resolve_skip

log = logging.getLogger(__name__)

FINISH_METRICS_FILE = "finish_metrics.json"  # federated/: the finish rounds' test C (within-site pairs), as deployed


def run_federated(
    data: CohortData,
    cfg: RunConfig,
    out: Path | None = None,
    progress: bool = False,
    clients: list[SiteClient] | None = None,
    resume: bool = False,
    cohort: Cohort | None = None,
) -> tuple[MultimodalSurvival, dict]:
    """:func:`train_federated`'s model and info (the best round's model, the rounds' summary)."""
    run = train_federated(data, cfg, out, progress, clients, resume, cohort)
    return run.model, run.info


def train_federated(
    data: CohortData,
    cfg: RunConfig,
    out: Path | None = None,
    progress: bool = False,
    clients: list[SiteClient] | None = None,
    resume: bool = False,
    cohort: Cohort | None = None,
) -> FederatedRun:
    """The embedded runtime: the deployment's ServerApp body and the project's ClientApp, sites in-process.

    The statistics exchange (site summaries of ``cohort``'s raw omics/clinical values, follow-up ceilings,
    event-time histograms; checked against the normalisers ``data`` was built with), the training rounds (each
    site trains from the global weights and returns an update; the server aggregates: strategy, optional SecAgg+
    and DP; each site evaluates on its validation patients and returns scalars), then the finish query rounds
    (:mod:`pipeline.federated.finish`) on the kept weights. A site failing for a reason that repeats
    (``ValueError``, ``FileNotFoundError``) stops the run (:class:`SiteDataError` naming it); one that raises
    otherwise or does not answer within ``federated.round_timeout`` is retried once, then dropped from that round
    (warning) as long as ``min_sites`` remain (default: every site). Server state is checkpointed after each
    round; ``resume`` continues after the last finished round in ``out`` (the run folder's ``federated/``). With
    ``out``, every message a site sends is described in the run folder's ``privacy_ledger.jsonl``.
    ``model.skip=auto`` is resolved here when the caller has not (:func:`~pipeline.training.skip_auto.resolve_skip`);
    given ``clients``, their config's models are used as built (an unresolved auto: the plain network).
    """
    if clients is None:
        cfg = resolve_skip(cfg, data, "embedded")[0]
    fc = cfg.federated
    if cfg.model.family == "linear" and clients is None:
        from pipeline.federated.linear_sites import full_batch_linear, train_linear_federated

        if full_batch_linear(cfg):  # to the pooled optimum, penalty by federated CV (no rounds to resume)
            return FederatedRun(*train_linear_federated(data, cfg, out))
    if clients is None:
        clients = site_clients(data, cfg)
    if fc.min_sites is not None and len(clients) < fc.min_sites:
        raise ValueError(f"{len(clients)} site(s) with training patients, fewer than min_sites={fc.min_sites}")
    for c in clients:  # the cohort's time unit: the finish rounds' horizons and grid end (as a deployed site's)
        c.time_unit = c.time_unit or (cohort.time_unit if cohort is not None else None)
    model = clients[0].new_model() if clients else new_model(data, cfg)  # the federation's bins (discrete time)
    offset = fit_offset_federated(model, data, cfg, out, clients)  # model.skip=fitted: its weights start the rounds
    server = FederatedServer(cfg, trainable_arrays(model), out, resume=resume)
    ledger_path = RunFiles(root=out.parent).privacy_ledger if out is not None else None
    ledger = MessageLedger(ledger_path, keep=resume or offset is not None)  # keep the offset fit's lines
    finish = finish_rounds_apply(model, data, clients)  # else: a warning, in-process summary
    facts, result = run_lifecycle(clients, server, SiteInputs(cohort), ledger=ledger, finish=finish)
    check_exchange(data, result.stats, model)
    load_arrays(model, server.best[2])  # type: ignore[index]
    info = {**result.info, "sites": [c.site for c in clients], **facts}
    if offset is not None:
        info["offset_fit"] = offset
    if out is not None:
        write_json(out / "federated_history.json", info)
        if result.parts is not None:
            write_json(out / FINISH_METRICS_FILE, result.parts["metrics"])
    return FederatedRun(model.eval(), info, result.parts)


def _wire(msg: Message) -> tuple[Message, int]:
    """The message as the receiver gets it over the network (Flower's protobuf round trip), and its size."""
    from flwr.common.serde import message_from_proto, message_to_proto

    proto = message_to_proto(msg)
    return message_from_proto(proto), proto.ByteSize()


class InProcessGrid(Grid):
    """Flower's ``Grid`` in-process: each pushed message is handled by the destination site's ClientApp, one
    site after the other.

    Messages cross as Flower's protobuf wire format in both directions (no shared objects, as over a network).
    Every site has a persistent ``Context`` (SecAgg+ keeps its keys there). A handler that raises becomes an
    error reply (the workflow counts it as a failure). With a ``timeout`` (the round timeout), each handler runs
    in a worker thread waited for at most that long: a site that hangs or answers later gets no reply in the
    round (its thread is abandoned: Python cannot stop it). Every reply a site sends is measured in wire bytes
    (``bytes_by_round``) and, with ``audit``, kept in ``sent``.
    """

    def __init__(
        self,
        apps: dict[int, tuple[str, ClientApp]],
        run_id: int = 1,
        audit: bool = False,
        node_configs: dict[int, dict] | None = None,
        run_config: dict | None = None,
    ):
        self.apps = apps
        self._run = Run.create_empty(run_id)
        nc = node_configs or {}
        self.contexts = {
            nid: Context(run_id, nid, nc.get(nid, {"site": s}), RecordDict(), dict(run_config or {}))
            for nid, (s, _) in apps.items()
        }
        # this process is the server: messages it creates carry the SuperLink's identity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
        self.replies: dict[str, Message] = {}
        self.audit = audit
        self.sent: list[tuple[str, Message]] = []
        self.bytes_by_round: dict[str, dict[str, int]] = {}
        self._timeout: float | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def _handle(self, site: str, app: ClientApp, msg: Message, ctx: Context) -> Message | None:
        """``app``'s reply to ``msg``; None when a timeout is set and it did not come within it."""
        if self._timeout is None:
            return app(msg, ctx)
        box: dict = {}

        def work() -> None:
            try:
                box["reply"] = app(msg, ctx)
            except BaseException as e:  # re-raised below, in the server's thread
                box["error"] = e

        worker = threading.Thread(target=work, name=f"site {site}", daemon=True)
        worker.start()
        worker.join(self._timeout)
        if worker.is_alive():
            log.warning("site %s did not answer %s within round_timeout %.1f s", site, msg.metadata.message_type,
                        self._timeout)  # fmt: skip
            return None
        if "error" in box:
            raise box["error"]
        return box["reply"]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            site, app = self.apps[msg.metadata.dst_node_id]
            t0 = _time.perf_counter()
            try:
                delivered, _ = _wire(msg)
                reply = self._handle(site, app, delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # a failing site must not take the federation down
                log.warning("site %s failed (%s: %s)", site, type(e).__name__, e)
                reason = (
                    f"{type(e).__name__}: {e}"
                    if isinstance(e, SiteDataError)
                    else f"site {site}: {type(e).__name__}: {e}"
                )
                reply = Message(Error(code=0, reason=reason), reply_to=msg)
            took = _time.perf_counter() - t0
            if reply is None:
                continue
            if self._timeout is not None and took > self._timeout:
                log.warning("site %s answered after %.1f s > round_timeout %.1f s", site, took, self._timeout)
                continue
            reply, size = _wire(reply)
            per = self.bytes_by_round.setdefault(msg.metadata.group_id, {})
            per[site] = per.get(site, 0) + size
            if self.audit:  # its own copy: the server's compat layer consumes the content it reads
                self.sent.append((site, _wire(reply)[0]))
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._timeout = timeout
        try:
            return self.pull_messages(self.push_messages(messages))
        finally:
            self._timeout = None


def in_process_statistics_mod(by_node: dict[int, SiteClient], inputs: SiteInputs):
    """The site side of the statistics exchange for in-process sites, message for message a deployed node's
    (``client_app``'s statistics mod), from :class:`SiteInputs`: ``query.summaries`` -> the site's summaries of its
    own training patients and, when asked, its follow-up ceiling; ``query.event_histogram`` -> its training
    event-time histogram on the server's grid (bins under k merged); ``query.normalisers`` -> kept in the node's
    state, and the federation's discrete-time bins taken by the site. Under SecAgg+ the app's names mod sends the
    summaries' names and its secure-sum mod their numbers, both from this mod's answer. Every reply passes the
    disclosure mod and is in the ledger."""

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        kind = msg.metadata.message_type
        if kind not in ("query.summaries", "query.event_histogram", "query.normalisers"):
            return call_next(msg, ctxt)
        client = by_node[ctxt.node_id]
        if kind == "query.normalisers":
            body = str(msg.content.config_records["stats"]["json"])
            ctxt.state.config_records[STATS_KEY] = ConfigRecord({"json": body})
            if "time_bins" in (stats := decode_record(body)):
                client.bin_edges = np.asarray(stats["time_bins"], np.float64)
            return Message(RecordDict({"ack": ConfigRecord({"ok": True})}), reply_to=msg)
        k = client.cfg.federated.min_count
        try:
            time, event = inputs.event_times(client)
            summaries = inputs.summaries(client) if kind == "query.summaries" else {}
        except REPEATING_ERRORS as e:
            raise site_data_error(client.site, e) from e
        facts = {"n_train": len(time), "n_events": int(event.sum())}  # what the disclosure mod checks against
        ctxt.state.config_records[SUMMARY_FACTS_KEY] = ConfigRecord(facts)
        if kind == "query.event_histogram":  # on the grid the server fixed from the sites' ceilings
            grid = msg.content.config_records["grid"]
            edges = time_edges(float(grid["end"]), int(grid["bins"]))
            counts = [int(c) for c in site_histogram(time[event], edges, k)]
            return Message(RecordDict({"histogram": ConfigRecord({"counts": counts})}), reply_to=msg)
        reply = RecordDict({"summaries": ConfigRecord({"json": encode_record(summaries)})})
        want = msg.content.config_records.get("want") if msg.has_content() else None
        if want is not None and bool(want.get("follow_up", False)):
            reply["follow_up"] = ConfigRecord({"ceiling": follow_up_ceiling(time, k)})
        return Message(reply, reply_to=msg)

    return mod


@dataclass
class _InProcess:
    grid: InProcessGrid
    context: Context
    node_site: dict[int, str]
    config_dir: tempfile.TemporaryDirectory


def _in_process(clients: list[SiteClient], cfg: RunConfig, ledger, audit: bool, inputs: SiteInputs) -> _InProcess:
    """The grid of ``clients`` (node ids ``1000 + position``) with the project's ClientApp, each node configured as
    a deployed one would be (its site; the run config from the run's YAML, so its disclosure checks use the
    run's k); no ``out``: an in-process site writes no file of its own."""
    by_node = {1000 + i: c for i, c in enumerate(clients)}
    app = make_client_app(lambda ctx: by_node[ctx.node_id], [in_process_statistics_mod(by_node, inputs)],
                          ledger_for=None if ledger is None else lambda ctx: ledger)  # fmt: skip
    tmp = tempfile.TemporaryDirectory(prefix="histofuse-embedded-")
    yaml_path = Path(tmp.name) / "config.yaml"
    yaml_path.write_text(cfg.to_yaml())
    grid = InProcessGrid(
        {nid: (c.site, app) for nid, c in by_node.items()},
        audit=audit,
        node_configs={nid: {"site": c.site, "cohort": "in-process"} for nid, c in by_node.items()},
        run_config={"config": str(yaml_path), "out": "", "resume": False},
    )
    context = Context(grid.run.run_id, SUPERLINK_NODE_ID, {}, RecordDict(), {})
    return _InProcess(grid, context, {nid: c.site for nid, c in by_node.items()}, tmp)


@contextmanager
def _running(ip: _InProcess, ledger: MessageLedger | None):
    """Flower's per-round INFO lines quiet (our own log says it per round); afterwards the node config removed
    and the ledger flushed."""
    app_logger = logging.getLogger("flwr")
    level = app_logger.level
    app_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        app_logger.setLevel(level)
        ip.config_dir.cleanup()
        if ledger is not None:
            ledger.flush()


def run_lifecycle(
    clients: list[SiteClient],
    server: FederatedServer,
    inputs: SiteInputs | None = None,
    progress: bool = False,
    grid_out: list | None = None,
    ledger: MessageLedger | None = None,
    finish: bool = True,
    statistics: bool = True,
) -> tuple[dict, LifecycleResult]:
    """The deployment's ServerApp body (:func:`~pipeline.federated.server_app.run_server`: the statistics exchange
    (the sites' answers from ``inputs``), the training rounds, with ``finish`` the finish query rounds) over
    :class:`InProcessGrid` with the project's ClientApp. ``grid_out``: if given, the grid is appended (tests
    audit it). ``ledger``: where every site's replies are described (flushed at each round and at the end).
    Returns runtime facts (bytes sent per site per round, seconds) and the lifecycle's result."""
    inputs = inputs if inputs is not None else SiteInputs(None)
    ip = _in_process(clients, server.cfg, ledger, grid_out is not None, inputs)
    if grid_out is not None:
        grid_out.append(ip.grid)
    names = list(clients[0].initial_arrays()) if server.global_arrays is None else None
    start, t0 = server.next_round, _time.perf_counter()
    log.info("federated: statistics, rounds %d..%d, finish over %d site(s)", start, server.fc.rounds - 1, len(clients))
    with _running(ip, ledger):
        result = run_server(ip.grid, ip.context, server.cfg, server, names, ip.node_site, finish, statistics)
    return runtime_facts(server, ip.grid.bytes_by_round, start, _time.perf_counter() - t0), result


def run_embedded(
    clients: list[SiteClient],
    server: FederatedServer,
    progress: bool = False,
    grid_out: list | None = None,
    ledger: MessageLedger | None = None,
) -> dict:
    """The training rounds alone (no statistics exchange, no finish rounds) through :func:`run_lifecycle`: what
    the strategy tests drive. Node ids are ``1000 + position``; returns the runtime facts."""
    return run_lifecycle(clients, server, None, progress, grid_out, ledger, finish=False, statistics=False)[0]
