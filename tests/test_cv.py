"""Cross-validation: stratified, seeded folds; the `histofuse cv` command end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_specs import load_cohort
from pipeline.training.splits import assign_folds, fold_splits


def _cohort(tmp_path, n: int = 90, sites=("A", "B", "C")):
    """A clinical-only cohort whose hazard follows two covariates (so a model can learn something)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    t_event = rng.exponential(1.0 / (0.01 * np.exp(1.2 * x[:, 0] - 0.8 * x[:, 1])))
    t_cens = rng.uniform(20, 400, n)
    pids = [f"P{i:03d}" for i in range(n)]
    pd.DataFrame(
        {
            "patient_id": pids,
            "site": [sites[i % len(sites)] for i in range(n)],
            "time": np.minimum(t_event, t_cens).round(2) + 0.01,
            "event": (t_event <= t_cens).astype(int),
        }
    ).to_csv(tmp_path / "patients.csv", index=False)
    pd.DataFrame({"patient_id": pids, "x1": x[:, 0], "x2": x[:, 1], "noise": x[:, 2]}).to_csv(
        tmp_path / "clinical.csv", index=False
    )
    (tmp_path / "cohort.yaml").write_text("name: cv\npatients: patients.csv\nclinical: {path: clinical.csv}\n")
    return tmp_path / "cohort.yaml"


def test_folds_stratified_balanced_and_seeded(tmp_path):
    c = load_cohort(_cohort(tmp_path, n=97))
    f = assign_folds(c, 5, seed=3)
    assert f.shape == (97,) and set(f.tolist()) == set(range(5))
    sizes = np.bincount(f)
    assert sizes.max() - sizes.min() <= 1
    site = np.array([p.site for p in c.patients])
    event = np.array([p.event for p in c.patients])
    for s in ("A", "B", "C"):
        for e in (False, True):
            per_fold = np.bincount(f[(site == s) & (event == e)], minlength=5)
            assert per_fold.max() - per_fold.min() <= 1, (s, e, per_fold)
    np.testing.assert_array_equal(f, assign_folds(c, 5, seed=3))
    assert (f != assign_folds(c, 5, seed=4)).any()


def test_fold_splits_partition_the_cohort(tmp_path):
    c = load_cohort(_cohort(tmp_path))
    folds = assign_folds(c, 4, seed=0)
    seen = np.zeros(len(c.patients), int)
    for k in range(4):
        s = fold_splits(c, folds, k, 0.2, seed=0)
        np.testing.assert_array_equal(s["test"], np.flatnonzero(folds == k))
        allidx = np.concatenate([s["train"], s["val"], s["test"]])
        assert len(allidx) == len(set(allidx.tolist())) == len(c.patients)
        assert 0.15 < len(s["val"]) / (len(s["train"]) + len(s["val"])) < 0.25
        seen[s["test"]] += 1
    assert (seen == 1).all()  # every patient tested exactly once


def test_bad_fold_counts(tmp_path):
    c = load_cohort(_cohort(tmp_path, n=6))
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(c, 1, 0)
    with pytest.raises(ValueError, match="folds=7 is more than the cohort's 6 patients"):
        assign_folds(c, 7, 0)


def _cv_args(spec):
    return ["cv", str(spec), "--folds", "3", "--set", "train.epochs=6", "--set", "train.batch_size=16"]


