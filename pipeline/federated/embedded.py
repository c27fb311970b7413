"""The embedded runtime: the project's Flower ServerApp body and ClientApp, with every site in this process.

:class:`InProcessGrid` is Flower's ``Grid`` in-process (messages cross as Flower's protobuf wire format, no
Ray, sockets or threads; deterministic); :func:`run_embedded` runs :func:`~pipeline.federated.server_app.serve`
over it and :func:`run_federated` is what ``histofuse train`` calls: the cohort's sites as clients, the best
round's model back, ``federated_history.json`` written through ``pipeline.files``.
"""

from __future__ import annotations

import logging
import time as _time
import uuid
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from data_specs.artifacts import RunFiles
from data_specs.config import RunConfig
from models.survival import MultimodalSurvival
from pipeline.federated.client_app import make_client_app
from pipeline.federated.ledger import MessageLedger
from pipeline.federated.offset_fit import fit_offset_federated
from pipeline.federated.protocol import SiteDataError, load_arrays, trainable_arrays
from pipeline.federated.server import FederatedServer
from pipeline.federated.server_app import serve
from pipeline.federated.site import SiteClient, site_clients
from pipeline.files import write_json
from pipeline.progress import fmt_seconds
from pipeline.training.data import CohortData
from pipeline.training.module import new_model

log = logging.getLogger(__name__)


def run_federated(
    data: CohortData,
    cfg: RunConfig,
    out: Path | None = None,
    progress: bool = False,
    clients: list[SiteClient] | None = None,
    resume: bool = False,
) -> tuple[MultimodalSurvival, dict]:
    """The embedded runtime: the project's ServerApp body and ClientApp, sites in-process.

    Each round: every site trains from the global weights and returns an update; the server aggregates
    (strategy, optional SecAgg+ and DP); every site evaluates the new global model on its validation
    patients and returns scalars. A site failing for a reason that repeats (``ValueError``,
    ``FileNotFoundError``) stops the run (:class:`SiteDataError` naming it); one that raises otherwise or times
    out is retried once, then dropped from that round (warning) as long as ``min_sites`` remain (default:
    every site). Server state is checkpointed atomically after each round; with ``resume`` the run continues
    after the last finished round in ``out`` (the run folder's ``federated/``). With ``out``, every message a
    site sends is described in the run folder's ``privacy_ledger.jsonl``
    (:class:`~pipeline.federated.ledger.MessageLedger`; kept on resume).
    Returns the best round's model.
    """

    fc = cfg.federated
    if cfg.model.family == "linear" and clients is None:
        from pipeline.federated.linear_sites import full_batch_linear, train_linear_federated

        if full_batch_linear(cfg):  # to the pooled optimum, penalty by federated CV (no rounds to resume)
            return train_linear_federated(data, cfg, out)
    if clients is None:
        clients = site_clients(data, cfg)
    if fc.min_sites is not None and len(clients) < fc.min_sites:
        raise ValueError(f"{len(clients)} site(s) with training patients, fewer than min_sites={fc.min_sites}")
    model = clients[0].new_model() if clients else new_model(data, cfg)  # the federation's bins (discrete time)
    offset = fit_offset_federated(model, data, cfg, out, clients)  # model.skip=fitted: its weights start the rounds
    server = FederatedServer(cfg, trainable_arrays(model), out, resume=resume)
    ledger_path = RunFiles(root=out.parent).privacy_ledger if out is not None else None
    ledger = MessageLedger(ledger_path, keep=resume or offset is not None)  # keep the offset fit's lines
    info = run_embedded(clients, server, progress=progress, ledger=ledger)
    assert server.best is not None
    load_arrays(model, server.best[2])
    info = {**server.summary(), "sites": [c.site for c in clients], **info}
    if offset is not None:
        info["offset_fit"] = offset
    if out is not None:
        write_json(out / "federated_history.json", info)
    return model.eval(), info


def _wire(msg: Message) -> tuple[Message, int]:
    """The message as the receiver gets it over the network (Flower's protobuf round trip), and its size."""
    from flwr.common.serde import message_from_proto, message_to_proto

    proto = message_to_proto(msg)
    return message_from_proto(proto), proto.ByteSize()


class InProcessGrid(Grid):
    """Flower's ``Grid`` in-process: each pushed message is handled at once by the destination site's ClientApp.

    Messages cross as Flower's protobuf wire format in both directions (no shared objects, as over a network).
    Every site has a persistent ``Context`` (SecAgg+ keeps its keys there). A handler that raises becomes an
    error reply (the workflow counts it as a failure); a reply later than ``timeout`` is discarded. Every
    reply a site sends is measured in wire bytes (``bytes_by_round``) and, with ``audit``, kept in ``sent``.
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

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            site, app = self.apps[msg.metadata.dst_node_id]
            t0 = _time.perf_counter()
            try:
                delivered, _ = _wire(msg)
                reply = app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # a failing site must not take the federation down
                log.warning("site %s failed (%s: %s)", site, type(e).__name__, e)
                reason = (
                    f"{type(e).__name__}: {e}"
                    if isinstance(e, SiteDataError)
                    else f"site {site}: {type(e).__name__}: {e}"
                )
                reply = Message(Error(code=0, reason=reason), reply_to=msg)
            took = _time.perf_counter() - t0
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


def run_embedded(
    clients: list[SiteClient],
    server: FederatedServer,
    progress: bool = False,
    grid_out: list | None = None,
    ledger: MessageLedger | None = None,
) -> dict:
    """Run the ServerApp body and the ClientApp in-process over :class:`InProcessGrid`.

    Node ids are ``1000 + position``. ``grid_out``: if given, the grid is appended (tests audit it).
    ``ledger``: where every site's replies are described (flushed at each round and at the end).
    Returns runtime facts (bytes sent per site per round, seconds).
    """
    by_node = {1000 + i: c for i, c in enumerate(clients)}
    server.roster = len(clients)
    app = make_client_app(lambda ctx: by_node[ctx.node_id], ledger_for=None if ledger is None else lambda ctx: ledger)
    grid = InProcessGrid({nid: (c.site, app) for nid, c in by_node.items()}, audit=grid_out is not None)
    if grid_out is not None:
        grid_out.append(grid)
    context = Context(grid.run.run_id, SUPERLINK_NODE_ID, {}, RecordDict(), {})
    names = list(clients[0].initial_arrays()) if server.global_arrays is None else None
    start, t0 = server.next_round, _time.perf_counter()
    log.info("federated: rounds %d..%d over %d site(s)", start, server.fc.rounds - 1, len(clients))
    app_logger = logging.getLogger("flwr")
    level = app_logger.level
    app_logger.setLevel(logging.WARNING)  # Flower's per-round INFO lines: our own log says it per round
    try:
        serve(grid, context, server, names, {nid: c.site for nid, c in by_node.items()})
    finally:
        app_logger.setLevel(level)
        if ledger is not None:
            ledger.flush()
    for rec in server.history:
        per = grid.bytes_by_round.get(str(rec["round"] - start + 1))
        if per:
            rec["bytes_sent_per_site"] = {s: int(b) for s, b in per.items()}
    took = _time.perf_counter() - t0
    log.info("federated: %d round(s) in %s", len(server.history) - start, fmt_seconds(took))
    return {"runtime": "embedded", "seconds": took}
