"""The deployment path: the project's Flower ClientApp/ServerApp (pyproject components) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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


@pytest.mark.slow
def test_flower_deployment_on_loopback(clinical_omics_cohort, tmp_path):
    """SuperLink + 3 SuperNodes as processes on 127.0.0.1, `flwr run` of the project's app, a few rounds."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "flower"))
    from loopback import run_loopback

    sites = load_cohort(clinical_omics_cohort).sites
    assert len(sites) == 3
    res = run_loopback(clinical_omics_cohort, sites, tmp_path, RUN_CONFIG, timeout=540)
    assert res["rounds"] == 2
    h = res["history"]
    assert all(not r["dropped"] for r in h) and all(np.isfinite(r["train_loss"]) for r in h)
    state = json.loads((tmp_path / "federated" / "server_state.json").read_text())
    assert state["round"] == 1 and (tmp_path / "federated" / state["arrays_file"]).is_file()


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
