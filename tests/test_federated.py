from __future__ import annotations

import numpy as np
import pytest
import torch

from data_specs import resolve_config
from pipeline.federated.dp import PrivacyLedger
from pipeline.federated.embedded import run_embedded, run_federated
from pipeline.federated.protocol import Update, trainable_arrays
from pipeline.federated.server import FederatedServer, ServerOptimizer, weighted_mean
from pipeline.federated.site import ProximalTerm, SiteClient, site_clients
from pipeline.training.data import make_loader
from pipeline.training.module import SurvivalModule, fit_local, make_trainer, new_model, new_module

TINY = ["federated.min_count=2"]  # the 12-patient fixture's sites have 2 training patients (default k is 10)


def _cfg(cfg, *ov):
    return resolve_config(None, ["train.batch_size=4", "train.max_tiles=8", *TINY, *ov], out=cfg.out)


def _run(data, cfg, clients=None, out=None, resume=False, grids=None):
    """The embedded runtime, returning the server (global arrays, history) and the grid (audit)."""
    clients = clients if clients is not None else site_clients(data, cfg)
    server = FederatedServer(cfg, trainable_arrays(new_model(data, cfg)), out, resume=resume)
    run_embedded(clients, server, grid_out=grids)
    return server


def test_one_site_one_round_equals_local_training(fed_data):
    data, base = fed_data
    cfg = _cfg(base, "train.epochs=2", "federated.local_epochs=2", "federated.rounds=1", "model.skip=none")
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


FIT_METRICS = {"train_loss", "train_events"}
EVAL_METRICS = {"cindex", "concordant", "comparable", "loss_sum", "events"}


@pytest.mark.parametrize(
    "extra",
    [(), pytest.param(("federated.dp_noise=0.5", "federated.dp_clip=0.1"), marks=pytest.mark.slow)],
    ids=["plain", "dp"],
)
def test_every_message_a_site_sends_holds_only_updates_counts_and_scalars(fed_data, extra):
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=2", "federated.local_epochs=1", *extra)
    shapes = [v.shape for v in trainable_arrays(new_model(data, cfg)).values()]
    grids: list = []
    _run(data, cfg, grids=grids)
    sent = grids[0].sent
    clients = site_clients(data, cfg)
    assert len(sent) == 2 * 2 * len(clients)  # per round: one train and one evaluate reply per site
    for site, msg in sent:
        assert msg.has_content() and msg.metadata.message_type in ("train", "evaluate")
        c = msg.content
        kind = "fitres" if msg.metadata.message_type == "train" else "evaluateres"
        if kind == "fitres":
            assert set(c.array_records) == {"fitres.parameters"}
            # decoded exactly as the server decodes it
            arrays = parameters_to_ndarrays(recorddict_to_fitres(c, keep_input=True).parameters)
            assert [a.shape for a in arrays] == shapes  # exactly the trainable parameters, in order
            assert all(a.dtype == np.float32 for a in arrays)
            if extra:  # DP: every update is clipped to dp_clip before it leaves the site
                norm = np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays))
                assert norm <= 0.1 + 1e-5
        else:
            assert not c.array_records
        assert set(c.config_records) == {f"{kind}.metrics", f"{kind}.status"}
        metrics = dict(c.config_records[f"{kind}.metrics"])
        assert metrics.pop("site") == site
        allowed = FIT_METRICS if kind == "fitres" else EVAL_METRICS
        if extra and kind == "fitres":
            allowed = set()  # DP: no data-derived scalar leaves with the update
        assert set(metrics) <= allowed
        assert all(isinstance(v, float) for v in metrics.values())
        assert dict(c.config_records[f"{kind}.status"]) == {"code": 0, "message": "Success"}
        scal = {k: dict(v) for k, v in c.metric_records.items()}
        want = {f"{kind}.num_examples"} | ({"evaluateres.loss"} if kind == "evaluateres" else set())
        assert set(scal) == want
        n = scal[f"{kind}.num_examples"]["num_examples"]
        assert isinstance(n, int) and n >= 0
        if extra and kind == "fitres":
            assert n == 1  # equal weights under DP


def test_fedavg_is_example_weighted():
    g = {"w": np.zeros(3, np.float32)}
    ups = [Update({"w": np.ones(3, np.float32)}, 1), Update({"w": np.full(3, 4.0, np.float32)}, 3)]
    fedavg = ServerOptimizer("fedavg", lr=1.0)  # the server's FedAvg step: w + 1.0 * weighted mean delta
    np.testing.assert_allclose(fedavg.step(g, weighted_mean(ups))["w"], np.full(3, (1 + 12) / 4))


