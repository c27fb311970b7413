"""One app pair for both runtimes: the embedded run drives the deployment's ServerApp body (statistics exchange,
training rounds, finish query rounds) over the in-process grid with the project's ClientApp, its sites' replies in
the ledger; a hung in-process site is bounded by the round timeout; a deployment's run folder builds a report."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from clinical_cohort import write_clinical_cohort

from data_specs import load_cohort, resolve_config

CONFIG = {"train.batch_size": 4, "federated.rounds": 2, "federated.local_epochs": 1, "federated.min_sites": 3,
          "federated.min_count": 2}  # fmt: skip  # sites of 20 training patients (default k is 10)
STATISTICS = {"statistics.summaries", "statistics.normalisers"}
FINISH = {"finish.moments", "finish.cutpoints", "finish.baseline", "finish.evaluate"}


@pytest.fixture(scope="module")
def cohort_path(tmp_path_factory) -> Path:
    """Clinical-only, 3 sites x 30 patients (20 train, 4 val, 6 test each), survival from a Cox model on the two
    clinical columns (every site has training and test events)."""
    out = tmp_path_factory.mktemp("lifecycle_cohort")
    return write_clinical_cohort(out, "lifecycle_test", seed=11, split=(20, 4, 6), censor=(1000, 4000), prefix="Q")


def _cfg(cohort_path: Path, out: Path, **extra):
    # the plain network: a deployment (and SecAgg+) resolves model.skip=auto to none, the embedded plain run to fitted
    cfg = resolve_config(None, [f"{k}={v}" for k, v in {**CONFIG, "model.skip": "none", **extra}.items()], out=out)
    return cfg.model_copy(update={"cohort": cohort_path})


def _deploy(cohort_path: Path, out: Path, rc: dict):
    """The pyproject ServerApp and ClientApp over the in-process grid, every node writing into ``out``."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from pipeline.federated.client_app import client_app
    from pipeline.federated.embedded import InProcessGrid
    from pipeline.federated.server_app import server_app

    nodes = {400 + k: s for k, s in enumerate(load_cohort(cohort_path).sites)}
    grid = InProcessGrid(
        {nid: (s, client_app) for nid, s in nodes.items()},
        node_configs={nid: {"site": s, "cohort": str(cohort_path), "out": str(out)} for nid, s in nodes.items()},
        run_config={**rc, "out": str(out), "config": "", "resume": False},
    )
    server_app(grid, Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[400].run_config)))


def test_the_embedded_run_sends_the_statistics_and_finish_phases_through_the_client_app(cohort_path, tmp_path):
    """`histofuse train`'s federated path: every site answered the statistics exchange and the finish query rounds
    through the project's ClientApp (disclosure mod, ledger line per reply), as a deployed node does; the model
    file's cut-points, horizons and baseline are the finish rounds' (no pooled per-patient value)."""
    from data_specs.artifacts import RunFiles
    from pipeline.federated.ledger import read_ledger
    from pipeline.stages import stage_train
    from pipeline.training.bundle import load_bundle

    cohort = load_cohort(cohort_path)
    cfg = _cfg(cohort_path, tmp_path)
    _, card = load_bundle(stage_train(cohort, cfg, progress=False))
    lines = list(read_ledger(RunFiles(root=tmp_path).privacy_ledger))
    phases = {s: {x["phase"] for x in lines if x["site"] == s} for s in cohort.sites}
    for s in cohort.sites:
        assert STATISTICS | {"train", "evaluate"} | FINISH <= phases[s], (s, phases[s])
    assert not any("error" in x for x in lines)
    finish = json.loads((RunFiles(root=tmp_path).federated / "finish_metrics.json").read_text())
    assert finish["pairs"] == "within site" and 0 < finish["pooled"]["cindex"] < 1
    assert card.horizons[0] == 365.0 and card.baseline is not None


