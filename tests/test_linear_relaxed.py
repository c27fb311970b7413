"""``train.linear_relax``: the relaxed elastic net of the linear family. The refit on the active set against
scikit-survival, pooled == federated, the CV's choice of gamma on a sparse strong and a dense truth, the config's
check of the value."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from data_specs import resolve_config
from pipeline.training.data import CohortData
from pipeline.training.linear_fit import Party, fit_with_cv, parties_of
from pipeline.training.linear_relaxed import RELAX_GRID, RELAX_RIDGE, blend, refit, relax_values
from pipeline.training.linear_solver import fit_ridge

GRID = (0.3, 0.1, 0.03)  # a short grid of c keeps the tests fast


def _one_stratum(n: int = 120, f: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    beta = np.zeros(f)
    beta[:3] = [1.0, -0.8, 0.6]
    t = np.round(rng.exponential(np.exp(-x @ beta)), 2)  # tied times (Breslow, as scikit-survival's Coxnet)
    e = rng.random(n) < 0.75
    party = Party("one", torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e), np.zeros(n, int), "breslow")
    return x, t, e, party


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5])
def test_relaxed_fit_is_the_blend_of_coxnet_and_the_ridge_cox_refit_on_the_active_set(gamma):
    from sksurv.linear_model import CoxnetSurvivalAnalysis, CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    x, t, e, party = _one_stratum()
    c, a = 0.1, 0.5
    en = fit_ridge([party], c, l1_ratio=a)
    active = en.beta != 0
    assert 0 < active.sum() < len(active)  # a sparse elastic-net fit to relax
    again = refit([party], en.beta)
    relaxed = blend(en.beta, again.beta, gamma)
    y = Surv.from_arrays(e, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_en = CoxnetSurvivalAnalysis(alphas=[c], l1_ratio=a, tol=1e-12, max_iter=1_000_000,
                                        fit_baseline_model=False).fit(x, y).coef_[:, 0]  # fmt: skip
        ref_cox = CoxPHSurvivalAnalysis(alpha=RELAX_RIDGE * len(t), ties="breslow", tol=1e-12, n_iter=1000)
        ref_refit = ref_cox.fit(x[:, active], y).coef_  # the unpenalised refit with the small ridge
    np.testing.assert_array_equal(active, ref_en != 0)
    assert again.converged and not again.beta[~active].any()  # the inactive coefficients stay exactly 0
    np.testing.assert_allclose(again.beta[active], ref_refit, atol=1e-4, rtol=0)
    ref = gamma * ref_en
    ref[active] += (1 - gamma) * ref_refit
    np.testing.assert_allclose(relaxed, ref, atol=1e-4, rtol=0)
    # less shrinkage than the elastic net on the same active set: the planted effects grow in size
    assert np.abs(relaxed[:3]).sum() > np.abs(en.beta[:3]).sum()
    np.testing.assert_array_equal(blend(en.beta, again.beta, 1.0), en.beta)


def test_refit_of_an_empty_active_set_is_the_null_model_without_a_round():
    *_, party = _one_stratum()
    fit = refit([party], np.zeros(20))
    assert fit.evaluations == 0 and not fit.beta.any() and party.rounds == 0


def _genes_cohort(truth: str, g: int, n: int = 180, seed: int = 0) -> CohortData:
    """``n`` patients at 3 sites with ``g`` standardised genes: ``sparse``: the log hazard is 1.2 (g0 - g1), two strong
    effects; ``dense``: 0.3 times the sum of all ``g`` genes (every gene a small part, none stands out)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, g))
    beta = np.full(g, 0.3) if truth == "dense" else np.r_[1.2, -1.2, np.zeros(g - 2)]
    time = rng.exponential(np.exp(-x @ beta))
    perm = rng.permutation(n)
    splits = {"train": np.sort(perm[: n // 2]), "val": np.sort(perm[n // 2 : 3 * n // 4]),
              "test": np.sort(perm[3 * n // 4 :])}  # fmt: skip
    return CohortData(patient_ids=[f"P{i:03d}" for i in range(n)], sites=["s0", "s1", "s2"], site=np.arange(n) % 3,
                      time=time.astype(np.float32), event=rng.random(n) < 0.8, splits=splits,
                      omics=x.astype(np.float32), omics_present=np.ones(n, bool),
                      genes=[f"G{j}" for j in range(g)])  # fmt: skip


def _fit(data, relax, federated: bool = False, l1_ratio: float | str = 0.5):
    from pipeline.federated.linear_sites import fit_federated_cv
    from pipeline.training.module import new_model

    ov = ["model.family=linear", f"train.linear_l1_ratio={l1_ratio}", f"train.linear_relax={relax}",
          "federated.min_count=10"]  # fmt: skip
    cfg = resolve_config(None, ov)
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    model = new_model(data, cfg)
    if federated:
        rec = fit_federated_cv(model, data, idx, cfg, None, GRID)
    else:
        t = cfg.train
        rec = fit_with_cv(model, parties_of(model, data, idx, cfg, True), GRID, t.linear_l1_ratio, t.linear_relax)
    return rec, model.coefficients()


@pytest.mark.parametrize(("truth", "relaxed"), [("sparse", True), ("dense", False)])
def test_cv_relaxes_a_sparse_strong_truth_and_not_a_dense_one(truth, relaxed):
    data = _genes_cohort(truth, 30 if truth == "sparse" else 60)
    rec, beta = _fit(data, "auto")
    # sparse, 2 strong genes of 30: the elastic net's shrinkage costs CV likelihood, a smaller gamma wins; dense, 60
    # equal small effects in 135 patients: moving towards the unpenalised refit of the active set overfits, gamma 1
    assert (rec["relax"] < 1) is relaxed and rec["relax_setting"] == "auto"
    by_gamma = {r["relax"]: r["cv_loglik"] for r in rec["relax_candidates"]}
    assert sorted(by_gamma) == sorted(RELAX_GRID)
    best_relaxed = max(v for g, v in by_gamma.items() if g < 1)
    assert (best_relaxed > by_gamma[1.0]) is relaxed
    plain, plain_beta = _fit(data, 1.0)
    assert by_gamma[1.0] == pytest.approx(plain["cv_loglik"], rel=1e-9)  # gamma = 1 is today's path, unchanged
    if relaxed:
        assert "relaxed elastic net" in rec["fit"] and (beta != 0).sum() <= (plain_beta != 0).sum()
        assert rec["rounds"] > plain["rounds"]
    else:
        torch.testing.assert_close(beta, plain_beta)


def test_federated_and_pooled_relaxed_fits_are_the_same():
    data = _genes_cohort("sparse", 30, seed=1)
    pooled, b_pooled = _fit(data, "auto", l1_ratio="auto")
    fed, b_fed = _fit(data, "auto", federated=True, l1_ratio="auto")
    assert (fed["relax"], fed["penalty"], fed["l1_ratio"]) == (pooled["relax"], pooled["penalty"], pooled["l1_ratio"])
    assert pooled["relax"] < 1 and not fed["sites_left_out"]
    for a, b in zip(fed["relax_candidates"], pooled["relax_candidates"], strict=True):
        assert a["relax"] == b["relax"] and a["cv_loglik"] == pytest.approx(b["cv_loglik"], rel=1e-9)
    assert fed["rounds"] == pooled["rounds"]
    torch.testing.assert_close(b_fed, b_pooled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "relaxed", "true"])
def test_a_bad_relax_is_a_clear_config_error(bad):
    from data_specs.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.linear_relax must be a number in \[0, 1\] or 'auto', got"):
        resolve_config(None, [f"train.linear_relax={bad}"])
    with pytest.raises(ConfigError, match=r"train\.linear_relax=0.5 relaxes .* train\.linear_l1_ratio=0 \(ridge\)"):
        resolve_config(None, ["train.linear_relax=0.5", "train.linear_l1_ratio=0"])
    assert resolve_config(None, ["train.linear_relax=auto"]).train.linear_relax == "auto"
    assert resolve_config(None, ["train.linear_relax=0.25"]).train.linear_relax == 0.25
    assert relax_values("auto") == RELAX_GRID and relax_values(0) == (0.0,)
    with pytest.raises(ValueError, match=r"train\.linear_relax .* got 2"):
        relax_values(2)
