"""Splits do what the user says: given split cells kept, blanks assigned, test-only sites, leave-site-out folds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_specs import load_cohort
from pipeline.training.splits import assign_splits, check_test_sites, fold_splits, site_folds, split_counts


def _cohort(tmp_path, n: int = 90, sites=("A", "B", "C"), split=None, seed: int = 0):
    """A clinical-only cohort with a learnable hazard; ``split(i, site) -> str`` fills the split column."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    t_event = rng.exponential(1.0 / (0.01 * np.exp(1.2 * x[:, 0] - 0.8 * x[:, 1])))
    t_cens = rng.uniform(20, 400, n)
    pids = [f"P{i:03d}" for i in range(n)]
    site = [sites[i % len(sites)] for i in range(n)]
    pt = pd.DataFrame(
        {
            "patient_id": pids,
            "site": site,
            "time": np.minimum(t_event, t_cens).round(2) + 0.01,
            "event": (t_event <= t_cens).astype(int),
        }
    )
    if split is not None:
        pt["split"] = [split(i, s) for i, s in enumerate(site)]
    pt.to_csv(tmp_path / "patients.csv", index=False)
    pd.DataFrame({"patient_id": pids, "x1": x[:, 0], "x2": x[:, 1], "noise": x[:, 2]}).to_csv(
        tmp_path / "clinical.csv", index=False
    )
    (tmp_path / "cohort.yaml").write_text("name: s\npatients: patients.csv\nclinical: {path: clinical.csv}\n")
    return tmp_path / "cohort.yaml"


def _site(c, idx) -> set[str]:
    return {c.patients[i].site for i in idx}


def test_partial_split_column_keeps_the_given_test_site_and_assigns_blanks_to_train_val(tmp_path):
    c = load_cohort(_cohort(tmp_path, split=lambda i, s: "test" if s == "C" else ""))
    sp = assign_splits(c, 0.2, 0.25, seed=0)
    assert _site(c, sp["test"]) == {"C"} and len(sp["test"]) == 30  # the held-out site, all of it, nothing else
    assert _site(c, sp["train"]) == _site(c, sp["val"]) == {"A", "B"}
    assert len(sp["train"]) + len(sp["val"]) == 60 and 10 <= len(sp["val"]) <= 14  # val ~ 0.2 of the blanks
    allidx = np.concatenate(list(sp.values()))
    assert sorted(allidx.tolist()) == list(range(90))


def test_partial_split_without_test_cells_assigns_blanks_to_all_three_and_keeps_given(tmp_path):
    c = load_cohort(_cohort(tmp_path, split=lambda i, s: "train" if i < 10 else "val" if i < 14 else ""))
    sp = assign_splits(c, 0.2, 0.25, seed=0)
    assert set(range(10)) <= set(sp["train"].tolist()) and set(range(10, 14)) <= set(sp["val"].tolist())
    blanks_test = len(sp["test"])
    assert 17 <= blanks_test <= 22  # ~ 0.25 of the 76 blanks (rounded per stratum)
    assert not set(sp["test"].tolist()) & set(range(14))


