"""``train.linear_l1_ratio=auto``: the linear family's elastic-net mix chosen by the same (pooled or federated) CV
as its penalty; the config's check of the value; the factory's slide projection; the console label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_specs import resolve_config
from pipeline.training.data import CohortData
from pipeline.training.linear_fit import L1_RATIO_GRID, MixGrids, fit_with_cv, mixes, parties_of, penalty_grid

G = 30


def _genes_cohort(truth: str, n: int = 180, seed: int = 0) -> CohortData:
    """``n`` patients at 3 sites with ``G`` standardised genes: ``sparse``: the log hazard is 1.2 (g0 - g1); ``dense``:
    0.3 times the sum of all 30 genes (every gene carries a small part, none stands out)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, G))
    beta = np.zeros(G)
    if truth == "sparse":
        beta[:2] = [1.2, -1.2]
    else:
        beta[:] = 0.3
    time = rng.exponential(np.exp(-x @ beta))
    perm = rng.permutation(n)
    splits = {"train": np.sort(perm[: n // 2]), "val": np.sort(perm[n // 2 : 3 * n // 4]),
              "test": np.sort(perm[3 * n // 4 :])}  # fmt: skip
    return CohortData(
        patient_ids=[f"P{i:03d}" for i in range(n)],
        sites=["s0", "s1", "s2"],
        site=np.arange(n) % 3,
        time=time.astype(np.float32),
        event=rng.random(n) < 0.8,
        splits=splits,
        omics=x.astype(np.float32),
        omics_present=np.ones(n, bool),
        genes=[f"G{j}" for j in range(G)],
    )


GRID = (0.3, 0.1, 0.03, 0.01)  # a short grid of c for every mix keeps the tests fast


def _fit(data: CohortData, l1_ratio: float | str, federated: bool = False) -> tuple[dict, torch.Tensor]:
    """The pooled (site-stratified) or federated CV fit of the linear family on the non-test patients."""
    from pipeline.federated.linear_sites import fit_federated_cv
    from pipeline.training.module import new_model

    cfg = resolve_config(None, ["model.family=linear", f"train.linear_l1_ratio={l1_ratio}", "federated.min_count=10"])
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    model = new_model(data, cfg)
    if federated:
        rec = fit_federated_cv(model, data, idx, cfg, None, GRID)
    else:
        rec = fit_with_cv(model, parties_of(model, data, idx, cfg, True), GRID, cfg.train.linear_l1_ratio)
    return rec, model.coefficients()


@pytest.mark.parametrize(("truth", "want"), [("sparse", 0.5), ("dense", 0.0)])
def test_auto_picks_the_mix_with_the_best_cv_score(truth, want):
    data = _genes_cohort(truth)
    auto, beta = _fit(data, "auto")
    fixed = {a: _fit(data, a) for a in L1_RATIO_GRID}
    # the clear answer: the elastic net for 2 strong genes of 30, ridge for 30 equal small effects
    scores = {a: rec["cv_loglik"] for a, (rec, _) in fixed.items()}
    assert max(scores, key=scores.__getitem__) == want and abs(scores[0.0] - scores[0.5]) > 1.0
    assert auto["l1_ratio"] == want and auto["l1_ratio_setting"] == "auto"
    # the joint choice is each fixed mix's own CV (the same folds, the same grids), and the refit is that mix's fit
    assert [m["l1_ratio"] for m in auto["mix_candidates"]] == list(L1_RATIO_GRID)
    for m in auto["mix_candidates"]:
        rec = fixed[m["l1_ratio"]][0]
        assert m["cv_loglik"] == pytest.approx(rec["cv_loglik"], rel=1e-9) and m["penalty"] == rec["penalty"]
    assert auto["penalty"] == fixed[want][0]["penalty"]
    for k, cand in enumerate(auto["candidates"]):  # per c of the grid, the mix that scored best there
        at_c = {a: rec["candidates"][k] for a, (rec, _) in fixed.items()}
        assert cand["penalty"] == GRID[k] and cand == max(at_c.values(), key=lambda r: r["cv_loglik"])
    torch.testing.assert_close(beta, fixed[want][1])
    assert (
        auto["rounds"]
        == sum(rec["rounds"] - rec["final_evaluations"] for rec, _ in fixed.values()) + (auto["final_evaluations"])
    )
    assert ("ridge" if want == 0 else "elastic net (l1_ratio 0.5)") in auto["fit"] and "mix" in auto["fit"]
    if want == 0.5:
        assert (beta != 0).sum() < G  # the elastic net's exact zeros


def test_federated_and_pooled_auto_choose_the_same_mix_and_fit():
    data = _genes_cohort("sparse", seed=1)
    pooled, b_pooled = _fit(data, "auto")
    fed, b_fed = _fit(data, "auto", federated=True)
    assert fed["l1_ratio"] == pooled["l1_ratio"] and fed["penalty"] == pooled["penalty"]
    assert not fed["sites_left_out"] and fed["sites"] == ["s0", "s1", "s2"]
    for a, b in zip(fed["mix_candidates"], pooled["mix_candidates"], strict=True):
        assert a["l1_ratio"] == b["l1_ratio"] and a["cv_loglik"] == pytest.approx(b["cv_loglik"], rel=1e-9)
    torch.testing.assert_close(b_fed, b_pooled, atol=1e-6, rtol=0)


def test_auto_grid_keeps_each_mix_on_its_own_a_priori_grid_and_a_plain_grid_is_every_mix():
    from models.linear import LinearSurvival

    grid = penalty_grid("auto")
    assert grid.per_mix == {0.0: penalty_grid(0), 0.5: penalty_grid(0.5)}  # type: ignore[attr-defined]
    assert set(grid) == set(penalty_grid(0)) | set(penalty_grid(0.5)) and list(grid) == sorted(grid)
    data = _genes_cohort("sparse", n=150)
    cfg = resolve_config(None, ["model.family=linear"])
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    parties = parties_of(LinearSurvival(0, G, 0), data, idx, cfg, True)
    rec = fit_with_cv(LinearSurvival(0, G, 0), parties, (1.0, 0.1), "auto")  # as pipeline.outputs passes a GRID
    assert [r["penalty"] for r in rec["candidates"]] == [1.0, 0.1] and len(rec["mix_candidates"]) == 2
    own = fit_with_cv(LinearSurvival(0, G, 0), parties, MixGrids({0.0: (1.0,), 0.5: (0.1, 0.03)}), "auto")
    assert [(m["l1_ratio"], m["penalty"]) for m in own["mix_candidates"]][0] == (0.0, 1.0)
    # one candidate per c of the union grid (ascending), each from the only mix that tried it
    assert [(r["penalty"], r["l1_ratio"]) for r in own["candidates"]] == [(0.03, 0.5), (0.1, 0.5), (1.0, 0.0)]


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "lasso", "true", "'0.5x'"])
def test_a_bad_l1_ratio_is_a_clear_config_error(bad):
    from data_specs.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.linear_l1_ratio.*number in \[0, 1\] or 'auto', got"):
        resolve_config(None, [f"train.linear_l1_ratio={bad}"])
    assert resolve_config(None, ["train.linear_l1_ratio=auto"]).train.linear_l1_ratio == "auto"
    assert resolve_config(None, ["train.linear_l1_ratio=0"]).train.linear_l1_ratio == 0.0
    with pytest.raises(ValueError, match=r"train\.linear_l1_ratio .* got 'ridge'"):
        mixes("ridge")
    assert mixes(0.3) == (0.3,) and mixes("auto") == L1_RATIO_GRID


@pytest.mark.slow
def test_the_full_batch_paths_give_the_linear_family_the_configured_slide_projection():
    """What builds the linear family: the factory (``new_model`` -> ``models.factory``) builds it over the D
    standardised slide features, the projection's rank is set by the full-batch fits (centralised and federated),
    and a fitted model's state loads into what the factory builds. The mini-batch path (``train.linear_fit=sgd``,
    the DP / SecAgg+ baselines) computes no projection, so the factory must not build an empty one."""
    from pipeline.federated.linear_sites import train_linear_federated
    from pipeline.training.module import fit_local, new_model
    from tests.test_linear import D
    from tests.test_linear import synthetic as slides_cohort

    data = slides_cohort(n=180)
    cfg = resolve_config(None, ["model.family=linear", "model.linear_slide_pcs=3", "federated.min_count=10"])
    built = new_model(data, cfg)
    assert built.slide_pcs == 0 and built.slide_linear.in_features == D  # no projection until one is fitted
    module, _ = fit_local(data, cfg.with_overrides(["federated.enabled=false"]))
    fed, info = train_linear_federated(data, cfg)
    for fitted in (module.model, fed):
        assert fitted.slide_pcs == 3 and fitted.slide_linear.in_features == 3
    assert info["linear_fit"]["slide_projection"]["r"] == 3
    again = new_model(data, cfg)
    again.load_state_dict(fed.state_dict())
    assert again.slide_pcs == 3
    torch.testing.assert_close(again.coefficients(), fed.coefficients())
    sgd = new_model(data, cfg.with_overrides(["train.linear_fit=sgd"]))
    assert sgd.slide_linear.in_features == D  # the mini-batch path's slide term: every standardised dimension


def test_console_line_names_the_fit_and_its_mix():
    from pipeline.outputs.baseline_report import federated_linear_line, linear_penalty

    fl = {"label": "federated linear Cox (no pooling)", "strategy": "fedsgd", "weight_decay": 0.178, "cindex": 0.7,
          "model_minus_this": {}, "linear_fit": {"l1_ratio": 0.5, "l1_ratio_setting": "auto"}}  # fmt: skip
    assert "elastic net (l1_ratio 0.5), mix chosen by CV, penalty per patient 0.178" in federated_linear_line(fl)
    assert linear_penalty({**fl, "linear_fit": {"l1_ratio": 0.0, "l1_ratio_setting": 0.0}}) == (
        "ridge, penalty per patient"
    )
    assert linear_penalty({**fl, "linear_fit": {}}) == "ridge, penalty per patient"  # records before the elastic net
    assert linear_penalty({k: v for k, v in fl.items() if k != "linear_fit"}) == "weight decay"
    assert "ridge penalty" not in federated_linear_line(fl)
