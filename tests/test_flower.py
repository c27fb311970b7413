"""The deployment path: the project's Flower ClientApp/ServerApp (pyproject components) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from clinical_cohort import write_clinical_cohort

from data_specs import load_cohort, resolve_config


@pytest.fixture(scope="module")
def clinical_omics_cohort(tiny_demo, tmp_path_factory) -> Path:
    """The tiny demo's patients, omics and clinical data without slides, regrouped into 3 sites of 4 patients
    (1 validation patient each) so every SuperNode has a few training patients."""
    src = Path(tiny_demo).parent
    out = tmp_path_factory.mktemp("flower_cohort")
    pts = pd.read_csv(src / "patients.csv")
    pts["slides"] = ""
    pts["site"] = [f"site_{'abc'[k % 3]}" for k in range(len(pts))]
    pts["split"] = np.where(pts.groupby("site").cumcount() == 0, "val", "train")
    pts.to_csv(out / "patients.csv", index=False)
    (out / "cohort.yaml").write_text(
        "name: flower_test\ntime_unit: days\npatients: patients.csv\n"
        f"omics: {{path: {src / 'omics.h5ad'}, values: counts, allow_missing: true}}\n"
        f"clinical: {{path: {src / 'clinical.csv'}, id_column: patient_id}}\n"
    )
    return out / "cohort.yaml"


RUN_CONFIG = {"train.batch_size": 4, "federated.rounds": 2, "federated.local_epochs": 1, "federated.min_sites": 3,
              "federated.min_count": 3}  # fmt: skip  # sites of 3 training patients (default k is 10)


def test_deployed_apps_exchange_statistics_and_train_in_process(clinical_omics_cohort, tmp_path):
    """The pyproject ServerApp and ClientApp, unchanged, over the in-process Grid."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from pipeline.federated.client_app import client_app
    from pipeline.federated.embedded import InProcessGrid
    from pipeline.federated.server_app import server_app

    cohort = load_cohort(clinical_omics_cohort)
    nodes = {100 + k: s for k, s in enumerate(cohort.sites)}
    grid = InProcessGrid(
        {nid: (s, client_app) for nid, s in nodes.items()},
        node_configs={nid: {"site": s, "cohort": str(clinical_omics_cohort)} for nid, s in nodes.items()},
        run_config={**RUN_CONFIG, "federated.rounds": 1, "out": str(tmp_path), "config": "", "resume": False},
    )
    ctx = Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[100].run_config))
    server_app(grid, ctx)
    info = json.loads((tmp_path / "federated" / "federated_history.json").read_text())
    assert [r["round"] for r in info["history"]] == [0] and sorted(info["sites"]) == sorted(cohort.sites)
    assert all(np.isfinite(r["train_loss"]) for r in info["history"])
    # every site received the same cohort-level normalisers, equal to those built from the same summaries here
    from pipeline.federated.protocol import STATS_KEY, decode_record

    stats = [decode_record(str(c.state.config_records[STATS_KEY]["json"])) for c in grid.contexts.values()]
    from pipeline.federated.site import local_summaries
    from pipeline.omics.normalise import fit_normalisers
    from pipeline.training.data import load_run_data

    cfg = resolve_config(None, [f"{k}={v}" for k, v in RUN_CONFIG.items()])
    # each site's summaries as it sends them (cells under federated.min_count suppressed), combined here
    ref_omics, ref_clinical = fit_normalisers(
        [local_summaries(clinical_omics_cohort, s, cfg)[0] for s in nodes.values()]
    )
    emb = load_run_data(cohort, cfg)  # the embedded runtime simulates the same exchange (same k)
    assert emb.omics_norm.genes == ref_omics.genes and emb.clinical_norm.columns == ref_clinical.columns
    np.testing.assert_allclose(emb.clinical_norm.mean, ref_clinical.mean, rtol=1e-10)
    for s in stats:
        assert s["omics"]["genes"] == ref_omics.genes
        np.testing.assert_allclose(s["omics"]["mean"], ref_omics.mean, rtol=1e-10)
        np.testing.assert_allclose(s["omics"]["std"], ref_omics.std, rtol=1e-10)
        np.testing.assert_allclose(s["clinical"]["mean"], ref_clinical.mean, rtol=1e-10)
    # what the exchange carried has no patient axis: per-gene / per-column vectors only
    n = len(cohort.patients)
    assert all(np.ndim(v) <= 1 and np.size(v) != n for v in stats[0]["omics"].values() if isinstance(v, np.ndarray))


