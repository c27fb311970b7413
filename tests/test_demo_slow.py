from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    # 40 patients leave 7-9 training patients per site, under the default minimum count of 10
    small = ["--patients", "40", "--set", "federated.rounds=5", "--set", "federated.min_count=2"]
    assert main(["demo", "--out", str(out), *small]) == 0
    printed = capsys.readouterr().out
    assert "oracle C-index on the same test patients" in printed
    r = json.loads((out / "truth_check.json").read_text())
    assert 0 <= r["test_cindex"] <= 1 and r["oracle_test_cindex"] > 0.6  # the planted hazard is real signal
    assert set(r["planted_gene_ranks"]) == {"MKI67", "FOXM1", "CCNB1", "ESR1", "PGR"}
    assert r["attention_tumour_vs_other"]["slides"] > 0  # every attended tile matched a planted tile
    # Tissue detection: every kept tile is a planted tissue block (precision 1) and almost all blocks are
    # kept (a pale skin block can fall under the 50% tissue threshold).
    import h5py

    truth = pd.read_csv(out / "cohort" / "truth" / "tiles.csv")
    kept = set()
    for f in (out / "features").glob("*/*.h5"):
        with h5py.File(f) as h:
            kept |= {(f.stem, int(x), int(y)) for x, y in h["coords"][:]}
    planted = set(zip(truth.slide_id, truth.x, truth.y, strict=True))
    assert kept <= planted
    assert len(kept) >= 0.99 * len(planted)


@pytest.mark.slow
def test_local_morphology_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "local"
    args = ["demo", "--morphology", "local", "--out", str(out), "--patients", "40", "--set", "federated.rounds=3"]
    assert main(args) == 0
    assert "carrier tiles (" in capsys.readouterr().out
    loc = json.loads((out / "truth_check.json").read_text())["local_morphology"]
    assert loc["carrier_slides"] > 0 and loc["attention"]["slides"] == loc["carrier_slides"]
    assert 0 <= loc["attention"]["auc"] <= 1 and 0 <= loc["ig"]["auc"] <= 1
    assert {"attention", "ig"} <= set(loc["deletion"]["gap_vs_random"])
    assert "slides" in loc["coxnet_test_cindex"]  # the mean-pool baseline was fitted on this cohort
    truth = pd.read_csv(out / "cohort" / "truth" / "tiles.csv")
    tiles = pd.read_csv(out / "attributions" / "tiles.csv").merge(truth, on=["slide_id", "x", "y"])
    assert tiles.is_carrier.sum() > 0  # carrier blocks pass tissue detection and are attended
