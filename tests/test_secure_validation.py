"""Validation during training under SecAgg+ (issue 12): each round's validation is a secure sum of the sites'
counts, loss sums and pair counts, pooled exactly as plain replies are, and no plain scalar leaves a site."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from clinical_cohort import write_clinical_cohort

from data_specs import load_cohort, resolve_config
from pipeline.federated.embedded import run_embedded
from pipeline.federated.ledger import MessageLedger, check_no_values, read_ledger
from pipeline.federated.protocol import SiteDataError, trainable_arrays
from pipeline.federated.server import FederatedServer
from pipeline.federated.site import site_clients
from pipeline.training.data import load_run_data
from pipeline.training.module import new_model

# the linear family by mini-batches: its log hazards have no near-ties that SecAgg+'s quantisation of the updates
# (~1e-6 on the weights) could flip, so the two runs' pair counts agree exactly
CONFIG = {"train.batch_size": 8, "federated.rounds": 4, "federated.local_epochs": 1, "federated.min_sites": 3,
          "federated.min_count": 2, "train.select": "cindex", "model.family": "linear", "train.linear_fit": "sgd",
          "model.skip": "none", "train.lr": 0.05}  # fmt: skip
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


@pytest.fixture(scope="module")
def cohort_path(tmp_path_factory) -> Path:
    """Clinical-only, 3 sites x 40 patients (24 train, 10 val, 6 test each), survival from a Cox model on the two
    clinical columns: every site has at least 2 validation events (k = 2 in plain runs: every site sends)."""
    out = tmp_path_factory.mktemp("secure_validation_cohort")
    return write_clinical_cohort(
        out, "secure_validation_test", seed=5, split=(24, 10, 6), censor=(600, 3000), prefix="V"
    )


def _cfg(cohort_path: Path, **extra):
    cfg = resolve_config(None, [f"{k}={v}" for k, v in {**CONFIG, **extra}.items()])
    return cfg.model_copy(update={"cohort": cohort_path})


def _run(cohort_path: Path, tmp_path: Path | None = None, **extra):
    """The training rounds embedded (in-process grid, the project's ClientApp): server, clients, grid, ledger."""
    cfg = _cfg(cohort_path, **extra)
    data = load_run_data(load_cohort(cohort_path), cfg)
    clients = site_clients(data, cfg)
    server = FederatedServer(cfg, trainable_arrays(new_model(data, cfg)))
    grids: list = []
    ledger = MessageLedger(tmp_path / "privacy_ledger.jsonl" if tmp_path is not None else None)
    run_embedded(clients, server, grid_out=grids, ledger=ledger)
    return server, clients, grids[0], ledger


@pytest.fixture(scope="module")
def runs(cohort_path, tmp_path_factory):
    plain = _run(cohort_path)
    secure = _run(cohort_path, tmp_path_factory.mktemp("secure_ledger"), **{"federated.secagg": True})
    return plain, secure


def test_secure_validation_pools_as_the_plain_run_and_keeps_the_same_round(runs):
    """Same seed, plain vs SecAgg+: every round's pooled validation C-index and loss agree (the weights differ only
    by SecAgg+'s update quantisation), the server keeps the same round by train.select, and it learnt only the
    consortium totals (no per-site C-index)."""
    (plain, clients, _, _), (secure, _, _, _) = runs
    assert all(c.facts().n_val_events >= 2 for c in clients)  # every plain site sends: the two pool the same sites
    hp, hs = plain.history, secure.history
    assert [r["round"] for r in hs] == [r["round"] for r in hp] == [0, 1, 2, 3]
    n_val = sum(len(c.val_idx) for c in clients)
    events = sum(c.facts().n_val_events for c in clients)
    for p, s in zip(hp, hs, strict=True):
        assert math.isfinite(s["val_cindex"]) and math.isfinite(s["val_loss"]), s
        np.testing.assert_allclose(s["val_cindex"], p["val_cindex"], atol=1e-9)
        np.testing.assert_allclose(s["val_loss"], p["val_loss"], rtol=1e-4)
        assert s["site_val_cindex"] == {} and len(p["site_val_cindex"]) == 3
        assert s["val_sum"] == {"sites": 3, "patients": n_val, "events": events}
    assert secure.best is not None and plain.best is not None
    assert secure.best[1] == plain.best[1] != 3  # selected by validation, not the last round
    assert secure.summary()["select"] == "cindex"
    assert secure.summary()["best_val_cindex"] == pytest.approx(plain.summary()["best_val_cindex"], abs=1e-9)


def test_the_secure_sum_equals_the_plain_replies_sum_for_the_same_weights(runs):
    """For the same weights the decoded secure sum is the sum of the sites' plain validation values (counts
    exactly, reals to float64 rounding)."""
    from flwr.common import ndarrays_to_parameters

    from pipeline.federated.secure_sum_app import secure_validation

    _, (secure, clients, grid, _) = runs
    arrays = secure.global_arrays
    names = clients[0].param_names()
    total, n = secure_validation(grid, secure.cfg, ndarrays_to_parameters([arrays[k] for k in names]), 99)
    plain = [c._validation(arrays) for c in clients]
    assert n == 3 and total["sites"] == 3 and total["n_val"] == sum(len(c.val_idx) for c in clients)
    assert total["val_events"] == sum(m["events"] for m in plain)
    assert total["comparable"] == sum(m["comparable"] for m in plain)
    np.testing.assert_allclose(total["concordant"], sum(m["concordant"] for m in plain), rtol=0, atol=1e-12)
    np.testing.assert_allclose(total["loss_sum"], sum(m["loss_sum"] for m in plain), rtol=1e-13)


def test_no_plain_scalar_leaves_a_site_under_secagg_and_every_secure_validation_is_in_the_ledger(runs):
    """What the sites actually sent under SecAgg+: training replies with plain weight 1 and no metric but the
    site's name, no plain array, no evaluate reply; each round's validation as the four SecAgg+ stages of phase
    ``evaluate`` in every site's ledger (the masked-vector stage naming the round); no ledger line holds a value."""
    _, (_, clients, grid, ledger) = runs
    ledger.flush()
    lines = list(read_ledger(ledger.path))
    for line in lines:
        check_no_values(line)
    assert not any("error" in x for x in lines)
    kinds = set()
    for _, m in grid.sent:
        c = m.content
        kinds.add(m.metadata.message_type)
        assert not any(len(r) for r in c.array_records.values())  # masked integer vectors only
        assert "evaluateres.metrics" not in c.config_records
        if "fitres.num_examples" in c.metric_records:
            assert dict(c.metric_records["fitres.num_examples"]) == {"num_examples": 1}
            assert set(c.config_records["fitres.metrics"]) <= {"site"}
    assert kinds == {"train"}  # SecAgg+ stages only: no plain evaluate message at all
    for c in clients:
        mine = [x for x in lines if x["site"] == c.site]
        phases = {x["phase"] for x in mine}
        assert {f"evaluate.secagg.{st}" for st in STAGES} | {f"train.secagg.{st}" for st in STAGES} == phases
        rounds = sorted(x["round"] for x in mine if x["phase"] == "evaluate.secagg.collect_masked_vectors")
        assert [r for r in rounds if r < 4] == [0, 1, 2, 3]  # (99: the test above asks once more on this grid)


def test_a_site_that_sends_a_plain_scalar_under_secagg_is_refused(cohort_path, monkeypatch):
    """Modified sites under SecAgg+: one that sends its training loss as a plain training metric, one that leaves
    its patient count as the plain weight (Flower's mod alone would): the disclosure policy refuses each and the run
    stops naming it; a plain evaluate reply with metrics is refused too."""
    from dataclasses import replace

    from flwr.client.mod import secaggplus_mod

    import pipeline.federated.client_app as ca
    from pipeline.federated.policy import DisclosureError, check_evaluate_reply
    from pipeline.federated.protocol import Update
    from pipeline.federated.site import SiteClient

    real_fit = SiteClient.fit

    def leaky_fit(self, arrays, config):
        upd = real_fit(self, arrays, config)
        return Update(upd.arrays, upd.num_examples, {**upd.metrics, "train_loss": 0.25})

    with monkeypatch.context() as m:
        m.setattr(SiteClient, "fit", leaky_fit)
        with pytest.raises(SiteDataError, match=r"training metric\(s\) \['train_loss'\] in plain text"):
            _run(cohort_path, **{"federated.secagg": True, "federated.rounds": 1})

    def flowers_mod_alone(msg, ctxt, call_next):
        cfg = msg.content.config_records.get(ca.RECORD_KEY_CONFIGS) if msg.has_content() else None
        return secaggplus_mod(msg, ctxt, call_next) if cfg is not None and ca.Key.STAGE in cfg else call_next(msg, ctxt)

    with monkeypatch.context() as m:
        m.setattr(ca, "_secagg_when_asked", flowers_mod_alone)
        with pytest.raises(SiteDataError, match=r"num_examples \(plain, under SecAgg\+\) = 24"):
            _run(cohort_path, **{"federated.secagg": True, "federated.rounds": 1})

    cfg = _cfg(cohort_path, **{"federated.secagg": True})
    data = load_run_data(load_cohort(cohort_path), cfg)
    c = site_clients(data, cfg)[0]
    assert not c.facts().eval_metrics and c.facts().secagg
    ev = c.evaluate(c.initial_arrays(), {"round": 0})
    assert ev.num_examples == 0 and ev.metrics == {}  # asked in plain under SecAgg+: nothing
    metrics = c._validation(c.initial_arrays())
    with pytest.raises(DisclosureError, match="in a run that sends none"):
        check_evaluate_reply(c.facts(), 0, metrics)
    with pytest.raises(DisclosureError, match="num_examples"):
        check_evaluate_reply(replace(c.facts()), len(c.val_idx), {})


def test_secure_validation_values_are_checked_before_masking(cohort_path):
    """The values a site puts into the secure validation sum pass the policy: its own counts, possible pairs."""
    from pipeline.federated.policy import DisclosureError, check_secure_evaluation

    cfg = _cfg(cohort_path, **{"federated.secagg": True})
    data = load_run_data(load_cohort(cohort_path), cfg)
    c = site_clients(data, cfg)[0]
    ok = c.secure_validation(c.initial_arrays())
    check_secure_evaluation(c.facts(), ok)
    assert ok["sites"] == 1 and ok["n_val"] == 10 and ok["val_events"] == c.facts().n_val_events
    for bad, match in (({**ok, "n_val": 11.0}, "n_val"), ({**ok, "val_events": 0.0}, "val_events"),
                       ({**ok, "comparable": 46.0}, "pair counts"), ({**ok, "loss_sum": math.inf}, "loss_sum"),
                       ({**ok, "time": 12.5}, "fields")):  # fmt: skip
        with pytest.raises(DisclosureError, match=match):
            check_secure_evaluation(c.facts(), bad)


def test_totals_under_k_give_no_validation(cohort_path, caplog):
    """The minimum-count rule applies to the decoded totals: fewer than k validation patients or events in the sum,
    or fewer than two sites with validation patients, and the round has no validation (warned); the last round is
    then kept (train.without_validation=last). An embedded run whose k exceeds the sum's events has none at all."""
    from pipeline.federated.policy import secure_totals_rule

    assert secure_totals_rule(3, 30, 12, 10) is None
    assert "fewer than federated.min_count=13" in str(secure_totals_rule(3, 30, 12, 13))
    assert "at least 2" in str(secure_totals_rule(1, 30, 30, 2))
    cfg = _cfg(cohort_path, **{"federated.secagg": True})
    data = load_run_data(load_cohort(cohort_path), cfg)
    events = sum(c.facts().n_val_events for c in site_clients(data, cfg))
    k = events + 1  # the sum holds fewer than k events; every site still has k training patients
    assert k <= 24, k
    caplog.clear()
    server, _, _, _ = _run(cohort_path, **{"federated.secagg": True, "federated.min_count": k})
    assert all(math.isnan(r["val_cindex"]) and math.isnan(r["val_loss"]) for r in server.history)
    assert all(r["val_sum"]["events"] == events for r in server.history)
    assert server.best is not None and server.best[1] == 3 and server.summary()["select"] == "last"
    assert any(f"fewer than federated.min_count={k}" in r.getMessage() for r in caplog.records)
    total = {"sites": 1.0, "n_val": 30.0, "val_events": 20.0, "loss_sum": 5.0, "comparable": 100.0, "concordant": 70.0}
    one = FederatedServer(_cfg(cohort_path, **{"federated.secagg": True}), server.global_arrays)
    rec = one.finish_secure_round(0, total, {})
    assert math.isnan(rec["val_cindex"]) and rec["val_sum"]["sites"] == 1
    rec = one.finish_secure_round(1, {**total, "sites": 2.0}, {})
    assert rec["val_cindex"] == 0.7 and rec["val_loss"] == 0.25


def _deploy(cohort_path: Path, out: Path, rc: dict) -> dict:
    """The pyproject ServerApp and ClientApp over the in-process grid (every node its own cohort spec and ``out``),
    as a deployment runs them; returns the run's ``federated_history.json``."""
    import json

    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from pipeline.federated.client_app import client_app
    from pipeline.federated.embedded import InProcessGrid
    from pipeline.federated.server_app import server_app

    nodes = {500 + k: s for k, s in enumerate(load_cohort(cohort_path).sites)}
    grid = InProcessGrid(
        {nid: (s, client_app) for nid, s in nodes.items()},
        node_configs={nid: {"site": s, "cohort": str(cohort_path), "out": str(out)} for nid, s in nodes.items()},
        run_config={**rc, "out": str(out), "config": "", "resume": False},
    )
    server_app(grid, Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[500].run_config)))
    return json.loads((out / "federated" / "federated_history.json").read_text())


def test_a_deployment_validates_through_the_same_secure_sum(cohort_path, tmp_path):
    """The deployed apps under SecAgg+ take the same path: each round's pooled validation from the secure sum equals
    the plain deployment's, the same round is kept, and each node's own ledger has the ``evaluate`` secure stages."""
    rc = {**CONFIG, "federated.rounds": 2}
    plain = _deploy(cohort_path, tmp_path / "plain", rc)
    secure = _deploy(cohort_path, tmp_path / "secure", {**rc, "federated.secagg": True})
    for p, s in zip(plain["history"], secure["history"], strict=True):
        assert math.isfinite(s["val_cindex"]) and s["site_val_cindex"] == {}
        np.testing.assert_allclose(s["val_cindex"], p["val_cindex"], atol=1e-9)
        np.testing.assert_allclose(s["val_loss"], p["val_loss"], rtol=1e-4)
    assert secure["best_round"] == plain["best_round"] and secure["select"] == "cindex"
    for site in load_cohort(cohort_path).sites:
        phases = {x["phase"] for x in read_ledger(tmp_path / "secure" / f"privacy_ledger.{site}.jsonl")}
        assert {f"evaluate.secagg.{st}" for st in STAGES} <= phases and "evaluate" not in phases