def test_deployed_discrete_time_bins_are_agreed_from_site_histograms(clinical_omics_cohort, tmp_path):
    """train.loss=nll in a deployment: every SuperNode trains on the same bins, read off the sum of the sites'
    event-time histograms (the embedded runtime's rule), none of them a patient's time; the ledger has the
    histogram replies."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from pipeline.federated.client_app import client_app
    from pipeline.federated.embedded import InProcessGrid
    from pipeline.federated.ledger import read_ledger
    from pipeline.federated.protocol import STATS_KEY, decode_record
    from pipeline.federated.server_app import server_app
    from pipeline.federated.site import local_event_times
    from pipeline.stats.curves import discrete_time_bins

    cohort = load_cohort(clinical_omics_cohort)
    nodes = {200 + k: s for k, s in enumerate(cohort.sites)}
    rc = {**RUN_CONFIG, "federated.min_count": 2, "train.loss": "nll", "train.n_bins": 3, "federated.rounds": 1}
    grid = InProcessGrid(
        {nid: (s, client_app) for nid, s in nodes.items()},
        node_configs={
            nid: {"site": s, "cohort": str(clinical_omics_cohort), "out": str(tmp_path)} for nid, s in nodes.items()
        },  # fmt: skip
        run_config={**rc, "out": str(tmp_path), "config": "", "resume": False},
    )
    server_app(grid, Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[200].run_config)))
    bins = [decode_record(str(c.state.config_records[STATS_KEY]["json"]))["time_bins"] for c in grid.contexts.values()]
    assert all(b == bins[0] for b in bins) and len(bins[0]) == 4
    cfg = resolve_config(None, [f"{k}={v}" for k, v in rc.items()])
    per_site = [local_event_times(clinical_omics_cohort, s, cfg) for s in nodes.values()]
    t, e = (np.concatenate([x[i] for x in per_site]) for i in (0, 1))
    site = np.concatenate([np.full(len(x[0]), k) for k, x in enumerate(per_site)])
    np.testing.assert_allclose(bins[0], discrete_time_bins(t, e, site, 3, 2), rtol=1e-12)
    assert not set(bins[0]) & {float(x) for x in t}
    lines = [x for s in nodes.values() for x in read_ledger(tmp_path / f"privacy_ledger.{s}.jsonl")]
    assert {x["site"] for x in lines if x["phase"] == "statistics.event_histogram"} == set(nodes.values())


@pytest.mark.slow  # plain ~11 min, SecAgg+ ~20 min on a loaded 2-core machine (~40-50 s per message exchange)
@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_flower_deployment_on_loopback(finish_cohort, tmp_path, secagg):
    """SuperLink + 3 SuperNodes as processes on 127.0.0.1, `flwr run` of the project's app: training, then the
    post-training query rounds; the run folder has the model file, metrics and each site's risk scores, equal
    to the embedded run's for the same cohort, seed and ``federated.secagg``. Under SecAgg+ the deployment equals
    the embedded SecAgg+ run (Flower quantises the update with NumPy's global generator, which each site's seeded
    training leaves in the same state in both runtimes), which differs from the plain run by that quantisation;
    every summed phase went through the four SecAgg+ stages at every site."""
    import sys

    import yaml

    from data_specs.artifacts import RunFiles
    from pipeline.federated.ledger import read_ledger
    from pipeline.stages import stage_train
    from pipeline.training.bundle import load_bundle
    from pipeline.training.data import load_run_data
    from pipeline.training.predict import predict

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "flower"))
    from loopback import run_loopback

    cohort = load_cohort(finish_cohort)
    sites = cohort.sites
    assert len(sites) == 3
    rc = {**FINISH_CONFIG, "federated.rounds": 1, "federated.secagg": secagg}
    res = run_loopback(finish_cohort, sites, tmp_path / "deployed", rc, timeout=2400 if secagg else 1200)
    assert res["rounds"] == 1 and res["finish_seconds"] > 0
    h = res["history"]
    assert all(not r["dropped"] for r in h)
    if secagg:  # the sites' training scalars are not sent in plain under SecAgg+
        assert all(r["train_loss"] is None for r in h)
    else:
        assert all(np.isfinite(r["train_loss"]) for r in h)
    state = json.loads((tmp_path / "deployed" / "federated" / "server_state.json").read_text())
    assert state["round"] == 0 and (tmp_path / "deployed" / "federated" / state["arrays_file"]).is_file()
    dep = RunFiles(root=tmp_path / "deployed")
    # the plain network, as the deployment resolves model.skip=auto (a flwr run config has no model keys)
    cfg = resolve_config(None, [f"{k}={v}" for k, v in rc.items()] + ["model.skip=none"], out=tmp_path / "embedded")
    emb_model, emb = load_bundle(stage_train(cohort, cfg, progress=False))
    dep_model, card = load_bundle(dep.model)
    for k, v in emb_model.state_dict().items():
        np.testing.assert_allclose(dep_model.state_dict()[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose([card.cutpoints.median, *card.cutpoints.tertiles],
                               [emb.cutpoints.median, *emb.cutpoints.tertiles], rtol=1e-6)  # fmt: skip
    assert card.horizons == emb.horizons and card.baseline["grid"] == emb.baseline["grid"]
    np.testing.assert_allclose(card.baseline["cumhaz"], emb.baseline["cumhaz"], rtol=1e-6)
    metrics = json.loads(dep.metrics.read_text())
    data = load_run_data(cohort, cfg)
    k = rc["federated.min_count"]
    np.testing.assert_allclose(metrics["pooled"]["cindex"], _within_site_test_c(emb_model, data, k), rtol=1e-6)
    for s in sites:
        mine = pd.read_csv(tmp_path / "deployed" / f"risk_scores.{s}.csv", dtype={"patient_id": str})
        idx = np.flatnonzero(data.site == data.sites.index(s))
        assert mine.patient_id.tolist() == [data.patient_ids[i] for i in idx]
        np.testing.assert_allclose(mine.log_hz, predict(emb_model, data, idx).log_hz, atol=2e-6)
    if not secagg:
        return
    assert card.baseline["cumhaz_by_site"] == {} and metrics["per_site"] == {}  # a site's own values: not formed
    used = yaml.safe_load((tmp_path / "embedded" / "config.yaml").read_text())["model"]  # the resolved model
    plain_rc = {**rc, "federated.secagg": False, "model.skip": used["skip"]}  # the same network, in plain
    plain_cfg = resolve_config(None, [f"{k}={v}" for k, v in plain_rc.items()], out=tmp_path / "plain")
    plain, _ = load_bundle(stage_train(cohort, plain_cfg, progress=False))
    gap = max(float((dep_model.state_dict()[k] - v).abs().max()) for k, v in plain.state_dict().items())
    assert 0 < gap < 2e-5  # the update's SecAgg+ quantisation (2 * secagg_clip / 2**26 per value), nothing more
    for s in sites:
        phases = {x["phase"] for x in read_ledger(tmp_path / "deployed" / f"privacy_ledger.{s}.jsonl")}
        for p in ("train", *SECURE_PHASES):
            assert {f"{p}.secagg.{st}" for st in ("setup", "share_keys", "collect_masked_vectors", "unmask")} <= phases


def test_flower_run_config_keys_map_onto_the_histofuse_config():
    """Every SECTION.KEY declared in [tool.flwr.app.config] is a histofuse setting; "" keeps the default."""
    import tomllib

    from flwr.common.config import flatten_dict

    from data_specs.config import RunConfig
    from pipeline.federated.protocol import FLOWER_RUN_KEYS, run_config_from_flower

    root = Path(__file__).resolve().parents[1]
    declared = flatten_dict(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    fields = {
        f"{s}.{k}" for s, sec in RunConfig.model_fields.items() for k in getattr(sec.annotation, "model_fields", {})
    }
    assert set(declared) - set(FLOWER_RUN_KEYS) <= fields
    assert run_config_from_flower(declared) == resolve_config(None, [], out="runs/flower")
    cfg = run_config_from_flower(
        {**declared, "federated.rounds": 7, "federated.secagg": True, "federated.strategy": "fedadam", "train.lr": 0.1}
    )
    assert (cfg.federated.rounds, cfg.federated.secagg, cfg.federated.strategy, cfg.train.lr) == (
        7,
        True,
        "fedadam",
        0.1,
    )
    with pytest.raises(ValueError, match="SECTION.KEY"):
        run_config_from_flower({"rounds": 3})


def test_raw_clinical_rows_smuggled_in_a_site_summary_are_stopped(clinical_omics_cohort, tmp_path, monkeypatch):
    """The statistics exchange passes the disclosure policy too: an extra field with per-patient rows fails."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    import pipeline.federated.client_app as client_app_module
    from data_specs.summaries import ClinicalSiteSummary
    from pipeline.federated.embedded import InProcessGrid
    from pipeline.federated.protocol import SiteDataError
    from pipeline.federated.server_app import server_app

    real = ClinicalSiteSummary.to_wire
    rows = pd.read_csv(Path(clinical_omics_cohort).parent / "patients.csv")[["time"]].to_numpy().tolist()
    monkeypatch.setattr(ClinicalSiteSummary, "to_wire", lambda self: {**real(self), "rows": rows})
    cohort = load_cohort(clinical_omics_cohort)
    nodes = {100 + k: s for k, s in enumerate(cohort.sites)}
    grid = InProcessGrid(
        {nid: (s, client_app_module.client_app) for nid, s in nodes.items()},
        node_configs={nid: {"site": s, "cohort": str(clinical_omics_cohort)} for nid, s in nodes.items()},
        run_config={**RUN_CONFIG, "federated.rounds": 1, "out": str(tmp_path), "config": "", "resume": False},
        audit=True,
    )
    ctx = Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[100].run_config))
    with pytest.raises(
        SiteDataError, match=r"statistics exchange: .*site site_[abc]: DisclosureError: .*clinical summary"
    ):
        server_app(grid, ctx)
    assert all(not m.has_content() for _, m in grid.sent)  # no summary left any site


