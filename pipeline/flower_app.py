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

import json
import logging
import time as _time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from data_specs.config import RunConfig
from pipeline.federated import Arrays, Evaluation, FederatedServer, SiteClient, Update

log = logging.getLogger(__name__)

SECAGG_QUANTISATION = 2**26  # with modulus 2**32, up to 64 sites sum without overflow


# ----------------------------------------------------------------------------------------------- client


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
STATS_KEY = "histofuse.cohort_statistics"


def _dumps(obj) -> str:
    """JSON with numpy arrays/scalars as tagged lists (summaries and normaliser states: no patient axis)."""

    def enc(o):
        if isinstance(o, np.ndarray):
            return {"__ndarray__": o.tolist(), "dtype": str(o.dtype)}
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"cannot encode {type(o).__name__}")

    return json.dumps(obj, default=enc)


def _loads(text: str):
    return json.loads(text, object_hook=lambda d: np.asarray(d["__ndarray__"], d["dtype"]) if "__ndarray__" in d else d)


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
    from pipeline.data import assign_splits
    from pipeline.omics import ClinicalNormaliser, OmicsNormaliser, read_omics

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
    from pipeline.omics import ClinicalNormaliser, OmicsNormaliser

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
        from pipeline.run import load_run_data

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


# ----------------------------------------------------------------------------------------------- server


