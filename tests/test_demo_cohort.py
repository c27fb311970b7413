"""The local-morphology demo: carriers are planted where the truth files say, and the check scores them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cohorts import demo
from pipeline.cohorts.demo import B_AGE, B_LOCAL, PLANTED, DemoSize, build_demo
from pipeline.cohorts.demo_check import check_demo, summary_lines

SIZE = DemoSize(patients=10, cols=6, rows=5, genes=20)
GREEN = np.array([40, 200, 40], np.uint8)


@pytest.fixture(scope="module")
def local_demo(tmp_path_factory):
    """A 10-patient local demo whose carrier pattern is solid green, so planted blocks can be seen exactly."""
    mp = pytest.MonkeyPatch()
    green = np.broadcast_to(GREEN, (300, 300, 3)).copy()
    mp.setattr(demo, "_carrier_source", lambda: (green, np.ones(green.shape[:2], bool)))
    mp.setattr(demo, "CARRIER_SLIDES", 0.6)
    try:
        spec = build_demo(tmp_path_factory.mktemp("local") / "cohort", SIZE, seed=1, morphology="local")
    finally:
        mp.undo()
    return spec.parent


def _blocks(slide) -> dict[tuple[int, int], np.ndarray]:
    """Mean RGB of the interior of every 224 px block at level 0."""
    import tifffile

    img = tifffile.imread(slide, level=0)
    b, m = demo.BLOCK, 20
    return {
        (x, y): img[y + m : y + b - m, x + m : x + b - m].reshape(-1, 3).mean(0)
        for y in range(0, img.shape[0], b)
        for x in range(0, img.shape[1], b)
    }


def test_carriers_are_planted_where_the_truth_says(local_demo):
    tiles = pd.read_csv(local_demo / "truth" / "tiles.csv")
    patients = pd.read_csv(local_demo / "truth" / "patients.csv")
    assert set(tiles.columns) == {"slide_id", "x", "y", "is_tumour", "is_carrier"}
    assert not (tiles.is_carrier & tiles.is_tumour).any()  # a carrier replaces the block that was there
    per_slide = tiles.groupby("slide_id").is_carrier.sum()
    assert per_slide.reindex(patients.patient_id).tolist() == patients.carrier_tiles.tolist()
    assert (patients.carrier_tiles > 0).any() and (patients.carrier_tiles == 0).any()
    assert set(patients.carrier_tiles[patients.carrier_tiles > 0]) <= set(range(3, 9))
    for sid, t in tiles.groupby("slide_id"):
        blocks = _blocks(local_demo / "slides" / f"{sid}.tif")
        green = {xy for xy, rgb in blocks.items() if rgb[1] > rgb[0] + 80 and rgb[1] > rgb[2] + 80}
        assert green == set(zip(t.x[t.is_carrier == 1], t.y[t.is_carrier == 1], strict=True)), sid


def test_local_hazard_is_carrier_count_not_tumour_fraction(local_demo):
    p = pd.read_csv(local_demo / "truth" / "patients.csv")

    def z(v):
        v = np.asarray(v, float)
        return (v - v.mean()) / v.std()  # population SD, as the builder

    genes = p[[f"s_{g}" for g in PLANTED]].to_numpy() @ np.array(list(PLANTED.values()))
    expected = B_LOCAL * z(p.carrier_tiles) + B_AGE * z(p.age) + genes
    np.testing.assert_allclose(p.oracle_log_hz, expected, atol=1e-4)
    truth = json.loads((local_demo / "truth" / "genes.json").read_text())
    assert truth["morphology"] == "local" and truth["b_tumour"] == 0.0 and truth["b_local"] == B_LOCAL


def test_real_carrier_pattern_is_tissue():
    rgb, mask = demo._carrier_source()
    assert rgb.shape == (512, 512, 3) and 0.6 < mask.mean() < 1.0  # glands and stroma, not the pale lumen


def test_fraction_demo_has_no_carriers(tiny_demo):
    tiles = pd.read_csv(tiny_demo.parent / "truth" / "tiles.csv")
    assert list(tiles.columns) == ["slide_id", "x", "y", "is_tumour"]
    assert "morphology" not in json.loads((tiny_demo.parent / "truth" / "build.json").read_text())


def test_unknown_morphology_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'patchy'.*fraction, local"):
        build_demo(tmp_path, SIZE, morphology="patchy")


def _fake_run(root, local_demo, score) -> None:
    """A run folder over the local demo: risk scores = the oracle, tile scores from ``score(is_carrier)``."""
    import shutil

    shutil.copytree(local_demo, root / "cohort")
    p = pd.read_csv(root / "cohort" / "truth" / "patients.csv")
    risk = pd.DataFrame({"patient_id": p.patient_id, "split": "test", "log_hz": p.oracle_log_hz,
                         "time": np.arange(1, len(p) + 1.0), "event": 1})  # fmt: skip
    risk.to_csv(root / "risk_scores.csv", index=False)
    t = pd.read_csv(root / "cohort" / "truth" / "tiles.csv")
    s = score(t.is_carrier.to_numpy()) + 0.01 * np.random.default_rng(0).random(len(t))
    attn = s / t.assign(s=s).groupby("slide_id").s.transform("sum")
    n = t.groupby("slide_id").x.transform("size")
    tiles = pd.DataFrame({"patient_id": t.slide_id, "slide_id": t.slide_id, "x": t.x, "y": t.y, "attn": attn,
                          "attn_rel": attn * n, "ig": s - 0.5})  # fmt: skip
    (root / "attributions").mkdir()
    tiles.to_csv(root / "attributions" / "tiles.csv", index=False)
    gaps = {"auc": {"attention": 0.5, "ig": 0.4, "random": 0.1}, "gap": {"attention": 0.4, "ig": 0.3}, "patients": 9}
    (root / "attributions" / "faithfulness.json").write_text(json.dumps({"tiles": gaps}))
    m = {"baselines": {"baselines": {"slides": {"cindex": 0.52}, "all": {"cindex": 0.61}}}}
    (root / "metrics.json").write_text(json.dumps(m))


@pytest.mark.parametrize("found", [True, False])
def test_check_scores_carrier_localisation(local_demo, tmp_path, found):
    _fake_run(tmp_path, local_demo, (lambda c: 1.0 * c) if found else (lambda c: 1.0 - c))
    r = check_demo(tmp_path)
    loc = r["local_morphology"]
    n_car = int((pd.read_csv(local_demo / "truth" / "patients.csv").carrier_tiles > 0).sum())
    assert loc["carrier_slides"] == loc["attention"]["slides"] == n_car
    want = 1.0 if found else 0.0
    assert loc["attention"]["auc"] == want and loc["ig"]["auc"] == want and loc["top_attended_is_carrier"] == want
    assert (loc["attn_rel_carrier"] > loc["attn_rel_other"]) == found
    assert loc["deletion"]["gap_vs_random"] == {"attention": 0.4, "ig": 0.3}
    assert loc["coxnet_test_cindex"] == {"slides": 0.52, "all": 0.61}
    assert json.loads((tmp_path / "truth_check.json").read_text())["local_morphology"] == loc
    assert any(line.startswith("carrier tiles") for line in summary_lines(r))