def test_fedsgd_full_batch_equals_centralised_gradient_descent(fed_data):
    """Event-weighted mean of site gradients == gradient of the pooled site-stratified Cox loss."""
    data, base = fed_data
    lr, rounds = 0.05, 3
    cfg = _cfg(
        base,
        "train.max_tiles=100000",  # no tile sampling: full bags on both sides
        "model.dropout=0.0",
        "federated.strategy=fedsgd",
        "federated.weighting=events",
        f"federated.server_lr={lr}",
        f"federated.rounds={rounds}",
    )
    clients = site_clients(data, cfg)
    assert len(clients) >= 2
    server = _run(data, cfg, clients)
    idx = np.concatenate([c.train_idx for c in clients])
    module = new_module(new_model(data, cfg), cfg)
    module.train()
    params = [p for p in module.model.parameters() if p.requires_grad]
    for _ in range(rounds):
        batch = next(iter(make_loader(data, idx, len(idx), True, 0, None)))
        module.zero_grad(set_to_none=True)
        module.loss(batch, module(batch).log_hz).backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= lr * p.grad
    central = trainable_arrays(module.model)
    moved = 0.0
    init = trainable_arrays(new_model(data, cfg))
    for k, v in central.items():
        np.testing.assert_allclose(server.global_arrays[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
        moved += float(np.abs(v - init[k]).sum())
    assert moved > 0


class _ProxInLoss(SurvivalModule):
    """The textbook FedProx local objective: loss + (mu / 2) ||w - w_global||^2 inside the training step."""

    def __init__(self, model, anchor, mu, **kw):
        super().__init__(model, **kw)
        self.anchor, self.mu = anchor, mu

    def training_step(self, batch, batch_idx):
        out = self(batch)
        prox = sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), self.anchor, strict=True))
        return self.loss(batch, out.log_hz) + 0.5 * self.mu * prox


