"""After training, Flower-free: the query rounds that turn the kept weights into a model file and test metrics
without any patient value leaving a site.

Each round the server sends the kept (selected) weights and what the round needs; every site computes on its
own patients and replies with aggregates only, each checked by :func:`check_site_reply` (in the ClientApp's
disclosure mod, so it is in the privacy ledger under its phase, the message type):

- ``finish.moments``: count, sum and sum of squares of its training log hazards (only with >= k patients), its
  model input sizes, features identity and cohort time unit (no patient values);
- ``finish.cutpoints``: the histogram of its standardised training log hazards on
  :data:`~pipeline.stats.curves.RISK_EDGES` (bins under k merged);
- ``finish.horizons`` (only when the time unit gives no 1/3/5-year horizon): its training event-time
  histogram on :func:`~pipeline.stats.curves.time_edges` of the follow-up end;
- ``finish.baseline`` (Cox heads): its Breslow summary (``events``, ``risk_sum``) on the coarse grid;
- ``finish.evaluate``: on its test patients, concordant/comparable pair counts, patient and event counts (only
  with >= k test patients and events); it writes its own ``risk_scores.<site>.csv`` into its ``out`` (the
  file never leaves the site).

The server side (:func:`finish_run`) is written against ``ask(kind, request) -> {site: reply}`` so it runs
over any transport (``server_app.py`` adapts it to Flower messages). The rules are the embedded run's
(``stats.risk_cuts``, ``training.survival_summary``), so the two give the same cut-points, horizons and
baseline for the same weights. Under ``federated.secagg`` the summed keys (``secure_sum.SUMMED_KEYS``) come from
the transport's secure sum (``ask.secure``) and are never in a plain reply.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from data_specs.config import RunConfig
from models import build_model
from pipeline.federated.policy import DisclosureError, SiteFacts, check_histogram
from pipeline.federated.protocol import Arrays, load_arrays
from pipeline.federated.site import SiteClient
from pipeline.files import write_csv
from pipeline.stats.curves import (
    RISK_EDGES,
    BreslowBaseline,
    SiteSummary,
    combine,
    site_histogram,
    site_summary,
    time_edges,
)
from pipeline.stats.metrics import concordant_pairs
from pipeline.stats.risk_cuts import cutpoints_from_histogram, pooled_mean_sd
from pipeline.training.module import model_kwargs
from pipeline.training.predict import predict
from pipeline.training.survival_summary import (
    baseline_from_summaries,
    baseline_grid,
    baseline_min_events,
    follow_up_end,
    horizons_from_histogram,
    year_horizons,
)

log = logging.getLogger(__name__)

PHASES = ("finish.moments", "finish.cutpoints", "finish.horizons", "finish.baseline", "finish.evaluate")
Ask = Callable[[str, dict], dict[str, dict]]  # under SecAgg+ it also has ``secure(cfg) -> SecureAsk``
SecureAsk = Callable[[str, dict], dict[str, np.ndarray]]  # kind, request -> the sum over sites of each field
MESSAGE_PREFIX = "query.finish_"  # Flower message types are query.<identifier>: finish.moments is query.finish_moments


def message_type(phase: str) -> str:
    """The Flower message type of a finish phase (``finish.moments`` -> ``query.finish_moments``)."""
    return MESSAGE_PREFIX + phase.removeprefix("finish.")


def phase_of(kind: str) -> str | None:
    """The finish phase of a Flower message type, None for any other message."""
    return "finish." + kind.removeprefix(MESSAGE_PREFIX) if kind.startswith(MESSAGE_PREFIX) else None


def risk_scores_name(site: str) -> str:
    """A site's own risk-score file in its ``out`` (it never leaves the site)."""
    return f"risk_scores.{site}.csv"


def _own(client: SiteClient, split: str) -> np.ndarray:
    d = client.data
    idx = np.asarray(d.splits.get(split, np.zeros(0, int)), int)
    return idx[d.site[idx] == d.sites.index(client.site)]