class HistofuseStrategy(Strategy):
    """Flower's Strategy interface over :class:`FederatedServer` (all sites every round; round-numbered
    absolutely so a resumed run continues the same sequence)."""

    def __init__(self, server: FederatedServer, names: list[str] | None = None):
        self.server = server
        self.names = names
        self.start = server.next_round
        self.node_site: dict[int, str] = {}
        self._round: dict = {}

    def _abs(self, server_round: int) -> int:
        return self.start + server_round - 1

    def _arrays(self, arrs: list[np.ndarray]) -> Arrays:
        if self.names is None:
            self.names = [str(i) for i in range(len(arrs))]
        return dict(zip(self.names, arrs, strict=True))

    def _params(self) -> Parameters:
        assert self.server.global_arrays is not None and self.names is not None
        return ndarrays_to_parameters([self.server.global_arrays[k] for k in self.names])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        if self.server.global_arrays is None:
            return None  # deployment: Flower asks one site for the seeded initial weights
        if self.names is None:
            self.names = list(self.server.global_arrays)
        return self._params()

    def _clients(self, client_manager: ClientManager) -> list[ClientProxy]:
        client_manager.wait_for(self.server.fc.min_sites, timeout=3600)
        return sorted(client_manager.all().values(), key=lambda c: str(c.cid))

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        rnd = self._abs(server_round)
        if self.server.global_arrays is None:  # first round of a deployment: the site-given initial weights
            self.server.global_arrays = self._arrays(parameters_to_ndarrays(parameters))
        clients = self._clients(client_manager)
        self._round = {"t0": _time.perf_counter(), "sent": [int(c.node_id) for c in clients]}
        ins = FitIns(parameters, self.server.fit_config(rnd))
        return [(c, ins) for c in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list):
        rnd = self._abs(server_round)
        answered = set()
        updates = []
        for proxy, res in results:
            site = str(res.metrics.get("site", f"node {proxy.node_id}"))
            self.node_site[int(proxy.node_id)] = site
            answered.add(int(proxy.node_id))
            metrics = {k: float(v) for k, v in res.metrics.items() if k != "site"}
            updates.append(Update(self._arrays(parameters_to_ndarrays(res.parameters)), int(res.num_examples), metrics))
        dropped = [self.node_site.get(n, f"node {n}") for n in self._round.get("sent", []) if n not in answered]
        if dropped:
            log.warning("round %d: dropped site(s) %s; %d site(s) aggregated", rnd, dropped, len(updates))
        new = self.server.aggregate(rnd, updates, dropped)
        losses = [(u.metrics["train_loss"], u.num_examples) for u in updates if "train_loss" in u.metrics]
        self._round.update(
            dropped=dropped,
            train_loss=float(np.average([x for x, _ in losses], weights=[max(w, 1) for _, w in losses]))
            if losses
            else float("nan"),
            update_bytes=int(sum(4 * a.size for a in updates[0].arrays.values())) if updates else 0,  # float32 payload
        )
        return ndarrays_to_parameters([new[k] for k in self.names or []]), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        ins = EvaluateIns(parameters, {"round": self._abs(server_round)})
        return [(c, ins) for c in self._clients(client_manager)]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list):
        rnd = self._abs(server_round)
        for f in failures:
            log.warning("round %d: a site failed to evaluate (%s)", rnd, f)
        evals = {}
        for proxy, res in results:
            m = dict(res.metrics)
            site = str(m.pop("site", f"node {proxy.node_id}"))
            evals[site] = Evaluation(int(res.num_examples), {k: float(v) for k, v in m.items()})
        r = self._round
        rec = {
            "seconds": _time.perf_counter() - r.get("t0", _time.perf_counter()),
            "dropped": r.get("dropped", []),
            "train_loss": r.get("train_loss", float("nan")),
            "update_bytes": r.get("update_bytes", 0),
        }
        rec = self.server.finish_round(rnd, evals, rec)
        return rec["val_loss"], {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None  # no central data: validation is pooled from the sites' scalars


class _TimeoutGrid(Grid):
    """Forwards to a Grid, giving every ``send_and_receive`` the round timeout (the workflows pass none)."""

    def __init__(self, inner: Grid, timeout: float | None):
        self.inner, self.timeout = inner, timeout

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
        return self.inner.send_and_receive(messages, timeout=timeout if timeout is not None else self.timeout)


def serve(
    grid: Grid,
    context: Context,
    server: FederatedServer,
    names: list[str] | None,
    node_site: dict[int, str] | None = None,
) -> HistofuseStrategy:
    """The ServerApp body shared by both runtimes: legacy workflow, SecAgg+ when configured.

    ``node_site``: site names of node ids known in advance (otherwise learnt from the sites' replies).
    """
    fc = server.fc
    strategy = HistofuseStrategy(server, names)
    strategy.node_site.update(node_site or {})
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=server.rounds_left), strategy=strategy)
    fit_workflow = None
    if fc.secagg:
        n = max(fc.min_sites, len(list(grid.get_node_ids())))
        # Flower: an integer share count must exceed 2; 1.0 means "every sampled site" (small federations)
        shares: int | float = min(fc.secagg_shares, n) if min(fc.secagg_shares, n) > 2 else 1.0
        fit_workflow = SecAggPlusWorkflow(
            num_shares=shares,
            reconstruction_threshold=min(fc.secagg_threshold, n),
            max_weight=1.0 if fc.dp_noise > 0 else fc.secagg_max_weight,
            clipping_range=fc.secagg_clip,
            quantization_range=SECAGG_QUANTISATION,
            timeout=fc.round_timeout,
        )
    DefaultWorkflow(fit_workflow=fit_workflow)(_TimeoutGrid(grid, fc.round_timeout), legacy)
    return strategy