def test_fedprox_callback_equals_squared_norm_in_the_loss(fed_data):
    data, base = fed_data
    cfg = _cfg(base, "model.dropout=0.0", "train.lr=0.05")
    mu, idx = 0.5, data.splits["train"]
    start = new_model(data, cfg)
    with torch.no_grad():  # move away from the anchor so the proximal term bites from the first step
        for p in start.parameters():
            p.add_(0.05)
    anchor = [p.detach().clone() for p in new_model(data, cfg).parameters()]
    results = []
    for variant in ("callback", "loss"):
        model = new_model(data, cfg)
        model.load_state_dict(start.state_dict())
        if variant == "callback":
            module, cbs = new_module(model, cfg), [_AnchoredProx(mu, anchor)]
        else:
            t = cfg.train
            module, cbs = _ProxInLoss(model, anchor, mu, lr=t.lr, weight_decay=t.weight_decay, ties=t.ties), []
        torch.manual_seed(0)
        make_trainer(2, cbs, validate=False).fit(module, make_loader(data, idx, 4, True, 0, 8))
        results.append(trainable_arrays(module.model))
    without = new_module(new_model(data, cfg), cfg)
    without.model.load_state_dict(start.state_dict())
    torch.manual_seed(0)
    make_trainer(2, [], validate=False).fit(without, make_loader(data, idx, 4, True, 0, 8))
    plain = trainable_arrays(without.model)
    diff = 0.0
    for k in results[0]:
        np.testing.assert_allclose(results[0][k], results[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
        diff += float(np.abs(results[0][k] - plain[k]).sum())
    assert diff > 1e-3  # the proximal term changed training, so the equality is not vacuous


class _AnchoredProx(ProximalTerm):
    """ProximalTerm with a given anchor (the test starts away from the global weights on purpose)."""

    def __init__(self, mu, anchor):
        super().__init__(mu)
        self._given = anchor

    def on_train_start(self, trainer, pl_module):
        self.anchor = [a.clone() for a in self._given]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimizers_match_flower_strategies(name):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAdam, FedYogi

    rng = np.random.default_rng(0)
    w0 = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    ref = (FedAdam if name == "fedadam" else FedYogi)(
        initial_parameters=ndarrays_to_parameters(w0), eta=0.03, beta_1=0.9, beta_2=0.99, tau=1e-3
    )
    ours = ServerOptimizer(name, 0.03, 0.9, 0.99, 1e-3)
    g = {"a": w0[0], "b": w0[1]}
    for t in range(1, 5):
        d = {k: rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in g.items()}
        res = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([g["a"] + d["a"], g["b"] + d["b"]]), 5, {}))]
        # Flower's FedAdam bias-corrects with (server_round + 1): feed t - 1 to compare step t
        want = parameters_to_ndarrays(ref.aggregate_fit(t - 1, res, [])[0])
        g = ours.step(g, {k: v.astype(np.float64) for k, v in d.items()})
        np.testing.assert_allclose(g["a"], want[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g["b"], want[1], rtol=1e-4, atol=1e-6)


def test_secagg_plus_equals_plain_aggregation(fed_data):
    data, base = fed_data
    plain_cfg = _cfg(base, "federated.rounds=1", "federated.local_epochs=1")
    secure_cfg = _cfg(base, "federated.rounds=1", "federated.local_epochs=1", "federated.secagg=true")
    plain = _run(data, plain_cfg)
    grids: list = []
    secure = _run(data, secure_cfg, grids=grids)
    init = trainable_arrays(new_model(data, plain_cfg))
    moved = 0.0
    for k, v in plain.global_arrays.items():
        # quantisation: 2 * clip / 2**26 per value, scaled back by max_weight / total weight
        np.testing.assert_allclose(secure.global_arrays[k], v, atol=2e-5, err_msg=k)
        moved += float(np.abs(v - init[k]).sum())
    assert moved > 0
    # and no site sent its plain update: the fit replies carry only masked integer vectors
    fits = [
        m
        for _, m in grids[0].sent
        if m.metadata.message_type == "train" and "fitres.status" in m.content.config_records
    ]
    assert fits and all(len(m.content.array_records["fitres.parameters"]) == 0 for m in fits)


def _rdp_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Closed form: Gaussian mechanism, sampling rate 1 -> RDP(alpha) = T alpha / (2 sigma^2), then Opacus'
    (Balle et al. 2020) conversion, minimised over Opacus' default orders."""
    from opacus.accountants import RDPAccountant

    a = np.asarray(RDPAccountant.DEFAULT_ALPHAS, float)
    rdp = rounds * a / (2 * sigma**2)
    eps = rdp - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    return float(np.nanmin(eps))


def test_dp_epsilon_grows_with_rounds_and_matches_the_accountant_formula(fed_data):
    data, base = fed_data
    cfg = _cfg(
        base, "federated.rounds=3", "federated.local_epochs=1", "federated.dp_noise=1.5", "federated.dp_clip=0.5"
    )
    server = _run(data, cfg)
    eps = [r["epsilon"] for r in server.history]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    for t, e in enumerate(eps, start=1):
        assert e == pytest.approx(_rdp_epsilon(1.5, t, 1e-5), rel=1e-9)
    assert server.summary()["privacy"]["epsilon"] == pytest.approx(eps[-1])
    # the reference point: sigma 1, 100 rounds, delta 1e-5 -> epsilon 96.1
    led = PrivacyLedger(1.0, 1e-5)
    for _ in range(100):
        led.step()
    assert led.epsilon == pytest.approx(96.1, abs=0.05) == _rdp_epsilon(1.0, 100, 1e-5)


class _Broken(SiteClient):
    def fit(self, arrays, config):
        raise RuntimeError("disk full at site")

    def evaluate(self, arrays, config):  # re-sent too: still one "retried" entry for the round
        raise RuntimeError("disk full at site")


def test_failing_site_is_dropped_within_min_sites(fed_data, caplog):
    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=1", "federated.local_epochs=1", "federated.min_sites=1")
    tr, va = data.subset_sites(data.splits["train"]), data.subset_sites(data.splits["val"])
    sites = [s for s in data.sites if len(tr[s]) > 1]
    clients = [SiteClient(s, data, tr[s], va[s], cfg, k) for k, s in enumerate(sites)]
    clients[0] = _Broken(sites[0], data, tr[sites[0]], va[sites[0]], cfg, 0)
    model, info = run_federated(data, cfg, clients=clients)
    assert len(info["history"]) == 1 and info["history"][0]["dropped"] == [sites[0]]
    assert info["history"][0]["retried"] == [sites[0]]  # asked twice before it was dropped
    assert info["dropped"] == [{"round": 0, "site": sites[0]}]
    assert "disk full at site" in caplog.text
    cfg_strict = _cfg(base, "federated.rounds=1", f"federated.min_sites={len(clients)}")
    with pytest.raises(RuntimeError, match="fewer than min_sites"):
        run_federated(data, cfg_strict, clients=clients)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Slow(SiteClient):
    def fit(self, arrays, config):
        import time

        time.sleep(6.0)
        return super().fit(arrays, config)


@pytest.mark.slow
def test_site_past_the_round_timeout_is_dropped(fed_data, caplog):
    data, base = fed_data
    cfg = _cfg(
        base, "federated.rounds=1", "federated.local_epochs=1", "federated.round_timeout=5.0", "federated.min_sites=1"
    )
    clients = site_clients(data, cfg)
    c0 = clients[0]
    clients[0] = _Slow(c0.site, data, c0.train_idx, c0.val_idx, cfg, c0.rank)
    server = _run(data, cfg, clients)
    assert server.history[0]["dropped"] == [c0.site]
    assert "round_timeout" in caplog.text


class _Killed(SiteClient):
    """Simulates the coordinator dying in the middle of a round (not a site failure: nothing catches it)."""

    def fit(self, arrays, config):
        if int(config["round"]) == 2:
            raise KeyboardInterrupt
        return super().fit(arrays, config)


@pytest.mark.slow
@pytest.mark.parametrize("dp", [False, True], ids=["fedadam", "fedadam_dp"])
def test_resume_after_kill_gives_the_uninterrupted_model(fed_data, tmp_path, dp):
    """Bit-identical weights without DP; with DP the noise is fresh (CSPRNG) on every run by design, so the
    resumed run continues the accountant (same epsilon sequence) and the round sequence, not the weights."""
    data, base = fed_data
    extra = ("federated.strategy=fedadam", *(("federated.dp_noise=1.0",) if dp else ()))
    cfg = _cfg(base, "federated.rounds=3", "federated.local_epochs=1", *extra)
    whole = _run(data, cfg, out=tmp_path / "whole")
    clients = site_clients(data, cfg)
    c0 = clients[0]
    clients[0] = _Killed(c0.site, data, c0.train_idx, c0.val_idx, cfg, c0.rank)
    with pytest.raises(KeyboardInterrupt):
        _run(data, cfg, clients, out=tmp_path / "killed")
    import json

    state = json.loads((tmp_path / "killed" / "server_state.json").read_text())
    assert state["round"] == 1  # rounds 0 and 1 finished before the kill
    assert list((tmp_path / "killed").glob("*.pt")) == []  # no pickle
    resumed = _run(data, cfg, out=tmp_path / "killed", resume=True)
    assert [r["round"] for r in resumed.history] == [0, 1, 2]
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a.get("epsilon") == pytest.approx(b.get("epsilon"))
    if not dp:
        for k, v in whole.global_arrays.items():
            np.testing.assert_allclose(resumed.global_arrays[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
        assert resumed.best[1] == whole.best[1]
        for a, b in zip(whole.history, resumed.history, strict=True):
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6, nan_ok=True)
    other = _cfg(base, "federated.rounds=3", "federated.local_epochs=2", *extra)
    with pytest.raises(ValueError, match="another config"):
        FederatedServer(other, None, tmp_path / "killed", resume=True)


def test_site_without_events_is_reported_not_fatal(fed_data, caplog):
    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=1", "federated.local_epochs=1", "federated.weighting=events")
    clients = site_clients(data, cfg)
    tr = data.splits["train"]
    censored = tr[~data.event[tr]]
    assert len(censored) >= 2
    clients.append(SiteClient("no_events", data, censored, np.array([], int), cfg, site_rank=9))
    assert "no_events has 0 training event(s)" in caplog.text
    server = _run(data, cfg, clients)
    assert server.history[0]["dropped"] == [] and len(server.history) == 1


@pytest.mark.parametrize("strategy", ["fedavg", "fedsgd"])
def test_discrete_time_model_trains_federated_and_validates_with_its_own_loss(fed_data, strategy):
    data, base = fed_data
    cfg = _cfg(base, "train.loss=nll", "train.n_bins=4", "federated.rounds=2", f"federated.strategy={strategy}")
    # one site holding every patient: its validation set (val + test) has k = 2 patients and events, so it
    # sends validation metrics (the fixture's sites have 1 validation patient each: suppressed)
    val = np.concatenate([data.splits["val"], data.splits["test"]])
    client = SiteClient("all", data, data.splits["train"], val, cfg, site_rank=0)
    server = _run(data, cfg, [client])
    losses = [h["val_loss"] for h in server.history if "val_loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # the site-side validation loss is the NLL the training step minimises, not a Cox loss on the ranking score
    ev = client.evaluate(server.global_arrays, {})
    module = new_module(new_model(data, cfg), cfg)
    from pipeline.federated.protocol import load_arrays

    load_arrays(module.model, server.global_arrays)
    module.eval()
    batch = next(iter(make_loader(data, client.val_idx, len(client.val_idx), False)))
    with torch.no_grad():
        want = float(module.loss(batch, module(batch)))
    assert ev.metrics["loss_sum"] / ev.metrics["events"] == pytest.approx(want, rel=1e-5)


def _dp_server(sigma=1.0, clip=0.5, seed=0):
    cfg = resolve_config(
        None,
        [f"train.seed={seed}", "federated.strategy=fedavg", f"federated.dp_noise={sigma}", f"federated.dp_clip={clip}"],
    )
    return FederatedServer(cfg, {"w": np.zeros(20000, np.float32)})


def _dp_updates(n=4, clip=0.5):
    rng = np.random.default_rng(1)
    from pipeline.federated.protocol import clip_l2

    return [Update(clip_l2({"w": rng.normal(size=20000).astype(np.float32)}, clip)[0], 1) for _ in range(n)]


def test_dp_noise_is_fresh_and_not_derived_from_the_saved_seed():
    ups = _dp_updates()
    true_mean = weighted_mean(ups)["w"]
    a, b = _dp_server().aggregate(0, ups, []), _dp_server().aggregate(0, ups, [])
    assert not np.allclose(a["w"], b["w"])  # same config and seed, different noise
    noise = a["w"].astype(np.float64) - true_mean  # fedavg, lr 1, from zeros: global = noisy mean
    std = 1.0 * 2 * 0.5 / len(ups)
    for guess_std in (std, 1.0 * 0.5 / len(ups)):  # the old scheme: rng([train.seed, round, 0xD9])
        regen = np.random.default_rng([0, 0, 0xD9]).normal(0.0, guess_std, size=noise.shape)
        assert np.linalg.norm(noise - regen) > 0.5 * np.linalg.norm(noise)  # nothing cancels


def test_dp_noise_std_is_sigma_times_the_replace_one_sensitivity_of_the_mean():
    from pipeline.federated.dp import dp_noise_std

    sigma, clip, n = 1.3, 0.5, 4
    assert dp_noise_std(sigma, clip, n) == pytest.approx(sigma * 2 * clip / n)
    ups = _dp_updates(n, clip)
    noisy = _dp_server(sigma, clip).aggregate(0, ups, [])["w"].astype(np.float64) - weighted_mean(ups)["w"]
    assert np.std(noisy) == pytest.approx(sigma * 2 * clip / n, rel=0.03)  # 20000 draws: ~0.5% sd
    # replace-one: swapping one site's clipped update moves the mean by at most 2C/n
    other = [*ups[:-1], Update({"w": -ups[-1].arrays["w"]}, 1)]
    shift = np.linalg.norm(weighted_mean(ups)["w"] - weighted_mean(other)["w"])
    assert shift <= 2 * clip / n + 1e-6


class _BadData(SiteClient):
    def fit(self, arrays, config):
        raise ValueError("patients.csv row 3, field time: 1e39 is not finite as float32")


def test_site_with_a_repeating_error_stops_the_run_naming_the_site(fed_data):
    """A data error repeats every round: no silent drop (the default min_sites is every site anyway)."""
    from pipeline.federated.protocol import SiteDataError

    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=2", "federated.local_epochs=1", "federated.min_sites=1")
    clients = site_clients(data, cfg)
    c0 = clients[0]
    clients[0] = _BadData(c0.site, data, c0.train_idx, c0.val_idx, cfg, c0.rank)
    with pytest.raises(SiteDataError, match=rf"site {c0.site}: ValueError: patients.csv row 3, field time: 1e39"):
        _run(data, cfg, clients)


class _LateOnce(SiteClient):
    """Answers its first train message after the round timeout (a clock jump, so the test does not sleep)."""

    clock: list

    def fit(self, arrays, config):
        if not self.clock[1]:
            self.clock[0] += 1000.0
            self.clock[1] = True
        return super().fit(arrays, config)


def test_site_timing_out_once_is_retried_and_kept(fed_data, monkeypatch):
    import time as real_time

    import pipeline.federated.embedded as embedded

    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=1", "federated.local_epochs=1", "federated.round_timeout=600")
    assert cfg.federated.min_sites is None  # default: every site must answer
    clock = [0.0, False]

    class _Clock:
        @staticmethod
        def perf_counter():
            return real_time.perf_counter() + clock[0]

    monkeypatch.setattr(embedded, "_time", _Clock)
    clients = site_clients(data, cfg)
    c0 = clients[0]
    late = _LateOnce(c0.site, data, c0.train_idx, c0.val_idx, cfg, c0.rank)
    late.clock = clock
    clients[0] = late
    server = _run(data, cfg, clients)
    rec = server.history[0]
    assert rec["retried"] == [c0.site] and rec["dropped"] == []
    assert server.summary()["retried"] == [{"round": 0, "site": c0.site}] and server.summary()["dropped"] == []


class _SmuggleCount(SiteClient):
    """Sends patient 0's survival time as the update's weight."""

    def fit(self, arrays, config):
        upd = super().fit(arrays, config)
        return Update(upd.arrays, int(round(float(self.data.time[self.train_idx[0]]))), upd.metrics)


class _SmuggleEvents(SiteClient):
    """Sends a validation patient's survival time under the allowed evaluation key ``events``."""

    def evaluate(self, arrays, config):
        ev = super().evaluate(arrays, config)
        return type(ev)(ev.num_examples, {**ev.metrics, "events": float(self.data.time[self.val_idx[0]])})


@pytest.mark.parametrize("smuggler", [_SmuggleCount, _SmuggleEvents], ids=["num_examples", "metric_events"])
def test_a_patient_value_smuggled_in_a_reply_is_stopped_at_the_site(fed_data, smuggler):
    from pipeline.federated.protocol import SiteDataError

    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=1", "federated.local_epochs=1")
    clients = site_clients(data, cfg)
    k = next(i for i, c in enumerate(clients) if len(c.val_idx))
    c = clients[k]
    clients[k] = smuggler(c.site, data, c.train_idx, c.val_idx, cfg, c.rank)
    leaked = data.time[c.train_idx[0]] if smuggler is _SmuggleCount else data.time[c.val_idx[0]]
    assert round(float(leaked)) not in {len(c.train_idx), c.n_events, 1, len(c.val_idx)}
    field = "num_examples" if smuggler is _SmuggleCount else "events"
    grids: list = []
    with pytest.raises(SiteDataError, match=rf"site {c.site}: DisclosureError: .*{field} = "):
        _run(data, cfg, clients, grids=grids)
    leaked_msgs = [m for s, m in grids[0].sent if s == c.site and m.has_content()]
    assert all(m.metadata.message_type != ("train" if field == "num_examples" else "evaluate") for m in leaked_msgs)


def test_checkpoint_is_safetensors_plus_json_and_a_damaged_one_is_a_named_error(tmp_path):
    from pipeline.federated.protocol import Evaluation

    cfg = resolve_config(None, ["federated.strategy=fedadam", "federated.rounds=3"])
    server = FederatedServer(cfg, {"w": np.zeros(4, np.float32), "b": np.ones(2, np.float32)}, tmp_path)
    for rnd in range(2):
        server.aggregate(rnd, [Update({"w": np.full(4, 0.1, np.float32), "b": np.zeros(2, np.float32)}, 3)], [])
        server.finish_round(rnd, {"a": Evaluation(3, {"concordant": 1.0, "comparable": 2.0})}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server_state.json", "server_state.r1.safetensors"]
    back = FederatedServer(cfg, None, tmp_path, resume=True)
    assert back.next_round == 2 and back.opt.t == 2 and list(back.global_arrays) == ["w", "b"]
    for k in server.global_arrays:
        np.testing.assert_array_equal(back.global_arrays[k], server.global_arrays[k])
        np.testing.assert_array_equal(back.opt.m[k], server.opt.m[k])
    arrays = tmp_path / "server_state.r1.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:20])  # truncated
    with pytest.raises(ValueError, match=r"server_state.json: unreadable federated checkpoint"):
        FederatedServer(cfg, None, tmp_path, resume=True)
