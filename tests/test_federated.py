from __future__ import annotations

import numpy as np
import pytest
import torch

from data_specs import load_cohort, resolve_config
from pipeline.data import build_data
from pipeline.federated import FedAvg, SiteClient, Update, run_federated, trainable_arrays
from pipeline.train import fit_local, new_model


@pytest.fixture(scope="module")
def fed_data(tiny_features):
    cohort_path, cfg, fdir = tiny_features
    cohort = load_cohort(cohort_path)
    return build_data(cohort, fdir, seed=0), cfg


def _cfg(cfg, *ov):
    return resolve_config(None, ["train.batch_size=4", "train.max_tiles=8", *ov], out=cfg.out)


def test_one_site_one_round_equals_local_training(fed_data):
    data, base = fed_data
    cfg = _cfg(base, "train.epochs=2", "federated.local_epochs=2", "federated.rounds=1")
    idx = data.splits["train"]
    local, _ = fit_local(data, cfg, train_idx=idx, val_idx=np.array([], int))
    client = SiteClient("all", data, idx, np.array([], int), cfg, site_rank=0)
    fed, info = run_federated(data, cfg, clients=[client])
    assert info["best_round"] == 0
    a, b = trainable_arrays(local.model), trainable_arrays(fed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    moved = sum(float(np.abs(a[k] - trainable_arrays(new_model(data, cfg))[k]).sum()) for k in a)
    assert moved > 0  # training did something, so the equality is not vacuous


def test_site_message_holds_only_parameter_deltas_and_counts(fed_data):
    data, base = fed_data
    cfg = _cfg(base)
    model = new_model(data, cfg)
    g = trainable_arrays(model)
    tr = data.subset_sites(data.splits["train"])
    site = next(s for s in data.sites if len(tr[s]) > 1)
    client = SiteClient(site, data, tr[site], data.subset_sites(data.splits["val"])[site], cfg)
    upd = client.fit(g, {"round": 0, "local_epochs": 1})
    assert isinstance(upd, Update) and set(vars(upd)) == {"arrays", "num_examples", "metrics"}
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(upd.arrays) == names
    for k, v in upd.arrays.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == g[k].shape
    assert type(upd.num_examples) is int and upd.num_examples == len(tr[site])
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in upd.metrics.items())
    # nothing in the message equals patient data: no array has the shape of features, omics or outcomes
    patient_shapes = {data.omics.shape, data.time.shape, (len(tr[site]),)}
    assert not any(v.shape in patient_shapes for v in upd.arrays.values())
    ev = client.evaluate(g, {"round": 0})
    assert set(vars(ev)) == {"num_examples", "metrics"}
    assert all(isinstance(v, float) for v in ev.metrics.values())


def test_fedavg_is_example_weighted():
    g = {"w": np.zeros(3, np.float32)}
    ups = [Update({"w": np.ones(3, np.float32)}, 1), Update({"w": np.full(3, 4.0, np.float32)}, 3)]
    np.testing.assert_allclose(FedAvg().aggregate(g, ups)["w"], np.full(3, (1 + 12) / 4))


class _Broken(SiteClient):
    def fit(self, arrays, config):
        raise RuntimeError("disk full at site")


def test_failing_site_is_dropped_not_fatal(fed_data, caplog):
    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=2", "federated.local_epochs=1")
    tr, va = data.subset_sites(data.splits["train"]), data.subset_sites(data.splits["val"])
    sites = [s for s in data.sites if len(tr[s]) > 1]
    clients = [SiteClient(s, data, tr[s], va[s], cfg, k) for k, s in enumerate(sites)]
    clients[0] = _Broken(sites[0], data, tr[sites[0]], va[sites[0]], cfg, 0)
    model, info = run_federated(data, cfg, clients=clients)
    assert all(r["dropped"] == [sites[0]] for r in info["history"])
    assert "disk full at site" in caplog.text
    cfg_strict = _cfg(base, "federated.rounds=1", f"federated.min_sites={len(clients)}")
    with pytest.raises(RuntimeError, match="fewer than min_sites"):
        run_federated(data, cfg_strict, clients=clients)
    assert all(torch.isfinite(p).all() for p in model.parameters())
