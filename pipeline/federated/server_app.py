"""The Flower ServerApp: :class:`~pipeline.federated.server.FederatedServer` behind Flower's Strategy interface.

:func:`run_server` is the body both runtimes run (embedded: ``embedded.py``; deployment: ``server_app``, the
``[tool.flwr.app.components]`` serverapp): :func:`exchange_cohort_statistics` (site summaries in, cohort-level
normalisers out, fitted by ``omics.normalise.fit_normalisers``), then :func:`serve`, which drives Flower's legacy
workflow (``LegacyContext`` + ``DefaultWorkflow``: SecAgg+ is available only there, ``SecAggPlusWorkflow`` when
``federated.secagg`` is on; then each round's validation is a secure sum too, run from the strategy's
``configure_evaluate``), then the finish query rounds (:func:`finish_ask`). Aggregation, DP, validation pooling
and checkpoints live in ``server.py``; this module only adapts them to Flower.
"""

from __future__ import annotations

import logging
import time as _time
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from data_specs.config import RunConfig
from data_specs.summaries import site_summaries_from_wire
from pipeline.federated.failures import stop_on_repeating_failure
from pipeline.federated.protocol import (
    SECAGG_QUANTISATION,
    Arrays,
    Evaluation,
    SiteDataError,
    Update,
    decode_record,
    encode_record,
    is_repeating_failure,
    run_config_from_flower,
    secagg_shares_threshold,
)
from pipeline.federated.secure_sum_app import (
    ForwardingGrid,
    secure_event_histogram,
    secure_finish_ask,
    secure_summaries,
    secure_validation,
)
from pipeline.federated.server import FederatedServer
from pipeline.omics.normalise import fit_normalisers

log = logging.getLogger(__name__)


