"""Survival curves and metrics against scikit-survival / lifelines, and the degenerate-case policy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stats.curves import BreslowBaseline, combine, event_grid, site_summary, survival_from_hazards
from pipeline.stats.metrics import Curves, harrell_cindex, survival_metrics, survival_y


def _cohort(n=240, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    lh = rng.normal(size=n)
    t = rng.exponential(np.exp(-lh) * 10)
    t = np.ceil(t) if ties else t  # integer days: many tied times
    c = rng.exponential(15, n)
    event = t <= c
    time = np.minimum(t, np.ceil(c) if ties else c)
    site = rng.integers(0, 3, n)
    return time.astype(float), event, lh, site


def test_breslow_from_site_summaries_equals_sksurv_pooled():
    from sksurv.linear_model.coxph import BreslowEstimator

    time, event, lh, site = _cohort()
    base = BreslowBaseline.fit(time, event, lh, site, ["a", "b", "c"])
    ref = BreslowEstimator().fit(lh, event, time)
    q = np.linspace(time.min(), time.max() - 1e-6, 97)
    np.testing.assert_allclose(base.cumhaz_at(q), ref.cum_baseline_hazard_(q), rtol=1e-10, atol=1e-12)
    s_ref = np.stack([f(q) for f in ref.get_survival_function(lh[:5])])
    np.testing.assert_allclose(base.survival(lh[:5], q), s_ref, rtol=1e-10)
    # the server sees only per-site vectors on the grid; adding them is the pooled computation
    grid = event_grid(time, event)
    parts = [site_summary(grid, time[site == k], event[site == k], lh[site == k]) for k in range(3)]
    pooled = site_summary(grid, time, event, lh)
    np.testing.assert_allclose(combine(parts), combine([pooled]))
    np.testing.assert_allclose(sum(p.events for p in parts), pooled.events)
    # state round trip; a site the model never saw gets the pooled baseline
    b2 = BreslowBaseline.from_state(json.loads(json.dumps(base.state())))
    np.testing.assert_allclose(b2.survival(lh[:3], q, ["a", "b", "elsewhere"])[2], base.survival(lh[2:3], q)[0])


def test_breslow_coarse_grid_is_site_additive_and_monotone():
    time, event, lh, site = _cohort(seed=1, ties=False)
    grid = np.linspace(1, np.quantile(time, 0.9), 12)  # agreed in advance: reveals no event time
    base = BreslowBaseline.fit(time, event, lh, site, ["a", "b", "c"], grid=grid)
    assert np.all(np.diff(base.cumhaz) >= 0) and base.cumhaz[0] >= 0
    parts = [site_summary(grid, time[site == k], event[site == k], lh[site == k]) for k in range(3)]
    np.testing.assert_allclose(base.cumhaz, combine(parts))
    assert set(base.cumhaz_by_site) == {"a", "b", "c"}
    few = BreslowBaseline.fit(time, event, lh, site, ["a", "b", "c"], grid=grid, min_site_events=1000)
    assert few.cumhaz_by_site == {}  # too few events per site: every patient gets the pooled baseline
    np.testing.assert_allclose(few.survival(lh[:2], grid, ["a", "b"]), few.survival(lh[:2], grid))


def test_breslow_policy_no_events_and_bad_grid():
    with pytest.raises(ValueError, match="no events"):
        BreslowBaseline.fit(np.ones(4), np.zeros(4, bool), np.zeros(4), np.zeros(4, int), ["a"])
    with pytest.raises(ValueError, match="strictly increasing"):
        site_summary(np.array([2.0, 1.0]), np.ones(3), np.ones(3, bool), np.zeros(3))


def test_survival_from_hazards_is_cumprod():
    h = np.array([[0.1, 0.2, 0.5], [0.0, 0.0, 1.0]])
    edges = np.array([0.0, 10, 20, 30])
    s = survival_from_hazards(h, edges, [5, 10, 15, 25, 30, 99])
    np.testing.assert_allclose(s[0], [1, 0.9, 0.9, 0.72, 0.36, 0.36])
    np.testing.assert_allclose(s[1], [1, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="K\\+1 edges"):
        survival_from_hazards(h, edges[:3], [1])


def test_metrics_equal_sksurv_and_lifelines():
    from lifelines.utils import concordance_index
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )

    time, event, lh, site = _cohort(seed=2)
    tr = np.arange(len(time)) < 160
    te = ~tr
    base = BreslowBaseline.fit(time[tr], event[tr], lh[tr], site[tr], ["a", "b", "c"])
    grid = base.grid
    curves = Curves(grid, base.survival(lh[te], grid))
    hz = [float(np.quantile(time[te & event], q)) for q in (0.25, 0.5)]
    m = survival_metrics(
        time[te], event[te], lh[te], site[te], ["a", "b", "c"], curves=curves,
        train=(time[tr], event[tr]), horizons=hz, n_boot=0,
    )  # fmt: skip
    p = m["pooled"]
    assert p["cindex"] == pytest.approx(concordance_index_censored(event[te], time[te], lh[te])[0])
    assert p["cindex"] == pytest.approx(concordance_index(time[te], -lh[te], event[te]), abs=1e-9)
    ytr, yte = survival_y(event[tr], time[tr]), survival_y(event[te], time[te])
    assert p["uno_cindex"] == pytest.approx(concordance_index_ipcw(ytr, yte, lh[te], tau=m["uno_tau"])[0])
    auc, _ = cumulative_dynamic_auc(ytr, yte, lh[te], hz)
    np.testing.assert_allclose(list(p["td_auc"].values()), auc)
    times = np.linspace(*p["ibs_range"], 50)
    ref_ibs = integrated_brier_score(ytr, yte, base.survival(lh[te], times), times)
    assert p["ibs"] == pytest.approx(ref_ibs, rel=1e-9)
    assert 0 < p["ibs"] < 0.25 and p["notes"] == {}
    assert set(m["per_site"]) == {"a", "b", "c"}


def test_bootstrap_is_seeded_and_brackets_estimate():
    time, event, lh, _ = _cohort(n=120, seed=3)
    one_site = np.zeros(len(time), int)
    kw = {"horizons": [5.0], "n_boot": 40, "seed": 7}
    a = survival_metrics(time, event, lh, one_site, ["a"], **kw)
    b = survival_metrics(time, event, lh, one_site, ["a"], **kw)
    assert a["pooled"]["cindex_ci"] == b["pooled"]["cindex_ci"]
    lo, hi = a["pooled"]["cindex_ci"]
    assert lo < a["pooled"]["cindex"] < hi and hi - lo < 0.3
    c = survival_metrics(time, event, lh, one_site, ["a"], **{**kw, "seed": 8})
    assert c["pooled"]["cindex_ci"] != a["pooled"]["cindex_ci"]


def test_degenerate_sets_give_nan_with_reasons():
    time, event, lh, site = _cohort(n=90, seed=4)
    event = event.copy()
    event[site == 1] = False  # one site without events
    site[:1] = 2
    group = np.where(lh > 0, "high", "low")
    m = survival_metrics(time, event, lh, site, ["a", "b", "c", "d"], group=group, horizons=[1e6, 3.0], n_boot=20)
    b = m["per_site"]["b"]
    for k in ("cindex", "uno_cindex", "mean_td_auc", "ibs", "logrank_p"):
        assert np.isnan(b[k]), k
    assert "no events" in b["notes"]["cindex"] and "no events" in b["notes"]["logrank_p"]
    assert "d" not in m["per_site"]  # a site with no patient in this set is absent, not an error
    # a horizon beyond follow-up: NaN for that horizon only, with the reason
    p = m["pooled"]
    assert np.isnan(p["td_auc"]["1e+06"]) and np.isfinite(p["td_auc"]["3"])
    assert "still at risk" in p["notes"]["td_auc"]
    # all censored, and a single patient
    z = survival_metrics(time, np.zeros_like(event), lh, site, ["a", "b", "c"], n_boot=5)
    assert np.isnan(z["pooled"]["cindex"]) and "all censored" in z["pooled"]["notes"]["cindex"]
    one = survival_metrics(time[:1], event[:1], lh[:1], site[:1], ["a", "b", "c"], n_boot=5)
    assert "fewer than 2" in one["pooled"]["notes"]["cindex"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 100), st.booleans(), st.floats(-5, 5)), min_size=2, max_size=30))
def test_harrell_in_unit_interval_or_nan(rows):
    t, e, r = (np.array(x) for x in zip(*rows, strict=True))
    c = harrell_cindex(t, e, r)
    assert np.isnan(c) or 0.0 <= c <= 1.0


def test_stage_evaluate_writes_json_and_plots(tmp_path):
    from pipeline.outputs.evaluate import stage_evaluate
    from pipeline.outputs.predictions import curves_table

    time, event, lh, site = _cohort(n=150, seed=5)
    split = np.where(np.arange(150) < 90, "train", "test")
    tr = split == "train"
    base = BreslowBaseline.fit(time[tr], event[tr], lh[tr], site[tr], ["a", "b", "c"])
    ids = [f"P{i:03d}" for i in range(150)]
    sites = np.array(["a", "b", "c"])[site]
    df = pd.DataFrame(
        {"patient_id": ids, "site": sites, "split": split, "log_hz": lh,
         "risk_group": np.where(lh > np.median(lh[tr]), "high", "low"), "time": time, "event": event.astype(int)}
    )  # fmt: skip
    df.loc[sites == "c", "event"] = 0  # site c: all censored
    df.to_csv(tmp_path / "risk_scores.csv", index=False)
    curves_table(ids, (base.grid, base.survival(lh, base.grid))).to_csv(tmp_path / "survival_curves.csv", index=False)
    m = stage_evaluate(tmp_path / "risk_scores.csv", tmp_path, "test", ["evaluate.bootstrap=20"])
    for f in ("metrics.json", "km_test.png", "km_test_sites.png", "td_auc_test.png"):
        assert (tmp_path / f).is_file(), f
    j = json.loads((tmp_path / "metrics.json").read_text())  # standard JSON: NaN written as null
    assert j["per_site"]["c"]["cindex"] is None and "all censored" in j["per_site"]["c"]["notes"]["cindex"]
    assert 0 <= j["pooled"]["ibs"] <= 1 and len(j["pooled"]["ibs_ci"]) == 2
    assert m["censoring_from"].startswith("training patients") and j["pooled"]["logrank_p"] is not None
    with pytest.raises(ValueError, match="no patients in split 'val'"):
        stage_evaluate(tmp_path / "risk_scores.csv", tmp_path, "val")


def test_risk_groups_tertiles():
    from pipeline.outputs.predictions import risk_groups

    cut = {"median": 0.0, "tertiles": [-1.0, 1.0]}
    g = risk_groups(np.array([-2.0, 0.0, 2.0]), cut, "tertiles")
    assert g.tolist() == ["low", "intermediate", "high"]
    assert risk_groups(np.array([-1.0, 1.0]), cut, "median").tolist() == ["low", "high"]
    with pytest.raises(ValueError, match="valid names"):
        risk_groups(np.zeros(1), cut, "quartiles")


@pytest.mark.parametrize(
    ("unit", "max_follow_up", "expected"),
    [("days", 6 * 365.0, [365.0, 1095.0, 1825.0]), ("days", 2 * 365.0, [365.0]), ("months", 72.0, [12.0, 36.0, 60.0]),
     ("years", 5.0, [1.0, 3.0, 5.0])],
)  # fmt: skip
def test_default_horizons_are_round_years_in_the_time_unit(unit, max_follow_up, expected):
    from pipeline.stats.curves import coarse_grid, default_horizons, grid_with

    rng = np.random.default_rng(0)
    time = np.append(rng.uniform(0.01, 0.99, 99) * max_follow_up, max_follow_up)
    event = rng.random(100) < 0.6
    hz = default_horizons(time, event, time_unit=unit)
    assert hz == expected
    grid = grid_with(coarse_grid(time.max()), hz)  # the baseline grid holds each horizon exactly
    assert len(grid) == 40 and np.all(np.diff(grid) > 0) and set(hz) <= set(grid.tolist())


def test_default_horizons_fall_back_to_round_quantiles():
    from pipeline.stats.curves import default_horizons

    time, event = np.array([10.0, 123.4, 200.0, 310.7, 350.0]), np.array([1, 1, 1, 1, 0], bool)
    assert default_horizons(time, event, time_unit="days") == [95.0, 160.0, 230.0]  # follow-up < 1 year
    assert default_horizons(time, event, time_unit="weeks") == default_horizons(time, event)  # unknown unit
