"""The linear family's elastic net and low-rank slide projection: the fit against scikit-survival's Coxnet, the
projection against scikit-learn's PCA, the projection's buffers in the model file, and the federated path's
disclosure checks of the slide aggregates."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from data_specs import resolve_config
from models import LinearSurvival
from pipeline.training.linear_fit import Party
from pipeline.training.linear_solver import fit_ridge
from tests.test_linear import D, _cindex, _inputs, synthetic


def _sparse_cox(n: int = 90, f: int = 25, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    beta = np.zeros(f)
    beta[:3] = [1.0, -0.7, 0.5]
    t = np.round(rng.exponential(np.exp(-x @ beta)), 2)  # tied times
    e = rng.random(n) < 0.7
    return x, t, e


@pytest.mark.parametrize(("alpha", "l1_ratio"), [(0.05, 0.5), (0.02, 0.9), (0.1, 0.2)])
def test_elastic_net_fit_equals_scikit_survival_coxnet(alpha, l1_ratio):
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    x, t, e = _sparse_cox()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CoxnetSurvivalAnalysis(alphas=[alpha], l1_ratio=l1_ratio, tol=1e-12, max_iter=1_000_000,
                                     fit_baseline_model=False).fit(x, Surv.from_arrays(e, t)).coef_[:, 0]  # fmt: skip
    party = Party(
        "one", torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e), np.zeros(len(t), int), "breslow"
    )
    fit = fit_ridge([party], alpha, l1_ratio=l1_ratio)
    assert fit.converged and 0 < (ref != 0).sum() < len(ref)  # a sparse solution, some coefficients exactly 0
    np.testing.assert_array_equal(fit.beta != 0, ref != 0)  # the same support
    assert np.abs(fit.beta - ref).max() / np.abs(ref).max() < 1e-4  # measured 3e-6 .. 6e-6


def test_elastic_net_at_l1_ratio_0_is_the_ridge_fit_and_the_split_parties_are_the_pooled_strata():
    x, t, e = _sparse_cox()
    mk = lambda rows: Party("p", torch.from_numpy(x[rows]), torch.from_numpy(t[rows]), torch.from_numpy(e[rows]),  # noqa: E731
                            np.zeros(len(rows), int))  # fmt: skip
    halves = [mk(np.arange(0, 45)), mk(np.arange(45, 90))]
    en = fit_ridge(halves, 0.05, l1_ratio=0.5)
    # the sum of two strata's answers is what the server sees: equal to one fit over the two strata, whatever the
    # order of the parties
    np.testing.assert_allclose(fit_ridge(halves[::-1], 0.05, l1_ratio=0.5).beta, en.beta, atol=1e-6)
    np.testing.assert_allclose(fit_ridge(halves, 0.3, l1_ratio=0.0).beta, fit_ridge(halves, 0.3).beta, atol=1e-10)
    with pytest.raises(ValueError, match="l1_ratio"):
        fit_ridge(halves, 0.1, l1_ratio=1.5)


@pytest.mark.parametrize("level", ["patients", "tiles"])
def test_projection_from_site_moments_is_the_pca_of_the_pooled_rows(level):
    from sklearn.decomposition import PCA

    from pipeline.training.slide_norm import projection_from_moments, slide_moments

    data = synthetic(n=90)
    idx = np.arange(90)
    moments = [slide_moments(data, g, level) for g in data.subset_sites(idx).values()]
    mean, comps = projection_from_moments(moments, 3)
    means = np.stack([b.astype(np.float64).mean(0) for b in data.bags])  # (P, D)
    if level == "patients":
        rows, weights = means, np.ones(len(means))
    else:  # every tile, a patient's tiles weighted 1 / N_i
        rows = np.concatenate([b.astype(np.float64) for b in data.bags])
        weights = np.concatenate([np.full(len(b), 1.0 / len(b)) for b in data.bags])
    np.testing.assert_allclose(mean, means.mean(0), rtol=1e-10)  # each patient counts once in both
    if level == "patients":
        ref = PCA(3).fit(rows).components_
    else:
        cov = np.cov(rows.T, aweights=weights, bias=True)
        ref = np.linalg.eigh(cov)[1][:, ::-1][:, :3].T
    np.testing.assert_allclose(np.abs(comps @ ref.T), np.eye(3), atol=1e-8)  # the same directions (up to sign)
    assert (comps[np.arange(3), np.abs(comps).argmax(1)] > 0).all()  # signs fixed: the largest entry positive


def test_projected_model_forward_is_the_design_and_its_state_loads_into_a_plain_model():
    from pipeline.training.linear_fit import design
    from pipeline.training.slide_norm import prepare_slide_projection

    data = synthetic(n=90)
    idx = np.arange(90)
    m = LinearSurvival(D, 8, 3)
    info = prepare_slide_projection(m, data, idx, 2)
    assert info == {"r": 2, "level": "tiles", "sites": ["s0", "s1", "s2"], "patients": 90,
                    "rows": sum(len(b) for b in data.bags)}  # fmt: skip
    assert m.slide_pcs == 2 and m.slide_linear.in_features == 2
    x = design(m, data, idx)  # (P, 2 + 8 + 3)
    np.testing.assert_allclose(x[:, :2].mean(0).numpy(), 0, atol=1e-5)  # scores standardised on these patients
    np.testing.assert_allclose(x[:, :2].std(0, unbiased=False).numpy(), 1, atol=1e-5)
    torch.manual_seed(0)
    m.set_coefficients(torch.randn(13, dtype=torch.float64))
    xin = _inputs()
    out = m(**xin).log_hz
    plain = LinearSurvival(D, 8, 3)
    plain.load_state_dict(m.state_dict())  # a model built without a projection takes its shapes
    torch.testing.assert_close(plain(**xin).log_hz, out)
    assert set(m.state_dict()) >= {"slide_components", "slide_pc_mean", "slide_pc_scale"}
    xin["mask"][2] = False  # an empty bag: its slide term is 0
    with torch.no_grad():
        rest = m.omics_linear(xin["omics"][2]) + m.clinical_linear(xin["clinical"][2])
        assert float(m(**xin).log_hz[2]) == pytest.approx(float(rest), abs=1e-5)
    with pytest.raises(ValueError, match="shape"):
        m.set_slide_projection(torch.zeros(2, D + 1), torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="slide_pcs"):
        LinearSurvival(D, 8, 3, slide_pcs=D + 1)


def test_defaults_fit_the_signal_federated_with_slide_aggregates_in_the_ledger(tmp_path):
    from pipeline.federated.ledger import check_no_values, read_ledger
    from pipeline.federated.linear_sites import fit_federated_cv
    from pipeline.training.module import new_model

    data = synthetic(n=240)
    cfg = resolve_config(None, ["model.family=linear", "model.linear_slide_pcs=2"])  # elastic net 0.5 by default
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    grid = (0.003, 0.03, 0.3, 3.0)

    def fit(d):
        m = new_model(d, cfg)
        return m, fit_federated_cv(m, d, idx, cfg, tmp_path / "ledger.jsonl", grid)

    m, rec = fit(data)
    assert rec["l1_ratio"] == 0.5 and rec["slide_projection"]["r"] == 2 and rec["converged"]
    assert rec["penalty"] < 3.0 and rec["nonzero"] < 2 + 8 + 3  # noise genes and covariates dropped
    assert _cindex(m, data, "test") > 0.75 and int(m.coefficients().abs().argmax()) == 0  # the first PC: feature 0
    lines = list(read_ledger(tmp_path / "ledger.jsonl"))
    phases = {ln["phase"] for ln in lines}
    assert phases == {"linear.gradient", "linear.cv_score", "linear.slide_moments", "linear.slide_scores"}
    moments = [ln for ln in lines if ln["phase"] == "linear.slide_moments"]
    assert len(moments) == 3 and moments[0]["records"]["aggregate"]["keys"]["cross"]["shape"] == [D, D]
    for ln in lines:
        check_no_values(ln)
    te = data.splits["test"]
    other = replace(data, bags=list(data.bags))
    for i in te:  # test patients' slides never enter the projection
        other.bags[i] = other.bags[i] * 0 + 100.0
    m2, rec2 = fit(other)
    torch.testing.assert_close(m2.get_buffer("slide_components"), m.get_buffer("slide_components"))
    assert rec2["candidates"] == rec["candidates"]


def test_slide_aggregates_pass_the_disclosure_policy_only_as_declared():
    from pipeline.federated.policy import DisclosureError, SiteFacts, check_slide_aggregate
    from pipeline.training.slide_norm import slide_moments

    data = synthetic(n=90)
    idx = np.arange(90)[data.site == 0]  # 30 patients
    msg = slide_moments(data, idx)
    facts = SiteFacts("s0", len(idx), 0, 0, 0, (), 10)
    check_slide_aggregate(facts, "slide_moments", msg, D)
    bad = [
        ({**msg, "extra": 1.0}, "fields"),
        ({**msg, "n_patients": 5}, "patients"),  # below the minimum count
        ({**msg, "n_patients": 31}, "patients"),  # more than the site has
        ({**msg, "sum": np.zeros(D + 1)}, "shape"),
        ({**msg, "cross": msg["cross"] + np.triu(np.ones((D, D)), 1)}, "symmetric"),
        ({**msg, "n_rows": 3}, "count"),
    ]
    for m, what in bad:
        with pytest.raises(DisclosureError, match=what):
            check_slide_aggregate(facts, "slide_moments", m, D)
    with pytest.raises(DisclosureError, match="undeclared"):
        check_slide_aggregate(facts, "slide_tiles", msg, D)
    small = slide_moments(data, idx[:8])  # 8 patients: withheld at k = 10, the server fits without it
    from pipeline.federated.ledger import MessageLedger
    from pipeline.federated.linear_sites import slide_release

    ledger = MessageLedger(None)
    cfg = resolve_config(None, ["model.family=linear"])
    release = slide_release(data, idx[:8], cfg, ledger)
    assert release("s0", "slide_moments", small) is False and ledger.lines[0]["withheld"]


def test_model_file_round_trip_keeps_the_slide_projection(tmp_path):
    from data_specs.artifacts import FeatureAttrs, RunFiles
    from pipeline.training.bundle import load_bundle, save_bundle
    from pipeline.training.linear_fit import fit_linear_centralised
    from pipeline.training.module import new_model
    from pipeline.training.predict import predict

    data = synthetic(n=90)
    data.feature_attrs = FeatureAttrs(encoder="enc", weights=None, feature_kind="imagenet", dim=D, tile_px=224,
                                      target_mpp=0.5)  # fmt: skip
    cfg = resolve_config(None, ["model.family=linear", "model.linear_slide_pcs=2"], out=tmp_path)
    model = new_model(data, cfg)
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    rec = fit_linear_centralised(model, data, idx, cfg)["linear_fit"]
    assert rec["slide_projection"]["r"] == 2 and model.slide_linear.in_features == 2
    path = RunFiles(root=tmp_path).model
    save_bundle(path, model.eval(), data, cfg, {"train_info": {"mode": "centralised"}})
    loaded, _ = load_bundle(path)
    assert isinstance(loaded, LinearSurvival) and loaded.slide_pcs == 2
    for name in ("slide_components", "slide_pc_mean", "slide_pc_scale", "slide_mean"):
        torch.testing.assert_close(loaded.get_buffer(name), model.get_buffer(name))
    every = np.arange(90)
    np.testing.assert_array_equal(predict(loaded, data, every).log_hz, predict(model, data, every).log_hz)