def named_arrays(names: list[str], arrays: Arrays) -> Arrays:
    """``arrays`` keyed by parameter name: as they are, or (a deployment's server knows them by position only,
    ``"0"``, ``"1"``, ...) zipped with ``names`` in order. ``ValueError`` when neither fits."""
    if set(arrays) == set(names):
        return dict(arrays)
    if set(arrays) == {str(i) for i in range(len(names))}:
        return {n: arrays[str(i)] for i, n in enumerate(names)}
    raise ValueError(f"{len(arrays)} kept weight arrays do not match the model's {len(names)} trainable parameters")


def _model(client: SiteClient, arrays: Arrays):
    model = client.new_model()
    load_arrays(model, named_arrays([k for k, p in model.named_parameters() if p.requires_grad], arrays))
    return model.eval()


def site_reply(client: SiteClient, kind: str, request: dict, out: Path | None) -> dict:
    """What ``client`` answers to the query ``kind`` (one of :data:`PHASES`) with ``request`` (``arrays``: the
    kept weights, plus the round's inputs): flat aggregates (numbers and lists of numbers) only."""
    if kind not in PHASES:
        raise ValueError(f"unknown query {kind!r}; valid names are {list(PHASES)}")
    k = client.cfg.federated.min_count
    d, tr = client.data, client.train_idx
    if kind == "finish.horizons":
        t, e = d.time[tr], d.event[tr].astype(bool)
        return {"counts": site_histogram(t[e], time_edges(float(request["end"])), k).tolist()}
    lh = predict(_model(client, request["arrays"]), d, tr).log_hz if kind != "finish.evaluate" else None
    if kind == "finish.moments":
        n = len(tr) if len(tr) >= k else 0
        dims = d.model_dims()
        reply: dict = {"n": n, "sum": float(lh.sum()) if n else 0.0, "sumsq": float((lh**2).sum()) if n else 0.0}
        reply.update({f"dim.{name}": int(v) for name, v in dims.items()})
        reply["features"] = d.feature_attrs.model_dump_json() if d.feature_attrs is not None else ""
        reply["time_unit"] = client.time_unit or ""
        return reply
    if kind == "finish.cutpoints":
        z = (lh - float(request["mean"])) / float(request["sd"])
        return {"counts": site_histogram(z, RISK_EDGES, k).tolist()}
    if kind == "finish.baseline":
        grid, k_events = np.asarray(request["grid"], float), baseline_min_events(k)  # steps of >= k events
        s = site_summary(grid, d.time[tr], d.event[tr], lh, risk_at_start=True, min_events=k_events)
        return {"events": s.events.tolist(), "risk_sum": s.risk_sum.tolist()}
    return evaluate_site(client, request, out)


def evaluate_site(client: SiteClient, request: dict, out: Path | None) -> dict:
    """The kept model on the site's own patients: ``risk_scores.<site>.csv`` (patient_id, site, split, log_hz,
    risk_group, time, event) written in ``out``; the reply is the test pair counts and counts, or nothing when
    the site has fewer than k test patients or events."""
    d, k = client.data, client.cfg.federated.min_count
    own = np.flatnonzero(d.site == d.sites.index(client.site))
    lh = predict(_model(client, request["arrays"]), d, own).log_hz
    split = {int(i): s for s, ix in d.splits.items() for i in ix}
    cut = request["cutpoints"]
    if request.get("scheme") == "tertiles":
        lo, hi = cut["tertiles"]
        group = np.where(lh > hi, "high", np.where(lh > lo, "intermediate", "low"))
    else:
        group = np.where(lh > cut["median"], "high", "low")
    table = pd.DataFrame(
        {
            "patient_id": [d.patient_ids[i] for i in own],
            "site": client.site,
            "split": [split.get(int(i), "predict") for i in own],
            "log_hz": np.round(lh, 6),
            "risk_group": group,
            "time": d.time[own],
            "event": d.event[own].astype(int),
        }
    )
    if out is not None:
        write_csv(Path(out) / risk_scores_name(client.site), table)
    test = table[table.split == "test"]
    n, ev = len(test), int(test.event.sum())
    if n < k or ev < k:
        log.warning("site %s: %d test patient(s), %d event(s): fewer than federated.min_count=%d, no test metric "
                    "sent", client.site, n, ev, k)  # fmt: skip
        return {}
    te = (table.split == "test").to_numpy()  # the unrounded log hazards: rounding would add ties
    conc, comp = concordant_pairs(d.time[own][te], d.event[own][te].astype(bool), lh[te])
    return {"n_test": n, "test_events": ev, "concordant": float(conc), "comparable": float(comp)}