@pytest.fixture(scope="module")
def finish_cohort(tmp_path_factory) -> Path:
    """A clinical-only cohort of 3 sites x 30 patients (20 train, 4 val, 6 test each), survival from a Cox model
    on the two clinical columns: every site has >= 10 training events (its own baseline) and test events."""
    out = tmp_path_factory.mktemp("finish_cohort")
    return write_clinical_cohort(out, "finish_test", seed=7, split=(20, 4, 6), censor=(1000, 4000), prefix="P",
                                 round_time=False)  # fmt: skip


FINISH_CONFIG = {"train.batch_size": 4, "federated.rounds": 2, "federated.local_epochs": 1, "federated.min_sites": 3,
                 "federated.min_count": 2}  # fmt: skip


def _deploy_in_process(cohort_path: Path, out: Path, rc: dict):
    """The pyproject ServerApp and ClientApp over the in-process Grid, every node writing into ``out``."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from pipeline.federated.client_app import client_app
    from pipeline.federated.embedded import InProcessGrid
    from pipeline.federated.server_app import server_app

    sites = load_cohort(cohort_path).sites
    nodes = {300 + k: s for k, s in enumerate(sites)}
    grid = InProcessGrid(
        {nid: (s, client_app) for nid, s in nodes.items()},
        node_configs={nid: {"site": s, "cohort": str(cohort_path), "out": str(out)} for nid, s in nodes.items()},
        run_config={**rc, "out": str(out), "config": "", "resume": False},
        audit=True,
    )
    server_app(grid, Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[300].run_config)))
    return grid, sites


def _within_site_test_c(model, data, k: int) -> float:
    """Harrell's C from the summed pairs within each site with at least k test patients and events."""
    from pipeline.stats.metrics import concordant_pairs
    from pipeline.training.predict import predict

    conc = comp = 0.0
    for idx in data.subset_sites(data.splits["test"]).values():
        if min(len(idx), data.event[idx].sum()) < k:
            continue
        c, p = concordant_pairs(data.time[idx], data.event[idx], predict(model, data, idx).log_hz)
        conc, comp = conc + c, comp + p
    return conc / comp