def test_embedded_and_deployed_runs_give_the_same_numbers_and_both_folders_build_a_report(cohort_path, tmp_path):
    """The same seed embedded (`stage_train`) and deployed (ServerApp + ClientApp over the in-process grid): equal
    weights, cut-points, horizons, baseline, and the finish rounds' test C. `histofuse report` builds from the
    deployment's run folder: model card, metrics, the sites' ledgers, and what stays at the sites named as such."""
    from data_specs.artifacts import RunFiles
    from pipeline.outputs.report import build_report
    from pipeline.stages import stage_train
    from pipeline.training.bundle import load_bundle

    cohort = load_cohort(cohort_path)
    emb_model, emb = load_bundle(stage_train(cohort, _cfg(cohort_path, tmp_path / "embedded"), progress=False))
    _deploy(cohort_path, tmp_path / "deployed", CONFIG)
    dep = RunFiles(root=tmp_path / "deployed")
    dep_model, card = load_bundle(dep.model)
    for k, v in emb_model.state_dict().items():
        np.testing.assert_allclose(dep_model.state_dict()[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
    assert card.cutpoints == emb.cutpoints and card.horizons == emb.horizons
    np.testing.assert_allclose(card.baseline["cumhaz"], emb.baseline["cumhaz"], rtol=1e-12)
    emb_metrics = json.loads((tmp_path / "embedded" / "federated" / "finish_metrics.json").read_text())
    assert json.loads(dep.metrics.read_text()) == emb_metrics
    page = build_report(dep.root).read_text()
    assert "Model card" in page or "model card" in page.lower()
    assert "What left each site (privacy ledger)" in page and "finish.evaluate" in page
    assert "site-local, not available to the server" in page
    for s in cohort.sites:
        assert f"risk_scores.{s}.csv" in page  # named, not shown: each site keeps its own file
    assert "Harrell C" in page and f"{emb_metrics['pooled']['cindex']:.3f}" in page


class _Hung:
    """A site whose training never returns within the test (it waits for ``release``, 120 s at most)."""

    release = threading.Event()

    def fit(self, arrays, config):
        self.release.wait(120.0)
        raise RuntimeError("released after the test")  # an abandoned thread ends here, training nothing


def test_a_hung_embedded_site_is_dropped_at_the_round_timeout_not_waited_for(cohort_path, tmp_path):
    """An in-process site that hangs in training: with federated.round_timeout the run goes on without it (asked
    once more, then dropped from the round within min_sites) instead of blocking until it returns."""
    from pipeline.federated.embedded import run_federated
    from pipeline.federated.site import SiteClient, site_clients
    from pipeline.training.data import load_run_data

    cohort = load_cohort(cohort_path)
    cfg = _cfg(cohort_path, tmp_path, **{"federated.rounds": 1, "federated.min_sites": 2,
                                          "federated.round_timeout": 8.0})  # fmt: skip
    data = load_run_data(cohort, cfg)
    clients = site_clients(data, cfg)
    c0 = clients[0]
    hung_cls = type("HungSite", (_Hung, SiteClient), {})
    clients[0] = hung_cls(c0.site, data, c0.train_idx, c0.val_idx, cfg, c0.rank)
    t0 = time.perf_counter()
    try:
        _, info = run_federated(data, cfg, clients=clients, cohort=cohort)
    finally:
        _Hung.release.set()  # let the abandoned worker threads end
        for t in threading.enumerate():
            if t.name == f"site {c0.site}":
                t.join(30.0)
    took = time.perf_counter() - t0
    assert info["history"][0]["dropped"] == [c0.site] and info["history"][0]["retried"] == [c0.site]
    assert took < 60.0, f"the run waited {took:.0f} s for a hung site"


def test_an_embedded_secagg_run_sends_the_statistics_and_finish_numbers_only_in_secure_sums(cohort_path, tmp_path):
    """Under federated.secagg the in-process sites answer the statistics exchange and the finish rounds through the
    ClientApp's secure-sum mod, as deployed nodes do (their stages in the ledger), and the model file's cut-points
    and horizons match the plain run's (the rounds' updates differ only by SecAgg+ quantisation)."""
    from data_specs.artifacts import RunFiles
    from pipeline.federated.ledger import read_ledger
    from pipeline.stages import stage_train
    from pipeline.training.bundle import load_bundle

    cohort = load_cohort(cohort_path)
    _, plain = load_bundle(stage_train(cohort, _cfg(cohort_path, tmp_path / "plain", **{"federated.rounds": 1}),
                                       progress=False))  # fmt: skip
    cfg = _cfg(cohort_path, tmp_path / "secagg", **{"federated.rounds": 1, "federated.secagg": "true"})
    _, card = load_bundle(stage_train(cohort, cfg, progress=False))
    lines = list(read_ledger(RunFiles(root=tmp_path / "secagg").privacy_ledger))
    for s in cohort.sites:
        phases = {x["phase"] for x in lines if x["site"] == s}
        assert any(p.startswith("statistics.") and ".secagg." in p for p in phases), phases
        assert any(p.startswith("finish.") and ".secagg." in p for p in phases), phases
    assert card.horizons == plain.horizons
    np.testing.assert_allclose([card.cutpoints.median, *card.cutpoints.tertiles],
                               [plain.cutpoints.median, *plain.cutpoints.tertiles], rtol=1e-3)  # fmt: skip


@pytest.mark.slow  # SuperLink + 3 SuperNodes as processes: ~10 min on a loaded 2-core machine
def test_a_loopback_deployment_run_folder_builds_the_report_with_the_embedded_runs_numbers(cohort_path, tmp_path):
    """`flwr run` of the project's app on 127.0.0.1: `histofuse report` builds from its run folder, whose model
    file and test metrics are the embedded run's for the same seed."""
    import sys

    from data_specs.artifacts import RunFiles
    from pipeline.outputs.report import build_report
    from pipeline.stages import stage_train
    from pipeline.training.bundle import load_bundle

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "flower"))
    from loopback import run_loopback

    cohort = load_cohort(cohort_path)
    rc = {**CONFIG, "federated.rounds": 1}
    res = run_loopback(cohort_path, cohort.sites, tmp_path / "deployed", rc, timeout=1200)
    assert res["finish_seconds"] is not None and not res["killed"]
    _, emb = load_bundle(stage_train(cohort, _cfg(cohort_path, tmp_path / "embedded", **rc), progress=False))
    dep = RunFiles(root=tmp_path / "deployed")
    _, card = load_bundle(dep.model)
    np.testing.assert_allclose([card.cutpoints.median, *card.cutpoints.tertiles],
                               [emb.cutpoints.median, *emb.cutpoints.tertiles], rtol=1e-6)  # fmt: skip
    assert card.horizons == emb.horizons
    emb_metrics = json.loads((tmp_path / "embedded" / "federated" / "finish_metrics.json").read_text())
    np.testing.assert_allclose(json.loads(dep.metrics.read_text())["pooled"]["cindex"],
                               emb_metrics["pooled"]["cindex"], rtol=1e-6)  # fmt: skip
    page = build_report(dep.root).read_text()
    assert "site-local, not available to the server" in page and "finish.evaluate" in page
    assert all(f"privacy_ledger.{s}.jsonl" in page for s in cohort.sites)
