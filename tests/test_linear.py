"""The linear model family: its formula, missing inputs, the slide standardisation from site summaries, and
training through the same centralised and federated code as the network."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from data_specs import resolve_config
from models import LinearSurvival, build_model, cox_loss
from pipeline.training.data import CohortData
from pipeline.training.slide_norm import prepare_slide_norm, slide_norm_from_summaries, slide_site_summary

D, G, C = 6, 8, 3
# the ridge fit over every standardised slide dimension (the tests below that pin it are about that path; the
# elastic net and the slide projection, the defaults, are tested in tests/test_linear_sparse.py)
RIDGE_ALL = ["model.linear_slide_pcs=0", "train.linear_l1_ratio=0"]


def synthetic(n: int = 180, seed: int = 0, n_sites: int = 3) -> CohortData:
    """``n`` patients at ``n_sites`` sites: bags of 3-10 tiles (D=6, feature 0 on a large scale, offset 5) whose
    mean carries the log hazard ``1.5 u`` in feature 0; genes and clinical covariates are noise."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=n)
    bags = []
    for i in range(n):
        b = rng.normal(size=(int(rng.integers(3, 11)), D)).astype(np.float32)  # (N_i, D)
        b[:, 0] = 5.0 + 10.0 * (b[:, 0] * 0.3 + u[i])
        bags.append(b)
    time = rng.exponential(np.exp(-1.5 * u)).astype(np.float32)
    perm = rng.permutation(n)
    splits = {"train": np.sort(perm[: n // 2]), "val": np.sort(perm[n // 2 : 3 * n // 4]),
              "test": np.sort(perm[3 * n // 4 :])}  # fmt: skip
    return CohortData(
        patient_ids=[f"P{i:03d}" for i in range(n)],
        sites=[f"s{k}" for k in range(n_sites)],
        site=np.arange(n) % n_sites,
        time=time,
        event=rng.random(n) < 0.8,
        splits=splits,
        bags=bags,
        tiles=[[("s", 0, 0)] * len(b) for b in bags],
        feature_dim=D,
        omics=rng.normal(size=(n, G)).astype(np.float32),
        omics_present=np.ones(n, bool),
        genes=[f"G{j}" for j in range(G)],
        clinical=rng.normal(size=(n, C)).astype(np.float32),
        clinical_present=np.ones(n, bool),
        clinical_columns=["a", "b", "c"],
    )


def _random_model(n_bins: int = 0, seed: int = 0, grad: bool = False) -> LinearSurvival:
    torch.manual_seed(seed)
    m = LinearSurvival(D, G, C, n_bins=n_bins)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    m.set_slide_norm(torch.randn(D), torch.rand(D) + 0.5)
    return m.requires_grad_(grad)


def _inputs(b: int = 4, n: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 3:] = False
    return {
        "features": torch.randn(b, n, D, generator=g),
        "mask": mask,
        "omics": torch.randn(b, G, generator=g),
        "omics_mask": torch.ones(b, dtype=torch.bool),
        "clinical": torch.randn(b, C, generator=g),
        "clinical_mask": torch.ones(b, dtype=torch.bool),
    }


def test_log_hz_is_the_linear_formula():
    m, x = _random_model(), _inputs()
    out = m(**x)
    mean = torch.stack([x["features"][i][x["mask"][i]].mean(0) for i in range(4)])  # (B, D)
    z = (mean - m.slide_mean) / m.slide_scale
    want = (
        z @ m.slide_linear.weight[0]
        + x["omics"] @ m.omics_linear.weight[0]
        + x["clinical"] @ m.clinical_linear.weight[0]
    )
    torch.testing.assert_close(out.log_hz, want)
    assert out.attn is not None and out.attn.shape == (4, 5)
    torch.testing.assert_close(out.attn[1], torch.tensor([1 / 3] * 3 + [0.0] * 2))  # uniform over real tiles


def test_missing_inputs_contribute_nothing_and_padding_changes_nothing():
    m, x = _random_model(), _inputs()
    full = m(**x).log_hz
    padded = {**x, "features": torch.cat([x["features"], 99 * torch.ones(4, 3, D)], 1),
              "mask": torch.cat([x["mask"], torch.zeros(4, 3, dtype=torch.bool)], 1)}  # fmt: skip
    torch.testing.assert_close(m(**padded).log_hz, full)
    no_tiles = {**x, "mask": torch.zeros_like(x["mask"])}
    torch.testing.assert_close(
        m(**no_tiles).log_hz, full - m.slide_linear(m.slide_z(x["features"], x["mask"])[0])[:, 0]
    )
    no_omics = {**x, "omics_mask": torch.tensor([True, False, True, True])}
    diff = full - m(**no_omics).log_hz
    assert diff[[0, 2, 3]].abs().max() == 0 and diff[1] == pytest.approx(float(m.omics_linear(x["omics"][1])))


def test_every_parameter_gets_a_gradient_and_the_discrete_time_head_works():
    for n_bins in (0, 4):
        m, x = _random_model(n_bins, grad=True), _inputs()
        out = m(**x)
        if n_bins:
            assert out.logits is not None and out.logits.shape == (4, 4) and out.survival is not None
            loss = out.logits.sum()
        else:
            loss = cox_loss(out.log_hz, torch.tensor([1, 0, 1, 1]).bool(), torch.tensor([1.0, 2.0, 3.0, 4.0]))
        loss.backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_factory_and_bad_arguments():
    assert isinstance(build_model(D, 0, 0, family="linear", mil="transmil", hidden=32), LinearSurvival)
    assert not isinstance(build_model(D, G, 0), LinearSurvival)  # the network stays the default
    with pytest.raises(ValueError, match="valid names are \\['linear', 'network'\\]"):
        build_model(D, G, C, family="ridge")
    with pytest.raises(ValueError, match="at least one modality"):
        LinearSurvival(0, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        LinearSurvival(D, 0, 0).set_slide_norm(torch.zeros(D + 1), torch.ones(D + 1))
    with pytest.raises(ValueError, match="scale must be > 0"):
        LinearSurvival(D, 0, 0).set_slide_norm(torch.zeros(D), torch.zeros(D))
    with pytest.raises(ValueError, match="model.family"):
        resolve_config(None, ["model.family=ridge"])


def test_slide_norm_from_site_summaries_is_the_training_slides_statistics():
    data = synthetic()
    tr = data.splits["train"]
    means = np.stack([data.bags[i].astype(np.float64).mean(0) for i in tr])
    sums = [slide_site_summary(data, idx) for idx in data.subset_sites(tr).values()]
    mean, scale = slide_norm_from_summaries(sums, D)
    np.testing.assert_allclose(mean, means.mean(0), rtol=1e-10)
    np.testing.assert_allclose(scale, means.std(0), rtol=1e-8)
    assert slide_site_summary(data, tr[:1]) is None  # one patient's summary is that patient's values
    m = LinearSurvival(D, G, C)
    before = data.bags[data.splits["test"][0]].copy()
    data.bags[data.splits["test"][0]][:] = 1e6  # test patients never enter the statistics
    prepare_slide_norm(m, data)
    np.testing.assert_allclose(m.slide_mean.numpy(), means.mean(0), rtol=1e-5)
    data.bags[data.splits["test"][0]][:] = before


def _cindex(model, data: CohortData, split: str) -> float:
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.predict import predict

    idx = data.splits[split]
    return harrell_cindex(data.time[idx], data.event[idx], predict(model, data, idx).log_hz)


@pytest.mark.parametrize("federated", [False, True])
def test_linear_family_learns_the_slide_signal_centralised_and_federated(federated, monkeypatch):
    from pipeline.federated.embedded import run_federated
    from pipeline.training import linear_fit
    from pipeline.training.module import fit_local, new_model

    monkeypatch.setattr(linear_fit, "PENALTY_GRID", (0.01, 1.0))  # centralised: the CV fit; two candidates
    data = synthetic()
    ov = ["model.family=linear", "train.lr=0.05", "train.epochs=15", "train.batch_size=32",
          "federated.rounds=6", "federated.local_epochs=2", *RIDGE_ALL]  # fmt: skip
    cfg = resolve_config(None, ov)
    model = run_federated(data, cfg)[0] if federated else fit_local(data, cfg)[0].model
    assert isinstance(model, LinearSurvival)
    assert _cindex(model, data, "test") > 0.75  # the planted slide signal; noise inputs alone give ~0.5
    w = model.slide_linear.weight[0].detach().abs()
    assert int(w.argmax()) == 0 and float(model.slide_scale[0]) > 5  # feature 0, standardised from its scale
    assert float(new_model(data, cfg).slide_mean[0]) == pytest.approx(float(model.slide_mean[0]))


def test_model_file_round_trip_keeps_the_slide_standardisation(tmp_path):
    from data_specs.artifacts import FeatureAttrs, RunFiles
    from pipeline.training.bundle import load_bundle, save_bundle
    from pipeline.training.module import new_model
    from pipeline.training.predict import predict

    data = synthetic(n=60)
    data.feature_attrs = FeatureAttrs(encoder="enc", weights=None, feature_kind="imagenet", dim=D, tile_px=224,
                                      target_mpp=0.5)  # fmt: skip
    cfg = resolve_config(None, ["model.family=linear"], out=tmp_path)
    model = new_model(data, cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    path = RunFiles(root=tmp_path).model
    save_bundle(path, model, data, cfg, {"train_info": {"mode": "centralised"}})
    loaded, card = load_bundle(path)
    assert isinstance(loaded, LinearSurvival) and card.config.model.family == "linear"
    torch.testing.assert_close(loaded.slide_mean, model.slide_mean)
    torch.testing.assert_close(loaded.slide_scale, model.slide_scale)
    idx = np.arange(60)
    np.testing.assert_array_equal(predict(loaded, data, idx).log_hz, predict(model, data, idx).log_hz)


# --- the full-batch fit to the optimum and the federated cross-validation (pipeline.training.linear_fit,
# pipeline.training.linear_solver, pipeline.federated.linear_sites)


def _tied_cox_data(n: int = 240, f: int = 6, seed: int = 0, n_sites: int = 1):
    """Covariates ``[n, f]``, times rounded (many ties) with a baseline hazard that differs by site."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    site = np.arange(n) % n_sites
    beta = np.linspace(1.0, -0.5, f)
    t = np.round(rng.exponential(np.exp(-(x @ beta) - 0.7 * site)), 1) + 0.1
    return x, t, rng.random(n) < 0.7, site


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_full_batch_fit_equals_scikit_survival_coxph_on_the_same_penalty(ties):
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    from models.linear import cox_nll_sum
    from pipeline.training.linear_fit import Party, assign_folds
    from pipeline.training.linear_solver import fit_ridge

    x, t, e, _ = _tied_cox_data()
    p = Party("a", torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e), assign_folds(len(t), 5, 0, 0), ties)
    lh = torch.from_numpy(x @ np.ones(x.shape[1]) * 0.3)
    want = cox_loss(lh, torch.from_numpy(e), torch.from_numpy(t), None, ties) * int(e.sum())  # torchsurv
    got = cox_nll_sum(lh, torch.from_numpy(e), torch.from_numpy(t), ties)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(float(want), rel=1e-5)  # torchsurv: float32
    for c in (0.01, 0.3):
        fit = fit_ridge([p], c)
        sk = CoxPHSurvivalAnalysis(alpha=c * len(t), ties=ties, tol=1e-12, n_iter=200).fit(x, Surv.from_arrays(e, t))
        assert fit.converged and np.abs(fit.beta - sk.coef_).max() < 1e-5, (c, fit.beta, sk.coef_)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_closed_form_gradient_is_the_autograd_gradient_of_the_partial_likelihood(ties):
    from models.linear import cox_nll_sum
    from pipeline.training.linear_solver import cox_nll_grad

    x, t, e, _ = _tied_cox_data(n=80)
    eta = torch.from_numpy(x @ np.linspace(-1, 1, x.shape[1])).requires_grad_(True)
    want = cox_nll_sum(eta, torch.from_numpy(e), torch.from_numpy(t), ties)
    (g,) = torch.autograd.grad(want, eta)
    value, grad = cox_nll_grad(eta.detach().numpy(), e, t, ties)
    assert value == pytest.approx(float(want.detach()), rel=1e-12)
    np.testing.assert_allclose(grad, g.numpy(), rtol=1e-9, atol=1e-12)
    assert cox_nll_grad(eta.detach().numpy(), np.zeros(80, bool), t, ties)[0] == 0.0


def test_federated_fit_equals_the_pooled_site_stratified_fit():
    from scipy.optimize import minimize

    from models.linear import cox_nll_sum
    from pipeline.federated.ledger import MessageLedger
    from pipeline.federated.linear_sites import SiteParty
    from pipeline.training.linear_fit import assign_folds
    from pipeline.training.linear_solver import fit_ridge

    x, t, e, site = _tied_cox_data(n=300, n_sites=3)
    c, n = 0.05, len(t)
    X, T, E, S = (torch.from_numpy(a) for a in (x, t, e, site))

    def pooled(b):  # the stratified likelihood of the pooled data (cox_nll_sum is checked against sksurv above)
        bt = torch.from_numpy(b).requires_grad_(True)
        nll = sum(cox_nll_sum(X[S == k] @ bt, E[S == k], T[S == k]) for k in range(3))
        f = nll / n + 0.5 * c * (bt @ bt)
        (g,) = torch.autograd.grad(f, bt)
        return float(f.detach()), g.numpy()

    ref = minimize(pooled, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B", options={"gtol": 1e-9, "ftol": 0}).x
    ledger = MessageLedger(None)
    sites = [SiteParty(f"s{k}", X[site == k], T[site == k], E[site == k], assign_folds(100, 5, 0, k),
                       min_count=10, ledger=ledger) for k in range(3)]  # fmt: skip
    fed = fit_ridge(sites, c)
    assert fed.converged and np.abs(fed.beta - ref).max() < 1e-6
    unstratified = fit_ridge([SiteParty("all", X, T, E, assign_folds(n, 5, 0, 0))], c).beta
    assert np.abs(unstratified - ref).max() > 1e-2  # the strata matter here: the comparison can fail
    assert len(ledger.lines) == 3 * fed.evaluations and {ln["phase"] for ln in ledger.lines} == {"linear.gradient"}


def test_cv_score_is_the_verweij_van_houwelingen_cross_validated_likelihood():
    from models.linear import cox_nll_sum
    from pipeline.training.linear_fit import Party, assign_folds, cross_validate
    from pipeline.training.linear_solver import fit_ridge

    x, t, e, _ = _tied_cox_data(n=120)
    fold = assign_folds(120, 4, 3, 0)
    assert sorted(np.bincount(fold)) == [30, 30, 30, 30]
    p = Party("a", torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e), fold)
    rec = cross_validate([p], [0.1])[0]
    want = 0.0
    for k in range(4):
        b = torch.from_numpy(fit_ridge([p], 0.1, drop_fold=k).beta)
        out = fold != k
        T, E = torch.from_numpy(t), torch.from_numpy(e)
        want += float(cox_nll_sum(p.x[out] @ b, E[out], T[out]) - cox_nll_sum(p.x @ b, E, T))
    assert rec["cv_loglik"] == pytest.approx(want, rel=1e-6) and 0.6 < rec["cv_cindex"] < 1


def test_federated_cv_chooses_without_test_outcomes_and_finds_the_signal(tmp_path):
    from pipeline.federated.ledger import check_no_values, read_ledger
    from pipeline.federated.linear_sites import fit_federated_cv
    from pipeline.training.module import new_model

    data = synthetic(n=240)  # 3 sites, 40 training + 20 validation patients each
    cfg = resolve_config(None, ["model.family=linear", *RIDGE_ALL])  # ridge on every dimension
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    grid = (0.003, 0.1, 3.0, 100.0)

    def fit(d):
        m = new_model(d, cfg)
        return m, fit_federated_cv(m, d, idx, cfg, tmp_path / "ledger.jsonl", grid)

    m, rec = fit(data)
    assert rec["penalty"] == max(rec["candidates"], key=lambda r: r["cv_loglik"])["penalty"] < 100.0
    assert rec["sites"] == ["s0", "s1", "s2"] and not rec["sites_left_out"] and rec["converged"]
    assert _cindex(m, data, "test") > 0.75 and int(m.slide_linear.weight[0].abs().argmax()) == 0
    lines = list(read_ledger(tmp_path / "ledger.jsonl"))
    assert len(lines) == rec["ledger_lines"] and {ln["phase"] for ln in lines} == {"linear.gradient", "linear.cv_score"}
    for ln in lines:
        check_no_values(ln)
    te = data.splits["test"]
    other = replace(data, time=data.time.copy(), event=data.event.copy())
    other.time[te], other.event[te] = other.time[te][::-1], ~other.event[te]
    m2, rec2 = fit(other)
    assert rec2["candidates"] == rec["candidates"]  # test outcomes never enter the choice or the fit
    torch.testing.assert_close(m2.coefficients(), m.coefficients())


def test_federated_cv_leaves_small_sites_out_and_withholds_scores_below_the_minimum_count():
    from pipeline.federated.ledger import MessageLedger
    from pipeline.federated.linear_sites import SiteParty, site_parties
    from pipeline.training.linear_fit import assign_folds, cross_validate
    from pipeline.training.module import new_model

    data = synthetic(n=240)
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    cfg = resolve_config(None, ["model.family=linear", "federated.min_count=100"])  # each site: ~60
    with pytest.raises(ValueError, match="federated.min_count=100"):
        site_parties(new_model(data, cfg), data, idx, cfg)
    small = np.concatenate([idx[data.site[idx] != 2], idx[data.site[idx] == 2][:12]])  # site s2: 12 patients
    cfg = resolve_config(None, ["model.family=linear", "federated.min_count=10"])
    parties, left = site_parties(new_model(data, cfg), data, small, cfg)
    assert left == ["s2"] and [p.name for p in parties] == ["s0", "s1"]
    x, t, e, _ = _tied_cox_data(n=60)
    e[:] = False
    e[:5] = True  # 5 events: a gradient may go (60 patients), a CV score may not
    ledger = MessageLedger(None)
    few = SiteParty("few", torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e), assign_folds(60, 5, 0, 0),
                    min_count=10, ledger=ledger)  # fmt: skip
    with pytest.raises(ValueError, match="no party could send"):
        from pipeline.training.linear_fit import choose

        choose(cross_validate([few], [1.0]))
    assert any("withheld" in ln and not ln["records"] for ln in ledger.lines)


def test_linear_family_fit_local_is_the_cv_fit_and_predict_is_the_design_times_coefficients(monkeypatch):
    from pipeline.training import linear_fit
    from pipeline.training.linear_fit import design
    from pipeline.training.module import fit_local
    from pipeline.training.predict import predict

    monkeypatch.setattr(linear_fit, "PENALTY_GRID", (0.01, 1.0, 100.0))  # three candidates keep it fast
    data = synthetic()
    module, info = fit_local(data, resolve_config(None, ["model.family=linear", "federated.enabled=false", *RIDGE_ALL]))
    model = module.model
    assert info["select"] == "cv" and info["linear_fit"]["converged"] and len(info["linear_fit"]["candidates"]) == 3
    assert info["linear_fit"]["penalty"] < 100.0 and _cindex(model, data, "test") > 0.75
    idx = np.arange(len(data.time))
    x = design(model, data, idx)
    np.testing.assert_allclose(predict(model, data, idx).log_hz, (x @ model.coefficients().double()).numpy(), atol=1e-4)
    sgd = fit_local(data, resolve_config(None, ["model.family=linear", "train.linear_fit=sgd", "train.epochs=2"]))[1]
    assert sgd["select"] != "cv"  # the mini-batch path stays available


def test_a_federated_linear_family_run_is_the_federated_cv_fit_and_sgd_keeps_the_strategies(tmp_path, monkeypatch):
    """``model.family=linear`` federated (no DP, no SecAgg+): run_federated returns fit_federated_cv's model (the
    pooled stratified optimum at the CV penalty), with its messages in the run's privacy ledger; with
    ``train.linear_fit=sgd`` (or DP) it still trains through the Flower strategies, round by round."""
    from pipeline.federated.embedded import run_federated
    from pipeline.federated.ledger import read_ledger
    from pipeline.federated.linear_sites import fit_federated_cv, full_batch_linear
    from pipeline.training import linear_fit
    from pipeline.training.module import new_model

    monkeypatch.setattr(linear_fit, "PENALTY_GRID", (0.01, 1.0, 100.0))
    data = synthetic()
    cfg = resolve_config(None, ["model.family=linear", *RIDGE_ALL])  # ridge on every dimension
    assert full_batch_linear(cfg) and not full_batch_linear(cfg.with_overrides(["federated.dp_noise=1"]))
    (tmp_path / "federated").mkdir()
    model, info = run_federated(data, cfg, tmp_path / "federated")
    ref = new_model(data, cfg)
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    rec = fit_federated_cv(ref, data, idx, cfg)
    torch.testing.assert_close(model.coefficients(), ref.coefficients())
    assert info["linear_fit"]["penalty"] == rec["penalty"] and info["best_round"] == rec["rounds"] > 0
    assert _cindex(model, data, "test") > 0.75
    phases = {ln["phase"] for ln in read_ledger(tmp_path / "privacy_ledger.jsonl")}
    assert phases == {"linear.gradient", "linear.cv_score"}
    sgd = resolve_config(None, ["model.family=linear", "train.linear_fit=sgd", "federated.rounds=2",
                                "federated.local_epochs=1"])  # fmt: skip
    info_sgd = run_federated(data, sgd)[1]
    assert [h["round"] for h in info_sgd["history"]] == [0, 1] and "linear_fit" not in info_sgd