def test_deployment_writes_the_embedded_runs_model_cutpoints_baseline_and_test_c(finish_cohort, tmp_path):
    """The deployed apps (statistics exchange, training, finish.* query rounds) and the embedded `stage_train` on
    the same cohort and seed: equal weights, cut-points, horizons, baseline and pooled (within-site) test C; the
    model file is loadable by `predict`, holds no patient id or training time; each site's risk scores stay in
    its own file, and every finish reply is in that site's ledger."""
    from data_specs.artifacts import RunFiles
    from pipeline.federated.ledger import read_ledger
    from pipeline.stages import stage_predict, stage_train
    from pipeline.training.bundle import load_bundle
    from pipeline.training.data import load_run_data

    cohort = load_cohort(finish_cohort)
    ov = [f"{k}={v}" for k, v in FINISH_CONFIG.items()] + ["model.skip=none"]  # the deployment's resolved skip
    cfg = resolve_config(None, ov, out=tmp_path / "embedded")
    emb_model, emb = load_bundle(stage_train(cohort, cfg, progress=False))
    grid, sites = _deploy_in_process(finish_cohort, tmp_path / "deployed", FINISH_CONFIG)
    dep = RunFiles(root=tmp_path / "deployed")
    dep_model, card = load_bundle(dep.model)
    for k, v in emb_model.state_dict().items():
        np.testing.assert_allclose(dep_model.state_dict()[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(card.cutpoints.median, emb.cutpoints.median, rtol=1e-6)
    np.testing.assert_allclose(card.cutpoints.tertiles, emb.cutpoints.tertiles, rtol=1e-6)
    assert card.horizons == emb.horizons and card.horizons[0] == 365.0  # 1 year in days
    assert card.baseline["grid"] == emb.baseline["grid"]
    np.testing.assert_allclose(card.baseline["cumhaz"], emb.baseline["cumhaz"], rtol=1e-6)
    assert card.baseline["cumhaz_by_site"].keys() == emb.baseline["cumhaz_by_site"].keys()
    assert card.omics == emb.omics and card.sites == emb.sites
    np.testing.assert_allclose(card.clinical["mean"], emb.clinical["mean"], rtol=1e-10)
    metrics = json.loads(dep.metrics.read_text())
    data = load_run_data(cohort, cfg)
    k = FINISH_CONFIG["federated.min_count"]
    np.testing.assert_allclose(metrics["pooled"]["cindex"], _within_site_test_c(emb_model, data, k), rtol=1e-6)
    sent = {s for s, ix in data.subset_sites(data.splits["test"]).items() if data.event[ix].sum() >= k}
    assert len(sent) >= 2 and set(metrics["per_site"]) == sent and metrics["pooled"]["n"] == 6 * len(sent)
    assert metrics["sites_without_metrics"] == sorted(set(sites) - sent)
    # no patient id, no training event time in the model file
    raw = dep.model.read_bytes()
    assert not any(p.patient_id.encode() in raw for p in cohort.patients)
    tr = data.splits["train"]
    assert not set(card.baseline["grid"]) & {float(x) for x in data.time[tr][data.event[tr]]}
    # each site's own risk scores, equal to the embedded model's; nothing per patient crossed the grid
    for s in sites:
        mine = pd.read_csv(tmp_path / "deployed" / f"risk_scores.{s}.csv", dtype={"patient_id": str})
        assert set(mine.site) == {s} and len(mine) == 30
    scores = pd.concat(pd.read_csv(tmp_path / "deployed" / f"risk_scores.{s}.csv") for s in sites)
    table = pd.read_csv(stage_predict(dep.model, cohort, tmp_path / "predicted", None))
    m = scores.merge(table, on="patient_id", suffixes=("", "_predict"))
    assert len(m) == 90 and (m.risk_group == m.risk_group_predict).all() and (m.split == m.split_predict).all()
    np.testing.assert_allclose(m.log_hz, m.log_hz_predict, atol=2e-6)
    # what the finish replies carried: scalars, and lists on the pre-agreed grids only (no patient axis)
    from pipeline.stats.curves import RISK_EDGES

    finish_sent = [m for _, m in grid.sent if m.has_content() and "finish" in m.content.config_records]
    lengths = {len(v) for m in finish_sent for v in m.content.config_records["finish"].values() if isinstance(v, list)}
    assert len(finish_sent) == 4 * len(sites) and lengths == {len(RISK_EDGES) - 1, len(card.baseline["grid"])}
    for s in sites:
        phases = {x["phase"] for x in read_ledger(tmp_path / "deployed" / f"privacy_ledger.{s}.jsonl")}
        assert {"finish.moments", "finish.cutpoints", "finish.baseline", "finish.evaluate"} <= phases


def test_a_patient_value_smuggled_in_a_finish_reply_is_stopped(finish_cohort, tmp_path, monkeypatch):
    """The post-training replies pass the disclosure policy: a training time added to finish.moments stops the
    run at the site (nothing of it is sent) and names the phase."""
    import pipeline.federated.finish as finish
    from pipeline.federated.protocol import SiteDataError

    real = finish.site_reply

    def leaky(client, kind, request, out):
        reply = real(client, kind, request, out)
        return {**reply, "time": float(client.data.time[client.train_idx[0]])} if kind == "finish.moments" else reply

    monkeypatch.setattr("pipeline.federated.client_app.site_reply", leaky)
    with pytest.raises(SiteDataError, match=r"finish.moments: .*undeclared key\(s\) \['time'\]"):
        _deploy_in_process(finish_cohort, tmp_path, {**FINISH_CONFIG, "federated.rounds": 1})
    assert not (tmp_path / "model.safetensors").exists()


def test_finish_replies_are_refused_when_they_are_not_the_declared_aggregates(finish_cohort):
    """check_site_reply (the disclosure mod's check of finish.* replies): a count that is not the site's own, a
    histogram or baseline step of 1..k-1 patients or events, test counts under k, impossible pair counts."""
    from pipeline.federated.finish import check_site_reply, site_reply
    from pipeline.federated.policy import DisclosureError
    from pipeline.federated.protocol import trainable_arrays
    from pipeline.federated.site import site_clients
    from pipeline.training.data import load_run_data

    cfg = resolve_config(None, [f"{k}={v}" for k, v in {**FINISH_CONFIG, "federated.min_count": 3}.items()])
    c = site_clients(load_run_data(load_cohort(finish_cohort), cfg), cfg)[0]
    arrays = trainable_arrays(c.new_model())
    mom = site_reply(c, "finish.moments", {"arrays": arrays}, None)
    check_site_reply(c, "finish.moments", mom)
    with pytest.raises(DisclosureError, match="not the site's training count"):
        check_site_reply(c, "finish.moments", {**mom, "n": mom["n"] - 1})
    cut = site_reply(c, "finish.cutpoints", {"arrays": arrays, "mean": 0.0, "sd": 1.0}, None)
    check_site_reply(c, "finish.cutpoints", cut)
    split = list(cut["counts"])
    i = next(j for j, x in enumerate(split) if x)
    split[i], split[i + 1] = 1, split[i + 1] + split[i] - 1  # one patient singled out, same total
    with pytest.raises(DisclosureError, match="fewer than 3"):
        check_site_reply(c, "finish.cutpoints", {"counts": split})
    grid = list(np.linspace(100.0, 4000.0, 40))
    base = site_reply(c, "finish.baseline", {"arrays": arrays, "grid": grid}, None)
    check_site_reply(c, "finish.baseline", base)
    assert all(x == 0 or x >= 10 for x in base["events"])  # steps merged to >= max(k, 10) events
    one = [1.0] + [0.0] * (len(grid) - 1)
    with pytest.raises(DisclosureError, match="fewer than 3 events"):
        check_site_reply(c, "finish.baseline", {"events": one, "risk_sum": base["risk_sum"]})
    with pytest.raises(DisclosureError, match="shrinking risk set"):
        check_site_reply(c, "finish.baseline", {"events": base["events"], "risk_sum": base["risk_sum"][::-1]})
    test = c.data.splits["test"][c.data.site[c.data.splits["test"]] == 0]
    n, ev = len(test), int(c.data.event[test].sum())
    ok = {"n_test": n, "test_events": ev, "concordant": 1.0, "comparable": 2.0}
    if min(n, ev) >= 3:
        check_site_reply(c, "finish.evaluate", ok)
    with pytest.raises(DisclosureError, match="not the site's test patients"):
        check_site_reply(c, "finish.evaluate", {**ok, "n_test": n + 1})
    with pytest.raises(DisclosureError, match="undeclared key"):
        check_site_reply(c, "finish.evaluate", {**ok, "time": 12.5})
    check_site_reply(c, "finish.evaluate", {})  # a site under k sends nothing


SECURE_PHASES = ("statistics.summaries", "finish.moments", "finish.cutpoints", "finish.baseline", "finish.evaluate")


def test_secagg_deployment_sends_every_sum_masked_and_equals_the_plain_run(finish_cohort, tmp_path, monkeypatch):
    """federated.secagg in a deployment: the statistics exchange and the finish rounds send their numbers only as
    SecAgg+ secure sums (the server's normaliser fit sees one summed summary, no site reply carries a plain count,
    sum or histogram, every stage is in the ledger); the outputs equal the plain run's: normalisers to float64
    rounding, the finish aggregates for the same weights to 1e-9, the trained model within the update's SecAgg+
    quantisation, and cut-points, baseline and test C within what that weight difference moves."""
    import pipeline.federated.server_app as server_app_module
    from data_specs.artifacts import RunFiles
    from pipeline.federated.finish import finish_run
    from pipeline.federated.ledger import read_ledger
    from pipeline.federated.protocol import trainable_arrays
    from pipeline.training.bundle import load_bundle

    seen: list = []
    real_fit = server_app_module.fit_normalisers
    monkeypatch.setattr(server_app_module, "fit_normalisers", lambda s, *a: seen.append(s) or real_fit(s, *a))
    rc = {**FINISH_CONFIG, "federated.rounds": 1}
    plain_grid, sites = _deploy_in_process(finish_cohort, tmp_path / "plain", rc)
    grid, _ = _deploy_in_process(finish_cohort, tmp_path / "secure", {**rc, "federated.secagg": True})
    assert [len(s) for s in seen] == [3, 1]  # per-site summaries in plain; under SecAgg+ only their sum
    assert seen[1][0]["clinical"].n_patients == 60 == sum(s["clinical"].n_patients for s in seen[0])
    # what the sites sent under SecAgg+: names and model sizes in plain, no number of a summed phase
    for _, m in grid.sent:
        recs = m.content.config_records if m.has_content() else {}
        assert not {"summaries", "histogram", "follow_up"} & set(recs)
        if "finish" in recs:
            assert set(recs["finish"]) <= {"site", "features", "time_unit", "dim.feature_dim", "dim.n_genes",
                                           "dim.n_clinical"}  # fmt: skip
        if m.metadata.group_id.startswith("secure_sum:"):
            assert all(len(r) == 0 for r in m.content.array_records.values())  # masked integer vectors only
    lines = {(x["site"], x["reply_to"]): x for s in sites
             for x in read_ledger(tmp_path / "secure" / f"privacy_ledger.{s}.jsonl")}  # fmt: skip
    for site, m in grid.sent:  # every reply has its ledger line, with the same records and keys
        line = lines[(site, m.metadata.reply_to_message_id)]
        c = m.content
        recs = {**dict(c.array_records), **dict(c.metric_records), **dict(c.config_records)}
        assert {k: set(v["keys"]) for k, v in line["records"].items()} == {k: set(r) for k, r in recs.items()}
    for s in sites:
        phases = {x["phase"] for x in lines.values() if x["site"] == s}
        for p in SECURE_PHASES:
            assert {f"{p}.secagg.{st}" for st in ("setup", "share_keys", "collect_masked_vectors", "unmask")} <= phases
    a, ca = load_bundle(RunFiles(root=tmp_path / "plain").model)
    b, cb = load_bundle(RunFiles(root=tmp_path / "secure").model)
    np.testing.assert_allclose(cb.clinical["mean"], ca.clinical["mean"], rtol=1e-13)
    np.testing.assert_allclose(cb.clinical["std"], ca.clinical["std"], rtol=1e-12)
    for k, v in a.state_dict().items():  # the update's quantisation (2 * secagg_clip / 2**26 per value)
        np.testing.assert_allclose(b.state_dict()[k].numpy(), v.numpy(), atol=2e-5, err_msg=k)
    np.testing.assert_allclose([cb.cutpoints.median, *cb.cutpoints.tertiles],
                               [ca.cutpoints.median, *ca.cutpoints.tertiles], atol=1e-4)  # fmt: skip
    assert cb.horizons == ca.horizons and cb.baseline["grid"] == ca.baseline["grid"]
    np.testing.assert_allclose(cb.baseline["cumhaz"], ca.baseline["cumhaz"], rtol=1e-3)
    assert cb.baseline["cumhaz_by_site"] == {}  # a site's own curve would be that site's values: not formed
    mp, ms = (json.loads(RunFiles(root=tmp_path / x).metrics.read_text()) for x in ("plain", "secure"))
    assert (ms["pooled"]["n"], ms["pooled"]["events"]) == (mp["pooled"]["n"], mp["pooled"]["events"])
    np.testing.assert_allclose(ms["pooled"]["cindex"], mp["pooled"]["cindex"], atol=0.02)
    assert ms["per_site"] == {}
    # the finish rounds alone, same weights: secure sums equal the plain replies' sums
    from pipeline.federated.server_app import exchange_cohort_statistics, finish_ask

    arrays = trainable_arrays(a)
    cfg_p = resolve_config(None, [f"{k}={v}" for k, v in rc.items()])
    cfg_s = cfg_p.model_copy(update={"federated": cfg_p.federated.model_copy(update={"secagg": True})})
    want = finish_run(finish_ask(plain_grid, None), cfg_p, exchange_cohort_statistics(plain_grid, cfg_p), arrays)
    got = finish_run(finish_ask(grid, None), cfg_s, exchange_cohort_statistics(grid, cfg_s), arrays)
    for key in ("median", "tertiles"):
        np.testing.assert_allclose(got["cutpoints"][key], want["cutpoints"][key], rtol=1e-9)
    np.testing.assert_allclose(got["baseline"]["cumhaz"], want["baseline"]["cumhaz"], rtol=1e-9)
    assert got["metrics"]["pooled"] == want["metrics"]["pooled"]


def _leaky_app(monkeypatch, *, summaries: bool = False, finish: bool = False):
    """The deployed ClientApp of a modified site that sends in plain what SecAgg+ should sum: its full summaries
    when asked for their names (``summaries``: no names mod), or its finish numbers unstripped (``finish``)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    import pipeline.federated.client_app as ca

    def plain_finish(client_fn):
        def mod(msg, ctxt, call_next):
            kind = ca.phase_of(msg.metadata.message_type)
            if kind is None:
                return call_next(msg, ctxt)
            client = client_fn(ctxt)
            body = ca.site_reply(client, kind, ca.decode_record(str(msg.content.config_records["query"]["json"])), None)
            return Message(RecordDict({"finish": ConfigRecord({**body, "site": client.site})}), reply_to=msg)

        return mod

    if summaries:  # the statistics mod answers the request for names with the summaries themselves
        monkeypatch.setattr(ca, "names_mod", lambda msg, ctxt, call_next: call_next(msg, ctxt))
    if finish:
        monkeypatch.setattr(ca, "finish_mod", plain_finish)
    return ca.make_client_app(ca._deployed_site, [ca._cohort_statistics_mod], ca._deployed_ledger)


@pytest.mark.parametrize("leak", ["summaries", "finish"])
def test_a_plain_summary_or_finish_number_under_secagg_is_stopped(finish_cohort, tmp_path, monkeypatch, leak):
    """Under federated.secagg a site that sends its summaries or its finish.moments numbers in plain text (a
    modified client) is refused by the disclosure policy: the run stops naming the phase, nothing of it is sent."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from pipeline.federated.embedded import InProcessGrid
    from pipeline.federated.protocol import SiteDataError
    from pipeline.federated.server_app import server_app

    app = _leaky_app(monkeypatch, **{leak: True})
    sites = load_cohort(finish_cohort).sites
    nodes = {400 + k: s for k, s in enumerate(sites)}
    rc = {**FINISH_CONFIG, "federated.rounds": 1, "federated.secagg": True}
    grid = InProcessGrid(
        {nid: (s, app) for nid, s in nodes.items()},
        node_configs={nid: {"site": s, "cohort": str(finish_cohort), "out": str(tmp_path)} for nid, s in nodes.items()},
        run_config={**rc, "out": str(tmp_path), "config": "", "resume": False},
        audit=True,
    )
    where = "query.summaries" if leak == "summaries" else "finish.moments"
    with pytest.raises(SiteDataError, match=rf"{where}: .*in plain text under federated.secagg"):
        server_app(grid, Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[400].run_config)))
    for _, m in grid.sent:
        recs = m.content.config_records if m.has_content() else {}
        assert "summaries" not in recs and not ("finish" in recs and "sum" in recs["finish"])
    assert not (tmp_path / "model.safetensors").exists()