def test_blank_column_splits_as_before_and_given_cells_are_deterministic(tmp_path):
    c = load_cohort(_cohort(tmp_path))
    a, b = assign_splits(c, 0.2, 0.25, 3), assign_splits(c, 0.2, 0.25, 3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any((assign_splits(c, 0.2, 0.25, 4)[k] != a[k]).any() for k in a if len(a[k]))
    counts = split_counts(c, a)
    assert all(7 <= v["test"] <= 8 for v in counts.values())  # stratified: every site gets its quarter


def test_test_sites_are_test_only_and_bad_names_are_refused(tmp_path):
    c = load_cohort(_cohort(tmp_path))
    sp = assign_splits(c, 0.2, 0.25, 0, test_sites=["B"])
    assert _site(c, sp["test"]) == {"B"} and len(sp["test"]) == 30
    assert "B" not in _site(c, np.concatenate([sp["train"], sp["val"]]))
    with pytest.raises(ValueError, match=r"unknown site\(s\) Z; the cohort's sites are A, B, C"):
        check_test_sites(c, ["B", "Z"])
    with pytest.raises(ValueError, match="no site is left to train on"):
        assign_splits(c, 0.2, 0.25, 0, test_sites=["A", "B", "C"])


def test_a_test_site_patient_marked_train_is_an_error_naming_it(tmp_path):
    c = load_cohort(_cohort(tmp_path, split=lambda i, s: "train" if i == 1 else ""))  # P001 is at site B
    with pytest.raises(ValueError, match="patient P001: split column says 'train' but site B is in train.test_sites"):
        assign_splits(c, 0.2, 0.25, 0, test_sites=["B"])


def _same_state(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=lambda v: np.asarray(v).round(9).tolist()) == json.dumps(
        b, sort_keys=True, default=lambda v: np.asarray(v).round(9).tolist()
    )


def test_test_site_is_not_in_the_normaliser_statistics(tmp_path):
    """Changing every clinical value of the test-only site changes nothing the model is fitted with."""
    from pipeline.training.data import build_data

    spec = _cohort(tmp_path)
    a = build_data(load_cohort(spec), None, test_sites=["C"])
    clin = pd.read_csv(tmp_path / "clinical.csv")
    site = pd.read_csv(tmp_path / "patients.csv").site
    clin.loc[site == "C", ["x1", "x2", "noise"]] += 100.0
    clin.to_csv(tmp_path / "clinical.csv", index=False)
    b = build_data(load_cohort(spec), None, test_sites=["C"])
    assert _same_state(a.clinical_norm.state(), b.clinical_norm.state())
    tr = a.splits["train"]
    np.testing.assert_allclose(a.clinical[tr], b.clinical[tr])
    c_only = build_data(load_cohort(spec), None)  # without test_sites, site C trains and moves the statistics
    assert not _same_state(c_only.clinical_norm.state(), b.clinical_norm.state())


def test_test_site_is_not_a_federated_site(tmp_path):
    from data_specs import resolve_config
    from pipeline.federated.site import site_clients
    from pipeline.training.data import load_run_data

    cfg = resolve_config(None, ['train.test_sites=["A"]'], out=tmp_path / "o")
    data = load_run_data(load_cohort(_cohort(tmp_path)), cfg)
    assert [cl.site for cl in site_clients(data, cfg)] == ["B", "C"]


def test_site_folds_leave_one_site_out(tmp_path):
    c = load_cohort(_cohort(tmp_path, n=60))
    folds = site_folds(c)
    for f, s in enumerate(c.sites):
        sp = fold_splits(c, folds, f, 0.2, seed=0)
        assert _site(c, sp["test"]) == {s} and s not in _site(c, np.concatenate([sp["train"], sp["val"]]))
    one = load_cohort(_cohort(tmp_path / ".." / tmp_path.name, n=10, sites=("A",)))
    with pytest.raises(ValueError, match="at least 2 sites"):
        site_folds(one)


def test_validate_prints_the_final_split_per_site(tmp_path, capsys):
    from pipeline.cli import main

    spec = _cohort(tmp_path, split=lambda i, s: "test" if s == "C" else "")
    assert main(["validate", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "split column: blank: 60, test: 30 (given cells kept; blanks assigned to train/val by site and event)" in out
    assert "  site C: train 0, val 0, test 30" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("  site A: train")]
    assert len(lines) == 1 and "test 0" in lines[0]
    assert main(["validate", str(spec), "--test-sites", "B"]) == 0
    assert "  site B: train 0, val 0, test 30 (test-only site" in capsys.readouterr().out


def test_cli_unknown_test_site_is_one_named_error(tmp_path, capsys):
    from pipeline.cli import main

    spec = _cohort(tmp_path)
    assert main(["train", str(spec), "--centralised", "--test-sites", "A,Nowhere", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown site(s) Nowhere; the cohort's sites are A, B, C" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_train_with_test_sites_leaves_them_out_of_the_federation(tmp_path):
    from pipeline.cli import main

    spec = _cohort(tmp_path)
    args = ["train", str(spec), "--test-sites", "C", "--out", str(tmp_path / "o"), "--set", "federated.rounds=2",
            "--set", "federated.local_epochs=1"]  # fmt: skip
    assert main(args) == 0
    info = json.loads((tmp_path / "o" / "train_summary.json").read_text())
    assert info["mode"] == "federated" and info["sites"] == ["A", "B"]
    # the model's own cohort gets back its split, test sites included, so predict/attribute score them as test
    from pipeline.training.bundle import cohort_splits, read_card

    cohort = load_cohort(spec)
    back = cohort_splits(cohort, read_card(tmp_path / "o" / "model.safetensors"))
    assert len(back["predict"]) == 0
    assert _site(cohort, back["test"]) >= {"C"} and "C" not in _site(cohort, back["train"]) | _site(cohort, back["val"])