def test_cv_command_end_to_end(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.stats.metrics import harrell_cindex

    spec = _cohort(tmp_path)
    assert main([*_cv_args(spec), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "3-fold centralised cross-validation, seed 0:" in out and "), over folds" in out
    res = json.loads((tmp_path / "a" / "cv_results.json").read_text())
    assert [r["fold"] for r in res["folds"]] == [0, 1, 2] and res["mode"] == "centralised"
    oof = pd.read_csv(tmp_path / "a" / "cv_risk_scores.csv")
    assert oof.log_hz.notna().all() and len(oof) == 90
    for r in res["folds"]:
        d = oof[oof.fold == r["fold"]]
        assert r["n_test"] == len(d)
        c = harrell_cindex(d.time.to_numpy(), d.event.to_numpy(), d.log_hz.to_numpy())
        assert r["cindex"] == pytest.approx(c, abs=1e-4)
        assert (tmp_path / "a" / f"fold_{r['fold']}" / "model.safetensors").is_file()
    cs = [r["cindex"] for r in res["folds"]]
    assert res["cindex_mean"] == pytest.approx(np.mean(cs)) and res["cindex_sd"] == pytest.approx(np.std(cs, ddof=1))
    assert res["cindex_mean"] > 0.65  # the planted covariates are learnable


@pytest.mark.slow
def test_cv_is_deterministic(tmp_path):
    from pipeline.cli import main

    spec = _cohort(tmp_path)
    runs = []
    for name in ("a", "b"):
        assert main([*_cv_args(spec), "--out", str(tmp_path / name)]) == 0
        runs.append(json.loads((tmp_path / name / "cv_results.json").read_text())["folds"])
    assert [r["cindex"] for r in runs[0]] == [r["cindex"] for r in runs[1]]  # same seed: same folds, same models
    ra = pd.read_csv(tmp_path / "a" / "cv_risk_scores.csv")
    rb = pd.read_csv(tmp_path / "b" / "cv_risk_scores.csv")
    pd.testing.assert_frame_equal(ra, rb)


def _cohort_with_features(tmp_path, n: int = 24, dim: int = 6):
    """The clinical cohort plus one slide per patient (two for P000), with synthetic features files written
    where ``cv`` looks for them: (cohort, run config, {features file: its tiles' first feature})."""
    from data_specs import resolve_config
    from pipeline.slides.features import features_dir, features_writer

    spec = _cohort(tmp_path, n=n)
    pt = pd.read_csv(tmp_path / "patients.csv")
    pt["slides"] = [f"slides/{p}.tif" + (f";slides/{p}b.tif" if i == 0 else "") for i, p in enumerate(pt.patient_id)]
    pt.to_csv(tmp_path / "patients.csv", index=False)
    (tmp_path / "slides").mkdir()
    for sid in [*pt.patient_id, "P000b"]:
        (tmp_path / "slides" / f"{sid}.tif").touch()  # never opened: the features are already extracted
    (tmp_path / "cohort.yaml").write_text(
        "name: cv\npatients: patients.csv\nslide_mpp: 0.5\nclinical: {path: clinical.csv}\n"
    )
    # federated.min_count=2: the synthetic sites have 4-5 training patients (default k is 10)
    cfg = resolve_config(None, ["train.epochs=1", "train.batch_size=8", "federated.min_count=2"], out=tmp_path / "run")
    fdir = features_dir(cfg.out, cfg.extract)
    fdir.mkdir(parents=True)
    attrs = {"encoder": "synthetic", "weights": "none", "dim": dim, "tile_px": 224, "target_mpp": 0.5}
    rng = np.random.default_rng(1)
    for sid in [*pt.patient_id, "P000b"]:
        with features_writer(fdir / f"{sid}.h5", dim, attrs) as w:
            k = int(rng.integers(2, 6))
            w.append(rng.normal(size=(k, dim)).astype(np.float32), np.arange(2 * k).reshape(k, 2))
            w.finish(0)
    return load_cohort(spec), cfg, fdir


def test_cv_reads_each_features_file_once(tmp_path, monkeypatch):
    """K folds share one read of the features: each ``.h5`` is opened once, not once per fold."""
    import pipeline.training.data as data_mod
    from pipeline.crossval import CVPlan, run_cv

    cohort, cfg, fdir = _cohort_with_features(tmp_path)
    reads: dict[str, int] = {}
    real = data_mod.load_features

    def counting(path, *a, **kw):
        reads[path.name] = reads.get(path.name, 0) + 1
        return real(path, *a, **kw)

    monkeypatch.setattr(data_mod, "load_features", counting)
    res = run_cv(cohort, cfg, CVPlan(k=3, baselines=False)).runs[0]
    assert [r["fold"] for r in res["folds"]] == [0, 1, 2]
    assert reads == {p.name: 1 for p in fdir.glob("*.h5")} and len(reads) == 25


def test_build_data_with_loaded_bags_equals_reading_them(tmp_path):
    import dataclasses

    from pipeline.training.data import build_data, load_bags

    cohort, _, fdir = _cohort_with_features(tmp_path)
    bags = load_bags(cohort, fdir)
    assert bags.dim == 6 and len(bags.features) == len(cohort.patients) == len(bags.tiles)
    assert len(bags.features[0]) == len(bags.tiles[0]) and {t[0] for t in bags.tiles[0]} == {"P000", "P000b"}
    a, b = build_data(cohort, fdir, seed=0), build_data(cohort, None, seed=0, bags=bags)
    assert a.feature_attrs == b.feature_attrs and a.tiles == b.tiles and a.feature_dim == b.feature_dim == 6
    for x, y in zip(a.bags, b.bags, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.clinical, b.clinical)
    with pytest.raises(ValueError, match="bags: 24 patients given for a cohort of 23"):
        sub = dataclasses.replace(cohort, patients=cohort.patients[:-1])
        build_data(sub, None, bags=bags)


def test_leave_site_out_cv_prints_each_held_out_site_with_seed_spread_and_baselines(tmp_path, capsys):
    """`cv --leave-site-out --seeds 2`: one fold per site, that site only in the test set; per-site C-index with
    its seed spread, and the model beside the best centralised Coxnet baseline per fold."""
    from pipeline.cli import main

    spec = _cohort(tmp_path, n=60)
    argv = ["cv", str(spec), "--leave-site-out", "--seeds", "2", "--out", str(tmp_path / "o"), "--set",
            "train.epochs=3", "--set", "train.batch_size=16", "--set", "evaluate.bootstrap=20"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "o" / "cv_summary.json").read_text())
    assert summary["folds_by"] == "site" and summary["k"] == 3 and summary["seeds"] == [0, 1]
    assert [p["site"] for p in summary["per_fold"]] == ["A", "B", "C"]
    for s in (0, 1):
        res = json.loads((tmp_path / "o" / f"seed-{s}" / "cv_results.json").read_text())
        assert res["seed"] == s and res["folds_by"] == "site"
        folds = pd.read_csv(tmp_path / "o" / f"seed-{s}" / "folds.csv")
        for r in res["folds"]:
            assert r["per_site"].keys() == {r["site"]} and r["n_test"] == 20  # the held-out site, all of it
            assert (folds[folds.site == r["site"]].fold == r["fold"]).all()
            assert r["n_train"] + r["n_val"] == 40
            b = r["baselines"]
            assert b["label"] == "centralised" and b["best"] in b["cindex"]
            assert r["baselines"]["model_minus_best"] == pytest.approx(r["cindex"] - b["best_cindex"])
    by_seed = [
        [
            json.loads((tmp_path / "o" / f"seed-{s}" / "cv_results.json").read_text())["folds"][f]["cindex"]
            for s in (0, 1)
        ]
        for f in range(3)
    ]
    for f, p in enumerate(summary["per_fold"]):
        assert p["by_seed"] == by_seed[f]
        assert p["cindex"]["mean"] == pytest.approx(np.mean(by_seed[f]))
        assert p["cindex"]["sd"] == pytest.approx(np.std(by_seed[f], ddof=1))
    assert "leave-site-out centralised cross-validation, seed 0:" in out
    assert "  site A held out: C-index" in out and "best Coxnet" in out
    assert "held-out C-index per site, mean +- sd over 2 seeds: A " in out
    assert "model - best centralised Coxnet baseline:" in out


def test_leave_site_out_needs_two_sites(tmp_path, capsys):
    from pipeline.cli import main

    spec = _cohort(tmp_path, n=20, sites=("A",))
    assert main(["cv", str(spec), "--leave-site-out", "--out", str(tmp_path / "o")]) == 2
    assert "leave-site-out needs at least 2 sites" in capsys.readouterr().err
    assert not (tmp_path / "o" / "cv_summary.json").exists()


def test_modality_ablation_retrains_each_fold_without_each_modality(tmp_path):
    """With slides and clinical data, each fold is retrained without slides and without clinical data, and the
    retrained models really lack the modality (their model dims say so)."""
    from pipeline.crossval import CVPlan, run_cv
    from pipeline.training.bundle import read_card

    cohort, cfg, _ = _cohort_with_features(tmp_path)
    cfg = cfg.with_overrides(["federated.enabled=false"])
    r = run_cv(cohort, cfg, CVPlan(k=2, modality_ablation=True, baselines=False))
    res, summary = r.runs[0], r.summary
    for row in res["folds"]:
        assert set(row["retrained_without"]) == {"slides", "clinical"}
        for v in row["retrained_without"].values():
            assert v["drop"] == pytest.approx(row["cindex"] - v["cindex"])
    assert summary["retrained_without"].keys() == {"slides", "clinical"}
    card = read_card(cfg.out / "fold_0" / "without_slides" / "model.safetensors")
    assert card.model_dims["feature_dim"] == 0 and card.model_dims["n_clinical"] > 0
    card = read_card(cfg.out / "fold_0" / "without_clinical" / "model.safetensors")
    assert card.model_dims["n_clinical"] == 0 and card.model_dims["feature_dim"] == 6