def test_secagg_statistics_exchange_with_omics_and_discrete_time_equals_the_plain_one(clinical_omics_cohort, tmp_path):
    """Omics and clinical summaries and the event-time histogram under SecAgg+: every site gets the normalisers
    and discrete-time bins the plain exchange gives (float64 rounding), the event histogram and the summaries
    travel only as secure sums (ledger phases), and the sites' plain replies carry names only."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from pipeline.federated.client_app import client_app
    from pipeline.federated.embedded import InProcessGrid
    from pipeline.federated.ledger import read_ledger
    from pipeline.federated.protocol import STATS_KEY, decode_record
    from pipeline.federated.server_app import server_app

    sites = load_cohort(clinical_omics_cohort).sites
    rc = {**RUN_CONFIG, "federated.min_count": 2, "train.loss": "nll", "train.n_bins": 3, "federated.rounds": 1}
    got = {}
    for name, extra in (("plain", {}), ("secure", {"federated.secagg": True})):
        nodes = {500 + k: s for k, s in enumerate(sites)}
        out = tmp_path / name
        grid = InProcessGrid(
            {nid: (s, client_app) for nid, s in nodes.items()},
            node_configs={
                nid: {"site": s, "cohort": str(clinical_omics_cohort), "out": str(out)} for nid, s in nodes.items()
            },  # fmt: skip
            run_config={**rc, **extra, "out": str(out), "config": "", "resume": False},
            audit=True,
        )
        server_app(grid, Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[500].run_config)))
        got[name] = [decode_record(str(c.state.config_records[STATS_KEY]["json"])) for c in grid.contexts.values()]
        if extra:
            plain_recs = [set(m.content.config_records) for _, m in grid.sent
                          if m.has_content() and m.metadata.group_id == "statistics"]  # fmt: skip
            assert plain_recs and all(r <= {"layout", "ack"} for r in plain_recs)
            phases = {x["phase"] for s in sites for x in read_ledger(out / f"privacy_ledger.{s}.jsonl")}
            assert {"statistics.summaries.secagg.unmask", "statistics.event_histogram.secagg.unmask"} <= phases
    p, s = got["plain"][0], got["secure"]
    assert all(x["time_bins"] == p["time_bins"] for x in s)
    for x in s:
        assert x["omics"]["genes"] == p["omics"]["genes"] and x["clinical"]["columns"] == p["clinical"]["columns"]
        np.testing.assert_allclose(x["omics"]["mean"], p["omics"]["mean"], rtol=1e-12)
        np.testing.assert_allclose(x["omics"]["std"], p["omics"]["std"], rtol=1e-9)
        np.testing.assert_allclose(x["clinical"]["mean"], p["clinical"]["mean"], rtol=1e-12)
        np.testing.assert_allclose(x["clinical"]["std"], p["clinical"]["std"], rtol=1e-9)
        assert x["clinical"]["categories"] == p["clinical"]["categories"]


def test_secagg_horizons_from_the_summed_event_histogram(finish_cohort, tmp_path):
    """With a time unit of no known length the horizons are quartiles of the summed event-time histogram
    (finish.horizons): under SecAgg+ that sum is a secure sum, and the horizons equal the plain run's."""
    from data_specs.artifacts import RunFiles
    from pipeline.federated.ledger import read_ledger
    from pipeline.training.bundle import load_bundle

    src = Path(finish_cohort).parent
    spec = tmp_path / "cohort.yaml"
    spec.write_text(f"name: no_unit\ntime_unit: visits\npatients: {src / 'patients.csv'}\n"
                    f"clinical: {{path: {src / 'clinical.csv'}, id_column: patient_id}}\n")  # fmt: skip
    rc = {**FINISH_CONFIG, "federated.rounds": 1}
    _deploy_in_process(spec, tmp_path / "plain", rc)
    _, sites = _deploy_in_process(spec, tmp_path / "secure", {**rc, "federated.secagg": True})
    hp, hs = (load_bundle(RunFiles(root=tmp_path / x).model)[1].horizons for x in ("plain", "secure"))
    assert hp and hs == hp
    phases = {x["phase"] for x in read_ledger(tmp_path / "secure" / f"privacy_ledger.{sites[0]}.jsonl")}
    assert "finish.horizons.secagg.collect_masked_vectors" in phases and "finish.horizons" not in phases