def _fail(site: str, what: str) -> DisclosureError:
    return DisclosureError(f"site {site}: disclosure policy: {what}")


def _number(site: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise _fail(site, f"{key} = {v!r} is not a finite number")
    return float(v)


DECLARED = {
    "finish.moments": {
        "n",
        "sum",
        "sumsq",
        "dim.feature_dim",
        "dim.n_genes",
        "dim.n_clinical",
        "features",
        "time_unit",
    },
    "finish.cutpoints": {"counts"},
    "finish.horizons": {"counts"},
    "finish.baseline": {"events", "risk_sum"},
    "finish.evaluate": {"n_test", "test_events", "concordant", "comparable"},
}


def check_site_reply(client: SiteClient, kind: str, reply: dict) -> None:
    """The disclosure policy for a query reply: declared keys only, counts equal to the site's own (>= k), a
    histogram with no bin of 1..k-1, a baseline summary no larger than the site's events and risk set."""
    site, k = client.site, client.cfg.federated.min_count
    if kind not in DECLARED or set(reply) - DECLARED[kind]:
        raise _fail(site, f"{kind}: undeclared key(s) {sorted(set(reply) - DECLARED.get(kind, set()))}")
    n_tr, n_ev = len(client.train_idx), client.n_events
    facts = SiteFacts(site, n_tr, n_ev, 0, 0, (), k)
    if kind == "finish.moments":  # under SecAgg+ the plain reply lacks n, sum and sumsq (secure sum)
        if "n" in reply and reply["n"] not in ({0, n_tr} if n_tr >= k else {0}):
            raise _fail(site, f"finish.moments: n = {reply['n']!r} is not the site's training count ({n_tr}, k={k})")
        for key in set(reply) & {"sum", "sumsq", "dim.feature_dim", "dim.n_genes", "dim.n_clinical"}:
            _number(site, key, reply[key])
        if not isinstance(reply["features"], str) or not isinstance(reply["time_unit"], str):
            raise _fail(site, "finish.moments: features and time_unit must be text")
        if reply["features"] and set(json.loads(reply["features"])) - set(client.data.feature_attrs.model_dump()):
            raise _fail(site, "finish.moments: features carries fields beyond the features identity")
    elif kind in ("finish.cutpoints", "finish.horizons"):
        check_histogram(facts, f"{kind}.counts", reply["counts"], n_tr if kind == "finish.cutpoints" else n_ev)
    elif kind == "finish.baseline":
        ev = [_number(site, "events", x) for x in reply["events"]]
        rs = [_number(site, "risk_sum", x) for x in reply["risk_sum"]]
        if len(ev) != len(rs) or any(x < 0 or not x.is_integer() for x in ev) or sum(ev) > n_ev:
            raise _fail(site, f"finish.baseline: events are not a histogram of at most {n_ev} events")
        if any(0 < x < k for x in ev):
            raise _fail(site, f"finish.baseline: a step of fewer than {k} events")
        if any(x < 0 for x in rs) or any(b > a * (1 + 1e-9) for a, b in zip(rs, rs[1:], strict=False)):
            raise _fail(site, "finish.baseline: risk_sum is not a shrinking risk set")
    elif reply:
        _check_evaluate(client, reply)


def _check_evaluate(client: SiteClient, reply: dict) -> None:
    site, k, d = client.site, client.cfg.federated.min_count, client.data
    test = _own(client, "test")
    n, ev = len(test), int(d.event[test].sum())
    if reply.get("n_test") != n or reply.get("test_events") != ev or min(n, ev) < k:
        raise _fail(site, f"finish.evaluate: counts {reply.get('n_test')}/{reply.get('test_events')} are not the "
                          f"site's test patients/events ({n}/{ev}), or fewer than k={k}")  # fmt: skip
    conc, comp = _number(site, "concordant", reply["concordant"]), _number(site, "comparable", reply["comparable"])
    if not (comp.is_integer() and 0 <= conc <= comp <= n * (n - 1) / 2 and (2 * conc).is_integer()):
        raise _fail(site, f"finish.evaluate: pair counts {conc}/{comp} impossible for {n} patients")


def server_model(cfg: RunConfig, dims: dict[str, int], arrays: Arrays, time_bins: list[float] | None):
    """The kept model rebuilt at the server from aggregates: the seeded network for ``dims``, the kept trainable
    weights, the federation's discrete-time bins. ``ValueError`` when a model with slides has other state (the
    slide standardisation of the linear family or of ``model.skip`` is not exchanged in a deployment)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(**dims, **model_kwargs(cfg.model, cfg.train))
    if model.n_bins:
        if time_bins is None:
            raise ValueError("train.loss=nll: no discrete-time bins from the statistics exchange")
        model.set_bin_edges(torch.tensor(time_bins, dtype=torch.float64))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    other = sorted(set(model.state_dict()) - trainable - {"bin_edges"})
    if other and dims["feature_dim"] > 0:  # slide standardisation from site summaries; defaults without slides
        raise ValueError(f"the model's slide statistics {other[:3]} are not exchanged in a deployment (model.family="
                         f"{cfg.model.family!r}, model.skip): train it embedded")  # fmt: skip
    load_arrays(model, named_arrays([k for k, p in model.named_parameters() if p.requires_grad], arrays))
    return model.eval()


def _summed(ask: Ask, secure: SecureAsk | None, kind: str, request: dict, keys: tuple[str, ...]) -> dict:
    """The sum over sites of the histograms ``keys`` of the ``kind`` replies: from the secure sum when there is
    one (SecAgg+: the server learns nothing else), else from the plain replies."""
    if secure is not None:
        got = secure(kind, request)
        return {key: np.asarray(got[key]) for key in keys}
    replies = ask(kind, request).values()
    return {key: sum(np.asarray(r[key], np.int64) for r in replies) for key in keys}


def finish_run(ask: Ask, cfg: RunConfig, stats: dict, arrays: Arrays) -> dict:
    """The server's half: query rounds over ``ask``; returns ``model`` (rebuilt), ``card`` fields (dims,
    cut-points, features, horizons, baseline) and ``metrics`` (pooled test C from summed within-site pairs).

    Under ``federated.secagg`` every summed reply comes from ``ask.secure(cfg)`` (SecAgg+, the transport's secure
    sum); the plain ``finish.moments`` then carries only the model sizes, features identity and time unit, no
    site gets its own baseline (each would be one site's values: every patient gets the pooled one) and no
    per-site test metric is formed (``per_site`` empty)."""
    k = cfg.federated.min_count
    secure = None
    if cfg.federated.secagg:
        if getattr(ask, "secure", None) is None:
            raise ValueError("federated.secagg: the finish rounds need a transport with a secure sum (ask.secure)")
        secure = ask.secure(cfg)  # type: ignore[attr-defined]
    mom = ask("finish.moments", {"arrays": arrays})
    if not mom:
        raise RuntimeError("finish.moments: no site answered")
    first = next(iter(mom.values()))
    dims = {name: int(first[f"dim.{name}"]) for name in ("feature_dim", "n_genes", "n_clinical")}
    if secure is not None:
        m = secure("finish.moments", {"arrays": arrays})
        parts = [(float(m["n"][0]), float(m["sum"][0]), float(m["sumsq"][0]))]
    else:
        parts = [(r["n"], r["sum"], r["sumsq"]) for r in mom.values()]
    mean, sd = pooled_mean_sd(parts, k)
    req = {"arrays": arrays, "mean": mean, "sd": sd}
    cut = cutpoints_from_histogram(_summed(ask, secure, "finish.cutpoints", req, ("counts",))["counts"], RISK_EDGES,
                                   mean, sd)  # fmt: skip
    unit = first["time_unit"] or None
    end = follow_up_end(stats.get("follow_up_ceilings", []), unit)
    hz = year_horizons(end, unit)
    if not hz:
        hz = horizons_from_histogram(end, _summed(ask, secure, "finish.horizons", {"end": end}, ("counts",))["counts"])
    model = server_model(cfg, dims, arrays, stats.get("time_bins"))
    out = {"model": model, "model_dims": dims, "cutpoints": cut, "horizons": hz, "sites": sorted(mom)}
    out["features"] = json.loads(first["features"]) if first["features"] else None
    if model.n_bins == 0 and secure is not None:
        grid = baseline_grid(end, hz)
        b = secure("finish.baseline", {"arrays": arrays, "grid": grid.tolist()})
        if b["events"].sum() > 0:
            summed = SiteSummary(grid, b["events"].astype(float), b["risk_sum"])
            out["baseline"] = BreslowBaseline(grid, combine([summed])).state()  # no per-site curve: pooled for all
    elif model.n_bins == 0:
        grid = baseline_grid(end, hz)
        summ = {
            s: SiteSummary(grid, np.asarray(r["events"], float), np.asarray(r["risk_sum"], float))
            for s, r in ask("finish.baseline", {"arrays": arrays, "grid": grid.tolist()}).items()
        }
        if any(v.events.sum() > 0 for v in summ.values()):
            out["baseline"] = baseline_from_summaries(summ, baseline_min_events(k))
    req = {"arrays": arrays, "cutpoints": cut, "scheme": cfg.evaluate.risk_groups}
    if secure is not None:  # the sum only: every site's test pairs and counts (zeros from a site under k)
        tot = {key: float(v[0]) for key, v in secure("finish.evaluate", req).items()}
        out["metrics"] = pooled_test_metrics({"all sites": tot} if tot["n_test"] else {}, [])
        out["metrics"].update(per_site={}, per_site_note="federated.secagg: the server learns only the sum over sites")
    else:
        out["metrics"] = pooled_test_metrics(ask("finish.evaluate", req), sorted(mom))
    return out


def pooled_test_metrics(replies: dict[str, dict], sites: list[str]) -> dict:
    """``metrics.json`` of a deployment: Harrell's C on the test patients from the sites' summed within-site
    pair counts (pairs across sites are not formed: no site sees another's patients), and per site where sent."""
    sent = {s: r for s, r in replies.items() if r}

    def one(rs: list[dict]) -> dict:
        conc, comp = sum(r["concordant"] for r in rs), sum(r["comparable"] for r in rs)
        return {
            "cindex": conc / comp if comp else float("nan"),
            "concordant": conc,
            "comparable": comp,
            "n": sum(int(r["n_test"]) for r in rs),
            "events": sum(int(r["test_events"]) for r in rs),
        }

    return {
        "split": "test",
        "pairs": "within site",
        "pooled": one(list(sent.values())) if sent else {},
        "per_site": {s: one([r]) for s, r in sorted(sent.items())},
        "sites_without_metrics": sorted(set(sites) - set(sent)),
    }


def write_outputs(root: Path, cfg: RunConfig, stats: dict, parts: dict, train_info: dict) -> dict[str, Path]:
    """A deployment's run folder from :func:`finish_run`'s ``parts``: ``model.safetensors`` (weights,
    normalisers from the statistics exchange, cut-points, horizons, baseline; no patient id, no exact time),
    ``metrics.json``, ``train_summary.json`` and ``config.yaml``."""
    from data_specs.artifacts import FeatureAttrs, RunFiles
    from pipeline.files import write_json, write_text
    from pipeline.training.bundle import card_from_parts, save_model

    rf = RunFiles(root=Path(root))
    feats = parts.get("features")
    card = card_from_parts(
        parts["model"],
        cfg,
        parts["model_dims"],
        parts["cutpoints"],
        features=FeatureAttrs.model_validate(feats) if feats else None,
        omics=stats.get("omics"),
        clinical=stats.get("clinical"),
        sites=parts["sites"],
        horizons=parts["horizons"],
        baseline=parts.get("baseline"),
        train_info=train_info,
    )
    written = {"config": write_text(rf.config, cfg.to_yaml())}
    save_model(rf.model, parts["model"], card)
    written["model"] = rf.model
    written["metrics"] = write_json(rf.metrics, parts["metrics"])
    written["train_summary"] = write_json(rf.train_summary, train_info)
    return written
