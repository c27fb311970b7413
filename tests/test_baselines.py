"""Centralised Coxnet baselines and modality contributions on a small synthetic cohort."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from pipeline.outputs import baseline_report
from pipeline.outputs import baselines as bl
from pipeline.outputs.baselines import BaselineSettings, fit_baselines, mask_modality, modality_contributions
from pipeline.training.data import CohortData

FAST = BaselineSettings(n_alphas=20, n_boot=100)


def synthetic(driver: str, n: int = 200, seed: int = 0) -> CohortData:
    """``n`` patients with slides (bags of 4-12 tiles, D=6), 12 genes and 3 clinical covariates.

    The log hazard is ``1.5 * u``: with ``driver="omics"`` ``u`` is gene 0, with ``"slides"`` it shifts
    tile feature 0 of every tile (so the mean-pooled bag carries it). Every other input is noise.
    """
    rng = np.random.default_rng(seed)
    u = rng.normal(size=n)
    bags = []
    for i in range(n):
        b = rng.normal(size=(int(rng.integers(4, 13)), 6)).astype(np.float32)  # (N_i, D)
        if driver == "slides":
            b[:, 0] += 2.0 * u[i]
        bags.append(b)
    omics = rng.normal(size=(n, 12)).astype(np.float32)  # (P, G)
    if driver == "omics":
        omics[:, 0] = u
    clinical = rng.normal(size=(n, 3)).astype(np.float32)  # (P, C)
    time = rng.exponential(np.exp(-1.5 * u)).astype(np.float32)
    event = rng.random(n) < 0.8
    perm = rng.permutation(n)
    splits = {"train": np.sort(perm[:110]), "val": np.sort(perm[110:140]), "test": np.sort(perm[140:])}
    omics_present = np.ones(n, bool)
    omics_present[perm[:5]] = False  # a few training patients without omics: imputed
    return CohortData(
        patient_ids=[f"P{i:03d}" for i in range(n)],
        sites=["a"],
        site=np.zeros(n, int),
        time=time,
        event=event,
        splits=splits,
        bags=bags,
        tiles=[[("s", 0, 0)] * len(b) for b in bags],
        feature_dim=6,
        omics=omics,
        omics_present=omics_present,
        genes=[f"G{j}" for j in range(12)],
        clinical=clinical,
        clinical_present=np.ones(n, bool),
        clinical_columns=["age", "grade", "stage"],
    )


@pytest.mark.parametrize("driver", ["omics", "slides"])
def test_the_matching_modality_wins_the_others_are_chance(driver):
    res = fit_baselines(synthetic(driver), settings=FAST)
    assert res["label"] == "centralised"
    b = res["baselines"]
    assert set(b) == {"slides", "omics", "clinical", "all"}
    assert b[driver]["cindex"] > 0.75, b[driver]
    assert b["all"]["cindex"] > 0.7
    for other in {"slides", "omics", "clinical"} - {driver}:
        assert abs(b[other]["cindex"] - 0.5) < 0.15, (other, b[other]["cindex"])
    if driver == "omics":
        assert next(iter(b["omics"]["top_coef"])) == "G0"
        assert b["omics"]["top_coef"]["G0"] > 0  # higher expression, higher risk
    assert res["best"] in (driver, "all")
    assert res["modality_info"]["slides"]["columns"] == 6  # min(10 PCs, D=6)
    assert res["modality_info"]["omics"]["imputed"] == 5


def test_test_patients_are_never_used_in_fitting(monkeypatch):
    data = synthetic("omics")
    test = data.splits["test"]
    rng = np.random.default_rng(1)
    other = replace(data, time=data.time.copy(), event=data.event.copy(), omics=data.omics.copy())
    p = rng.permutation(len(test))
    other.time[test], other.event[test] = data.time[test][p], data.event[test][p]
    other.omics[test] = rng.normal(size=(len(test), data.omics.shape[1]))
    other.bags = [b if i not in set(test) else b[::-1] * 3 for i, b in enumerate(data.bags)]
    a, b = fit_baselines(data, settings=FAST), fit_baselines(other, settings=FAST)
    for k in a["baselines"]:
        for f in ("alpha", "cv_cindex", "nonzero", "top_coef"):
            assert a["baselines"][k][f] == b["baselines"][k][f], (k, f)

    # the alpha CV (inside fit_coxnet) only ever gets the train + val rows
    seen = []
    real = bl.fit_coxnet
    monkeypatch.setattr(bl, "fit_coxnet", lambda x, t, e, s: seen.append(t.copy()) or real(x, t, e, s))
    marked = replace(data, time=data.time.copy())
    marked.time[test] = 1e6 + np.arange(len(test))  # a value no fitting patient has
    fit_baselines(marked, settings=FAST)
    assert len(seen) == 4
    fit = np.concatenate([data.splits["train"], data.splits["val"]])
    for t in seen:
        assert len(t) == len(fit) and t.max() < 1e6


def test_paired_difference_is_zero_when_the_model_is_the_baseline():
    data = synthetic("omics")
    _, preds = fit_baselines(data, settings=FAST, return_predictions=True)
    res = fit_baselines(data, preds["omics"], settings=FAST)
    d = res["baselines"]["omics"]["model_minus_this"]
    assert d["diff"] == 0 and d["ci"][0] <= 0 <= d["ci"][1]
    assert res["model"]["cindex"] == pytest.approx(res["baselines"]["omics"]["cindex"])
    # a model at chance loses to the gene baseline, and says so
    chance = fit_baselines(data, np.zeros(len(data.splits["test"])), settings=FAST)
    assert chance["model_minus_best"]["verdict"] == "the model loses"
    assert bl.verdict({"diff": -0.1, "ci": [-0.2, 0.05]}).startswith("the model is lower, within noise")
    assert "point estimate" in bl.verdict({"diff": -0.5, "ci": None})


def _omics_only(d: CohortData, idx: np.ndarray) -> np.ndarray:
    """A 'model' that reads gene 0 where omics are present (0 otherwise) and nothing else."""
    return np.where(d.omics_present[idx], d.omics[idx, 0], 0.0)


def test_masking_a_modality_the_model_ignores_changes_nothing():
    data = synthetic("omics")
    before = [b.copy() for b in data.bags]
    mc = modality_contributions(data, _omics_only, FAST)
    for m in ("slides", "clinical"):
        d = mc[f"without_{m}"]["drop"]
        assert d["diff"] == 0 and d["ci"] == [0.0, 0.0]
        assert mc[f"without_{m}"]["cindex"] == mc["full"]["cindex"]
    assert mc["without_omics"]["drop"]["diff"] > 0.2
    assert mc["without_omics"]["drop"]["ci"][0] > 0
    assert all(np.array_equal(a, b) for a, b in zip(before, data.bags, strict=True))  # the copy is masked


def test_mask_modality():
    data = synthetic("slides", n=20)
    assert all(len(b) == 0 and b.shape[1] == 6 for b in mask_modality(data, "slides").bags)
    assert not mask_modality(data, "omics").omics_present.any() and data.omics_present.sum() > 0
    assert not mask_modality(data, "clinical").clinical_present.any()
    with pytest.raises(ValueError, match="modality 'genes'"):
        mask_modality(data, "genes")


def test_report_and_console_render():
    data = synthetic("omics")
    res = fit_baselines(data, np.zeros(len(data.splits["test"])), settings=FAST)
    mc = modality_contributions(data, _omics_only, FAST)
    lines = baseline_report.summary_lines(res, mc)
    assert "the model loses" in lines[0] and "centralised" in lines[0]
    page = "".join(baseline_report.baselines_html({"baselines": res, "modality_contributions": mc}))
    assert "Coxnet omics" in page and "without omics" in page
    assert baseline_report.baselines_html({}) == []


def test_few_training_slides_and_constant_columns_stay_finite():
    data = synthetic("slides", n=40)
    data.splits = {"train": np.arange(6), "val": np.arange(6, 20), "test": np.arange(20, 40)}
    data.clinical[:, 1] = 3.0  # constant: carries nothing, must not blow up
    z, info = bl.modality_block(data, "slides", data.splits["train"], n_pcs=10)
    assert info["columns"] == 5  # 6 centred training slides span 5 directions
    assert np.isfinite(z).all() and np.abs(z).max() < 100
    zc, _ = bl.modality_block(data, "clinical", data.splits["train"])
    assert (zc[:, 1] == 0).all()
    res = fit_baselines(data, settings=FAST)
    assert set(res["baselines"]) == {"slides", "omics", "clinical", "all"}
    assert res["baselines"]["slides"]["nonzero"] > 0


def test_add_to_run_extends_metrics_json(tmp_path):
    data = synthetic("omics")
    (tmp_path / "metrics.json").write_text('{"pooled": {"cindex": 0.7}}')
    lines = bl.add_to_run(tmp_path, data, _omics_only, n_boot=50)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["pooled"] == {"cindex": 0.7}
    assert m["baselines"]["label"] == "centralised" and m["baselines"]["best"] in m["baselines"]["baselines"]
    assert m["modality_contributions"]["without_omics"]["drop"]["diff"] > 0
    assert any("model vs best centralised Coxnet baseline" in s for s in lines)


def _three_sites(data: CohortData) -> CohortData:
    """Three sites, and a validation split large enough that every site sends validation scores."""
    n = len(data.time)
    perm = np.random.default_rng(1).permutation(n)
    splits = {
        "train": np.sort(perm[: n - 120]),
        "val": np.sort(perm[n - 120 : n - 60]),
        "test": np.sort(perm[n - 60 :]),
    }
    return replace(data, sites=["a", "b", "c"], site=np.arange(len(data.time)) % 3, splits=splits)


def _fed_cfg(rounds: int, local_epochs: int = 1, batch_size: int = 32):
    from data_specs import resolve_config

    return resolve_config(None, [f"federated.rounds={rounds}", f"federated.local_epochs={local_epochs}",
                                 f"train.batch_size={batch_size}"])  # fmt: skip


def test_federated_linear_record_console_and_report(tmp_path, monkeypatch):
    from pipeline.outputs import federated_linear

    monkeypatch.setattr(federated_linear, "GRID", (1.0,))  # one candidate keeps it fast
    data = _three_sites(synthetic("omics"))
    fl = federated_linear.fit_federated_linear(data, _fed_cfg(2), np.zeros(60), FAST, tmp_path / "fl")
    assert fl["label"] == "federated linear Cox (no pooling)" and fl["strategy"].startswith("fedsgd (full-batch")
    assert fl["modalities"] == ["slides", "omics", "clinical"] and fl["weight_decay"] == 1.0
    assert np.isfinite(fl["val_cindex"]) and fl["n"] == 60 and "diff" in fl["model_minus_this"]
    assert (tmp_path / "fl" / "privacy_ledger.jsonl").is_file()  # its own ledger
    fl["model_minus_this"]["verdict"] = bl.verdict(fl["model_minus_this"])
    lines = baseline_report.summary_lines({"baselines": {}, "federated_linear": fl})
    assert lines[-1].startswith("model vs federated linear Cox (no pooling), fedsgd (full-batch")
    page = "".join(baseline_report.baselines_html({"baselines": {"baselines": {}, "federated_linear": fl}}))
    assert "federated linear Cox (no pooling), fedsgd" in page and "without pooling" in page


def test_federated_linear_without_validation_patients_still_chooses_by_federated_cv(monkeypatch):
    from pipeline.outputs import federated_linear

    # elastic-net penalties (the default train.linear_l1_ratio 0.5): 0.3 near the null model, 0.01 nearly unpenalised
    monkeypatch.setattr(federated_linear, "GRID", (0.3, 0.1, 0.01))
    data = _three_sites(synthetic("omics"))
    data.splits = {**data.splits, "val": np.zeros(0, int)}
    fl = federated_linear.fit_federated_linear(data, _fed_cfg(2), settings=FAST)
    assert len(fl["candidates"]) == 3 and "cross-validated" in fl["choice"]
    best = max(fl["candidates"], key=lambda c: c["cv_loglik"])
    assert fl["weight_decay"] == best["weight_decay"]  # the higher summed CV partial likelihood wins
    assert fl["cindex"] > 0.75  # gene 0 drives the hazard; noise inputs alone give ~0.5


def test_federated_linear_sgd_fit_keeps_the_flower_path_and_its_default_penalty(monkeypatch):
    from pipeline.outputs import federated_linear

    monkeypatch.setattr(federated_linear, "PENALTIES", (1.0, 10.0))
    data = _three_sites(synthetic("omics"))
    data.splits = {**data.splits, "val": np.zeros(0, int)}
    cfg = _fed_cfg(2).with_overrides(["train.linear_fit=sgd"])
    fl = federated_linear.fit_federated_linear(data, cfg, settings=FAST)
    assert len(fl["candidates"]) == 1 and fl["weight_decay"] == 1.0 and "a priori" in fl["choice"]


def test_federated_linear_choice_never_sees_test_outcomes(monkeypatch):
    from pipeline.outputs import federated_linear

    monkeypatch.setattr(federated_linear, "GRID", (1.0, 0.01))
    data = _three_sites(synthetic("omics"))
    a = federated_linear.fit_federated_linear(data, _fed_cfg(2), settings=FAST)
    te = data.splits["test"]
    shuffled = replace(data, time=data.time.copy(), event=data.event.copy())
    shuffled.time[te], shuffled.event[te] = shuffled.time[te][::-1], ~shuffled.event[te]
    b = federated_linear.fit_federated_linear(shuffled, _fed_cfg(2), settings=FAST)
    assert len(a["candidates"]) == 2 and a["candidates"] == b["candidates"] and a["weight_decay"] == b["weight_decay"]
    assert a["cindex"] != b["cindex"]  # the test outcomes only enter the score


@pytest.mark.slow
def test_federated_run_gets_a_federated_linear_baseline_that_finds_the_signal(tmp_path):
    from pipeline.training.linear_fit import penalty_grid

    data = _three_sites(synthetic("omics", n=300))  # 60 training patients per site
    (tmp_path / "metrics.json").write_text('{"pooled": {"cindex": 0.7}}')
    lines = bl.add_to_run(tmp_path, data, _omics_only, n_boot=50, cfg=_fed_cfg(10, 2, 16))
    fl = json.loads((tmp_path / "metrics.json").read_text())["baselines"]["federated_linear"]
    best = max(fl["candidates"], key=lambda c: c["cv_loglik"])
    grid = penalty_grid(_fed_cfg(10).train.linear_l1_ratio)  # the a-priori grid of the default penalty
    assert len(fl["candidates"]) == len(grid) and fl["weight_decay"] == best["weight_decay"]
    assert fl["cindex"] > 0.75  # gene 0 drives the hazard; noise inputs alone give ~0.5
    assert any(s.startswith("model vs federated linear Cox (no pooling)") for s in lines)


def test_centralised_run_trains_no_federated_baseline(tmp_path):
    from data_specs import resolve_config

    (tmp_path / "metrics.json").write_text('{"pooled": {"cindex": 0.7}}')
    cfg = resolve_config(None, ["federated.enabled=false"])
    bl.add_to_run(tmp_path, synthetic("omics"), _omics_only, n_boot=20, cfg=cfg)
    assert "federated_linear" not in json.loads((tmp_path / "metrics.json").read_text())["baselines"]


@pytest.mark.slow
def test_federated_linear_under_dp_adds_up_the_candidates_epsilon(monkeypatch):
    from data_specs import resolve_config
    from pipeline.outputs import federated_linear

    monkeypatch.setattr(federated_linear, "PENALTIES", (1.0, 0.01))
    ov = ["federated.rounds=2", "federated.local_epochs=1", "federated.dp_noise=0.5", "federated.dp_clip=0.5"]
    fl = federated_linear.fit_federated_linear(
        _three_sites(synthetic("omics")), resolve_config(None, ov), settings=FAST
    )
    eps = [c["epsilon"] for c in fl["candidates"]]
    # under DP the sites send no validation C-index (not covered by the accountant), so nothing can be chosen on
    # it: the first candidate is kept and no other is trained (no further epsilon spent)
    assert len(eps) == 1 and eps[0] > 0 and fl["weight_decay"] == 1.0 and np.isnan(fl["val_cindex"])
    assert fl["epsilon_total"] == pytest.approx(sum(eps)) and "add up" in fl["privacy_note"]