def test_raw_rows_in_a_summary_are_stopped_before_the_secure_sum(clinical_omics_cohort, tmp_path, monkeypatch):
    """Under SecAgg+ a site's summaries pass the disclosure policy before any of their numbers is masked: raw
    per-patient rows added to a clinical summary stop the run at the site (names round), and no site sends a
    summary, a name list or a masked vector of them."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from data_specs.summaries import ClinicalSiteSummary
    from pipeline.federated.client_app import client_app
    from pipeline.federated.embedded import InProcessGrid
    from pipeline.federated.protocol import SiteDataError
    from pipeline.federated.server_app import server_app

    real = ClinicalSiteSummary.to_wire
    rows = pd.read_csv(Path(clinical_omics_cohort).parent / "patients.csv")[["time"]].to_numpy().tolist()
    monkeypatch.setattr(ClinicalSiteSummary, "to_wire", lambda self: {**real(self), "rows": rows})
    nodes = {700 + k: s for k, s in enumerate(load_cohort(clinical_omics_cohort).sites)}
    rc = {**RUN_CONFIG, "federated.rounds": 1, "federated.secagg": True}
    grid = InProcessGrid(
        {nid: (s, client_app) for nid, s in nodes.items()},
        node_configs={nid: {"site": s, "cohort": str(clinical_omics_cohort)} for nid, s in nodes.items()},
        run_config={**rc, "out": str(tmp_path), "config": "", "resume": False},
        audit=True,
    )
    with pytest.raises(SiteDataError, match=r"site site_[abc]: ValueError: .*clinical summary"):
        server_app(grid, Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[700].run_config)))
    assert all(not m.has_content() for _, m in grid.sent)  # nothing left any site