class HistofuseStrategy(Strategy):
    """Flower's Strategy interface over :class:`FederatedServer` (all sites every round; round-numbered
    absolutely so a resumed run continues the same sequence)."""

    def __init__(self, server: FederatedServer, names: list[str] | None = None):
        self.server = server
        self.names = names
        self.start = server.next_round
        self.node_site: dict[int, str] = {}
        self.retried: dict[str, list[int]] = {}  # group id (Flower's round) -> nodes asked twice
        self.grid: Grid | None = None  # the run's grid (serve): a secure validation sum runs over it
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
        client_manager.wait_for(self.server.required_sites, timeout=3600)
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
        stop_on_repeating_failure(rnd, failures)
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
        """Plain evaluate messages to every site; under a secure validation (``server.secure_eval``: SecAgg+, no
        DP) none: the round's validation runs here as a secure sum on the new global weights (the sites get them
        as the sum's parameters) and the round finishes with its totals
        (:meth:`~pipeline.federated.server.FederatedServer.finish_secure_round`)."""
        rnd = self._abs(server_round)
        if not self.server.secure_eval:
            ins = EvaluateIns(parameters, {"round": rnd})
            return [(c, ins) for c in self._clients(client_manager)]
        if self.grid is None:
            raise RuntimeError("a secure validation needs the strategy's grid (set by serve)")
        try:
            total, _ = secure_validation(self.grid, self.server.cfg, self._params(), rnd)
        except SiteDataError:
            raise
        except RuntimeError as e:  # too few sites answered every SecAgg+ stage: no validation this round
            log.warning("round %d: %s", rnd, e)
            total = None
        self.server.finish_secure_round(rnd, total, self._round_record(server_round))
        return []

    def _round_record(self, server_round: int) -> dict:
        r = self._round
        return {
            "seconds": _time.perf_counter() - r.get("t0", _time.perf_counter()),
            "dropped": r.get("dropped", []),
            "retried": [self.node_site.get(n, f"node {n}") for n in self.retried.get(str(server_round), [])],
            "train_loss": r.get("train_loss", float("nan")),
            "update_bytes": r.get("update_bytes", 0),
        }

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list):
        rnd = self._abs(server_round)
        stop_on_repeating_failure(rnd, failures)
        for f in failures:
            log.warning("round %d: a site failed to evaluate (%s)", rnd, f)
        evals = {}
        for proxy, res in results:
            m = dict(res.metrics)
            site = str(m.pop("site", f"node {proxy.node_id}"))
            evals[site] = Evaluation(int(res.num_examples), {k: float(v) for k, v in m.items()})
        rec = self.server.finish_round(rnd, evals, self._round_record(server_round))
        return rec["val_loss"], {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None  # no central data: validation is pooled from the sites' scalars


class _TimeoutGrid(ForwardingGrid):
    """Forwards to a Grid, giving every ``send_and_receive`` the round timeout (the workflows pass none).

    Without ``retry`` (SecAgg+, whose stages are not re-sent) an error reply that will repeat
    (:class:`SiteDataError`, e.g. a reply the disclosure policy refused) stops the run: Flower's SecAgg+ workflow
    would only halt the round and go on.

    With ``retry``, a site that did not answer (timeout, lost connection) or answered with an error that is
    not a :class:`SiteDataError` is asked once more; its node id is recorded once in ``retried[group_id]``
    (the round), even when both its train and its evaluate message were re-sent.
    """

    def __init__(self, inner: Grid, timeout: float | None, retry: bool = False):
        self.inner, self.timeout, self.retry = inner, timeout, retry
        self.retried: dict[str, list[int]] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        t = timeout if timeout is not None else self.timeout
        replies = list(self.inner.send_and_receive(messages, timeout=t))
        if not self.retry:  # SecAgg+: a stage that fails halts Flower's workflow silently, so stop the run here
            for r in replies:
                if r.has_error() and is_repeating_failure(r.error.reason):
                    raise SiteDataError(f"round {r.metadata.group_id}: {r.error.reason}; fix the site's data and "
                                        "rerun (--resume continues)")  # fmt: skip
            return replies
        good = {r.metadata.src_node_id for r in replies if not r.has_error() or is_repeating_failure(r.error.reason)}
        again = [m for m in messages if m.metadata.dst_node_id not in good]
        if not again:
            return replies
        for m in again:
            log.warning(
                "node %s: no usable answer to %s; asking once more", m.metadata.dst_node_id, m.metadata.message_type
            )
            asked = self.retried.setdefault(m.metadata.group_id, [])
            if int(m.metadata.dst_node_id) not in asked:  # train and evaluate share the round's group id
                asked.append(int(m.metadata.dst_node_id))
        resend = [
            Message(m.content, m.metadata.dst_node_id, m.metadata.message_type, group_id=m.metadata.group_id)
            for m in again
        ]
        by_node = {r.metadata.src_node_id: r for r in replies}
        by_node.update({r.metadata.src_node_id: r for r in self.inner.send_and_receive(resend, timeout=t)})
        return list(by_node.values())


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
        n = max(server.required_sites, len(list(grid.get_node_ids())))
        n_shares, threshold = secagg_shares_threshold(fc.secagg_shares, fc.secagg_threshold, n)
        # Flower: an integer share count must exceed 2; 1.0 means "every sampled site" (small federations)
        shares: int | float = n_shares if n_shares > 2 else 1.0
        fit_workflow = SecAggPlusWorkflow(
            num_shares=shares,
            reconstruction_threshold=threshold,
            max_weight=1.0 if fc.dp_noise > 0 else fc.secagg_max_weight,
            clipping_range=fc.secagg_clip,
            quantization_range=SECAGG_QUANTISATION,
            timeout=fc.round_timeout,
        )
    timeout_grid = _TimeoutGrid(grid, fc.round_timeout, retry=not fc.secagg)  # SecAgg+ stages are not re-sent
    strategy.retried = timeout_grid.retried
    strategy.grid = grid
    DefaultWorkflow(fit_workflow=fit_workflow)(timeout_grid, legacy)
    return strategy


def exchange_cohort_statistics(grid: Grid, cfg: RunConfig, timeout: float = 3600.0) -> dict:
    """Before training: every site sends its omics/clinical summaries (no patient axis), the server
    combines them into cohort-level normalisers and sends those back, so every site uses one feature space.

    Waits until ``federated.min_sites`` SuperNodes (at least one) are connected. A site whose summaries fail
    for a reason that repeats stops the run. Returns the combined normaliser states.
    """
    t0 = _time.time()
    need = cfg.federated.min_sites or 1
    while len(list(grid.get_node_ids())) < need:
        if _time.time() - t0 > timeout:
            raise RuntimeError(f"fewer than min_sites={need} SuperNodes after {timeout:.0f} s")
        _time.sleep(1.0)
    nodes = sorted(grid.get_node_ids())
    nll = cfg.train.loss == "nll"
    want = RecordDict({"want": ConfigRecord({"follow_up": True})})  # ceilings: time grids after training too
    ask = [Message(want, nid, "query.summaries", group_id="statistics") for nid in nodes]
    summaries, ceilings = secure_summaries(grid, nodes, cfg) if cfg.federated.secagg else ([], [])  # SecAgg+: sums
    for reply in [] if cfg.federated.secagg else grid.send_and_receive(ask, timeout=cfg.federated.round_timeout):
        if reply.has_error():
            if is_repeating_failure(reply.error.reason):
                raise SiteDataError(f"statistics exchange: {reply.error.reason}")
            log.warning("node %s sent no summaries (%s)", reply.metadata.src_node_id, reply.error.reason)
            continue
        body = decode_record(str(reply.content.config_records["summaries"]["json"]))
        summaries.append(site_summaries_from_wire(body, site=f"node {reply.metadata.src_node_id}"))
        if "follow_up" in reply.content.config_records:
            ceilings.append(float(reply.content.config_records["follow_up"]["ceiling"]))
    o = cfg.omics
    omics_norm, clinical_norm = fit_normalisers(summaries, o.gene_panel, o.max_genes, o.gene_sets, o.min_pathway_genes)
    stats: dict = {}
    if omics_norm is not None:
        stats["omics"] = omics_norm.state()
    if clinical_norm is not None:
        stats["clinical"] = clinical_norm.state()
    if nll:
        stats["time_bins"] = exchange_time_bins(grid, nodes, max(ceilings, default=0.0), cfg).tolist()
    body = ConfigRecord({"json": encode_record(stats)})
    tell = [Message(RecordDict({"stats": body}), nid, "query.normalisers", group_id="statistics") for nid in nodes]
    acks = list(grid.send_and_receive(tell, timeout=cfg.federated.round_timeout))
    log.info(
        "cohort statistics from %d omics / %d clinical site summaries sent to %d site(s)",
        sum("omics" in x for x in summaries),
        sum("clinical" in x for x in summaries),
        sum(a.has_content() for a in acks),
    )
    return {**stats, "follow_up_ceilings": ceilings}  # the ceilings stay at the server


def exchange_time_bins(grid: Grid, nodes: list[int], end: float, cfg: RunConfig) -> np.ndarray:
    """Discrete-time bins for every site: each sends its event-time histogram on ``time_edges(end)`` (bins under
    k merged), the server reads the bins off their sum (:func:`~pipeline.stats.curves.bins_from_histogram`)."""
    from pipeline.stats.curves import TIME_BINS, bins_from_histogram, time_edges

    if end <= 0:
        raise ValueError(f"discrete-time bins: no site has federated.min_count={cfg.federated.min_count} patients")
    if cfg.federated.secagg:  # the sum of the sites' histograms only (secure_sum_app)
        return bins_from_histogram(time_edges(end), secure_event_histogram(grid, end, cfg), cfg.train.n_bins)
    grid_rec = RecordDict({"grid": ConfigRecord({"end": float(end), "bins": TIME_BINS})})
    ask = [Message(grid_rec, nid, "query.event_histogram", group_id="statistics") for nid in nodes]
    total = np.zeros(TIME_BINS, np.int64)
    for reply in grid.send_and_receive(ask, timeout=cfg.federated.round_timeout):
        if reply.has_error():
            if is_repeating_failure(reply.error.reason):
                raise SiteDataError(f"statistics exchange: {reply.error.reason}")
            log.warning("node %s sent no event-time histogram (%s)", reply.metadata.src_node_id, reply.error.reason)
            continue
        total += np.asarray(list(reply.content.config_records["histogram"]["counts"]), np.int64)
    return bins_from_histogram(time_edges(end), total, cfg.train.n_bins)


def finish_ask(grid: Grid, timeout: float | None):
    """``ask(phase, request) -> {site: reply}`` for :func:`pipeline.federated.finish.finish_run`: one query message
    per node (``query.finish_<name>``, group ``finish``); an error reply that repeats stops the run, another is
    left out (warning)."""
    from pipeline.federated.finish import message_type

    def ask(kind: str, request: dict) -> dict[str, dict]:
        body = RecordDict({"query": ConfigRecord({"json": encode_record(request)})})
        msgs = [Message(body, n, message_type(kind), group_id="finish") for n in sorted(grid.get_node_ids())]
        out = {}
        for r in grid.send_and_receive(msgs, timeout=timeout):
            if r.has_error():
                if is_repeating_failure(r.error.reason):
                    raise SiteDataError(f"{kind}: {r.error.reason}")
                log.warning("%s: node %s did not answer (%s)", kind, r.metadata.src_node_id, r.error.reason)
                continue
            rec = dict(r.content.config_records["finish"])
            out[str(rec.pop("site"))] = rec
        return out

    ask.secure = partial(secure_finish_ask, grid)  # type: ignore[attr-defined]  # SecAgg+ sums for finish_run
    return ask


server_app = ServerApp()


def run_server(grid: Grid, context: Context, cfg: RunConfig, server: FederatedServer, names: list[str] | None = None,
               node_site: dict[int, str] | None = None, finish: bool = True, statistics: bool = True):  # fmt: skip
    """The ServerApp body of both runtimes (deployment: :func:`_deployed_main`; embedded: ``embedded.py``): the
    statistics exchange, the training rounds (:func:`serve`), then the finish query rounds on the kept weights
    (:func:`pipeline.federated.lifecycle.after_training`). Returns its ``LifecycleResult``."""
    from pipeline.federated.lifecycle import after_training, warn_unset_min_sites

    stats = exchange_cohort_statistics(grid, cfg) if statistics else {}
    server.roster = len(list(grid.get_node_ids()))  # the sites connected at the statistics exchange
    warn_unset_min_sites(cfg, server.roster)
    strategy = serve(grid, context, server, names, node_site)
    ask = finish_ask(grid, cfg.federated.round_timeout) if finish else None
    return after_training(ask, cfg, stats, server, strategy.node_site)


@server_app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    """Deployment ServerApp: :func:`run_server` (state and history under ``out/federated``), then the run folder
    from the sites' aggregates: model file, metrics, summary and what the report needs (``lifecycle``)."""
    from pipeline.federated.lifecycle import write_deployment
    from pipeline.training.skip_auto import resolve_skip

    cfg = resolve_skip(run_config_from_flower(dict(context.run_config)), runtime="deployment")[0]  # auto: none
    resume = str(context.run_config.get("resume", "false")).lower() == "true"
    server = FederatedServer(cfg, None, Path(cfg.out) / "federated", resume=resume)
    write_deployment(Path(cfg.out), cfg, run_server(grid, context, cfg, server))
