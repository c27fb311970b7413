"""``train.linear_cv_criterion``: the linear fit's K-fold CV choosing by partial likelihood (default) or by the
out-of-fold concordance of the same site answers, pooled and federated alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_specs import resolve_config
from pipeline.training.linear_fit import choose, fit_with_cv, parties_of
from tests.test_linear_mix import GRID, _genes_cohort


def _fit(data, criterion: str, federated: bool = False) -> tuple[dict, torch.Tensor]:
    from pipeline.federated.linear_sites import fit_federated_cv
    from pipeline.training.module import new_model

    cfg = resolve_config(None, ["model.family=linear", "train.linear_l1_ratio=auto", "federated.min_count=10",
                                f"train.linear_cv_criterion={criterion}"])  # fmt: skip
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    model = new_model(data, cfg)
    if federated:
        rec = fit_federated_cv(model, data, idx, cfg, None, GRID)
    else:
        parties = parties_of(model, data, idx, cfg, True)
        rec = fit_with_cv(model, parties, GRID, "auto", criterion=cfg.train.linear_cv_criterion)
    return rec, model.coefficients()


def test_choose_maximises_the_named_score_and_breaks_ties_towards_the_larger_penalty():
    recs = [
        {"penalty": 1.0, "l1_ratio": 0.0, "cv_loglik": -10.0, "cv_cindex": 0.70},
        {"penalty": 0.1, "l1_ratio": 0.0, "cv_loglik": -9.0, "cv_cindex": 0.70},
        {"penalty": 0.01, "l1_ratio": 0.5, "cv_loglik": -9.5, "cv_cindex": 0.65},
        {"penalty": 3.0, "l1_ratio": 0.5, "cv_loglik": float("nan"), "cv_cindex": 0.90},  # no score sent: never
    ]
    assert choose(recs)["penalty"] == 0.1
    assert choose(recs, "cindex")["penalty"] == 1.0  # tied at 0.70: the larger penalty
    with pytest.raises(KeyError):
        choose(recs, "auc")


def test_cindex_criterion_picks_the_candidate_with_the_best_cv_concordance_from_the_same_paths():
    data = _genes_cohort("sparse", seed=2)
    ll, b_ll = _fit(data, "loglik")
    ci, b_ci = _fit(data, "cindex")
    # the same CV paths (same folds, grids, fits): a candidate of the same c and mix has the same scores
    for a, b in zip(ll["candidates"], ci["candidates"], strict=True):
        assert a["penalty"] == b["penalty"]
        if a["l1_ratio"] == b["l1_ratio"]:
            assert (a["cv_loglik"], a["cv_cindex"]) == (b["cv_loglik"], b["cv_cindex"])
    best = max(ci["mix_candidates"], key=lambda r: r["cv_cindex"])  # each mix's best by concordance
    assert ci["cv_cindex"] == pytest.approx(best["cv_cindex"]) and ci["cv_cindex"] >= ll["cv_cindex"] - 1e-12
    assert ci["cv_criterion"] == "cindex" and "concordance" in ci["fit"] and "partial likelihood" in ll["fit"]
    assert ci["rounds"] == ll["rounds"] - ll["final_evaluations"] + ci["final_evaluations"]  # no extra CV round
    # on this cohort the criteria disagree (partial likelihood c 0.1, concordance c 0.3): the refit follows the pick
    assert ci["penalty"] > ll["penalty"] and ci["cv_cindex"] > ll["cv_cindex"]
    assert not torch.equal(b_ci, b_ll)


def test_federated_and_pooled_cindex_criterion_choose_the_same_fit():
    data = _genes_cohort("dense", seed=3)
    pooled, b_pooled = _fit(data, "cindex")
    fed, b_fed = _fit(data, "cindex", federated=True)
    assert (fed["penalty"], fed["l1_ratio"]) == (pooled["penalty"], pooled["l1_ratio"])
    assert fed["cv_cindex"] == pytest.approx(pooled["cv_cindex"], rel=1e-9)
    torch.testing.assert_close(b_fed, b_pooled, atol=1e-6, rtol=0)


def test_a_bad_criterion_is_a_config_error_naming_the_field():
    from data_specs.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.linear_cv_criterion"):
        resolve_config(None, ["train.linear_cv_criterion=auc"])
    assert resolve_config(None, []).train.linear_cv_criterion == "loglik"