def exchange_cohort_statistics(grid: Grid, cfg: RunConfig, timeout: float = 3600.0) -> dict:
    """Before training: every site sends its omics/clinical summaries (no patient axis), the server
    combines them into cohort-level normalisers and sends those back, so every site uses one feature space.

    Waits until ``federated.min_sites`` SuperNodes are connected. Returns the combined normaliser states.
    """
    from pipeline.omics import ClinicalNormaliser, OmicsNormaliser, read_gmt, read_panel

    t0 = _time.time()
    while len(list(grid.get_node_ids())) < cfg.federated.min_sites:
        if _time.time() - t0 > timeout:
            raise RuntimeError(f"fewer than min_sites={cfg.federated.min_sites} SuperNodes after {timeout:.0f} s")
        _time.sleep(1.0)
    nodes = sorted(grid.get_node_ids())
    ask = [Message(RecordDict(), nid, "query.summaries", group_id="statistics") for nid in nodes]
    omics, clinical = [], []
    for reply in grid.send_and_receive(ask, timeout=cfg.federated.round_timeout):
        if reply.has_error():
            log.warning("node %s sent no summaries (%s)", reply.metadata.src_node_id, reply.error.reason)
            continue
        summ = _loads(str(reply.content.config_records["summaries"]["json"]))
        omics += [summ["omics"]] if "omics" in summ else []
        clinical += [summ["clinical"]] if "clinical" in summ else []
    stats: dict = {}
    o = cfg.omics
    if omics:
        panel = read_panel(o.gene_panel) if o.gene_panel else None
        sets = read_gmt(o.gene_sets) if o.gene_sets else None
        norm = OmicsNormaliser.from_summaries(omics, panel, o.max_genes, sets, o.min_pathway_genes)
        stats["omics"] = norm.state()
    if clinical:
        stats["clinical"] = ClinicalNormaliser.from_summaries(clinical).state()
    body = ConfigRecord({"json": _dumps(stats)})
    tell = [Message(RecordDict({"stats": body}), nid, "query.normalisers", group_id="statistics") for nid in nodes]
    acks = list(grid.send_and_receive(tell, timeout=cfg.federated.round_timeout))
    log.info(
        "cohort statistics from %d omics / %d clinical site summaries sent to %d site(s)",
        len(omics),
        len(clinical),
        sum(a.has_content() for a in acks),
    )
    return stats


server_app = ServerApp()


@server_app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    """Deployment ServerApp: statistics exchange, then training; state and history under ``out/federated``."""
    cfg = _run_config(dict(context.run_config))
    out = Path(cfg.out) / "federated"
    resume = str(context.run_config.get("resume", "false")).lower() == "true"
    exchange_cohort_statistics(grid, cfg)
    server = FederatedServer(cfg, None, out, resume=resume)
    strategy = serve(grid, context, server, None)
    info = {**server.summary(), "sites": sorted(set(strategy.node_site.values()))}
    (out / "federated_history.json").write_text(json.dumps(info, indent=2, default=float))
    log.info("federated run finished: best round %d; state in %s", info["best_round"], out)


# ----------------------------------------------------------------------------------------------- embedded


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
                reply = Message(Error(code=0, reason=f"site {site}: {type(e).__name__}: {e}"), reply_to=msg)
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
    clients: list[SiteClient], server: FederatedServer, progress: bool = False, grid_out: list | None = None
) -> dict:
    """Run the ServerApp body and the ClientApp in-process over :class:`InProcessGrid`.

    Node ids are ``1000 + position``. ``grid_out``: if given, the grid is appended (tests audit it).
    Returns runtime facts (bytes sent per site per round, seconds).
    """
    by_node = {1000 + i: c for i, c in enumerate(clients)}
    app = make_client_app(lambda ctx: by_node[ctx.node_id])
    grid = InProcessGrid({nid: (c.site, app) for nid, c in by_node.items()}, audit=grid_out is not None)
    if grid_out is not None:
        grid_out.append(grid)
    context = Context(grid.run.run_id, SUPERLINK_NODE_ID, {}, RecordDict(), {})
    names = list(clients[0].initial_arrays()) if server.global_arrays is None else None
    start, t0 = server.next_round, _time.perf_counter()
    app_logger = logging.getLogger("flwr")
    level = app_logger.level
    app_logger.setLevel(logging.WARNING)  # Flower's per-round INFO lines: our own log says it per round
    try:
        serve(grid, context, server, names, {nid: c.site for nid, c in by_node.items()})
    finally:
        app_logger.setLevel(level)
    for rec in server.history:
        per = grid.bytes_by_round.get(str(rec["round"] - start + 1))
        if per:
            rec["bytes_sent_per_site"] = {s: int(b) for s, b in per.items()}
    return {"runtime": "embedded", "seconds": _time.perf_counter() - t0}
