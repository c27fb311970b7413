from __future__ import annotations

import csv
from pathlib import Path

import pytest

from data_specs import CohortError, load_cohort


def _write(tmp: Path, rows: list[dict], omics_ids: list[str] | None = None, extra_yaml: str = "") -> Path:
    (tmp / "s1.tif").write_bytes(b"x")
    with (tmp / "patients.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["patient_id", "site", "time", "event", "slides"])
        w.writeheader()
        w.writerows(rows)
    y = "name: t\npatients: patients.csv\n"
    if omics_ids is not None:
        with (tmp / "omics.csv").open("w") as fh:
            fh.write("patient_id,G1,G2\n" + "".join(f"{p},1,2\n" for p in omics_ids))
        y += "omics: {path: omics.csv}\n"
    (tmp / "cohort.yaml").write_text(y + extra_yaml)
    return tmp / "cohort.yaml"


def _row(pid="P1", site="A", time="10", event="1", slides="s1.tif"):
    return {"patient_id": pid, "site": site, "time": time, "event": event, "slides": slides}


def _problems(path: Path) -> list[str]:
    with pytest.raises(CohortError) as ei:
        load_cohort(path)
    return [str(p) for p in ei.value.problems]


def test_valid_cohort_and_summary(tmp_path):
    c = load_cohort(_write(tmp_path, [_row("P1"), _row("P2", event="0")], omics_ids=["P1", "P2"]))
    assert [p.patient_id for p in c.patients] == ["P1", "P2"]
    assert c.modalities(c.patients[0]) == ("slides", "omics")
    s = c.summary()
    assert "2 patients, 1 events, 1 sites" in s and "slides+omics: 2" in s


@pytest.mark.parametrize(
    "row, needle",
    [
        (_row("P1", time="-3"), "row 2: field 'time' = '-3': time must be a finite number >= 0"),
        (_row("P1", time="soon"), "row 2: field 'time' = 'soon': time is not a number"),
        (_row("P2", event="2"), "row 2: field 'event' = '2': event must be 0 or 1"),
        (_row("P3", slides="nope.svs"), "row 2: field 'slides' = 'nope.svs': slide file not found"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, needle):
    probs = _problems(_write(tmp_path, [_row("P0"), row]))
    assert any(needle in p and "patients.csv" in p for p in probs), probs


def test_duplicate_id(tmp_path):
    probs = _problems(_write(tmp_path, [_row("P1"), _row("P1")]))
    assert any("row 2: field 'patient_id' = 'P1': duplicate patient_id (first at row 1)" in p for p in probs)


def test_all_problems_reported_at_once(tmp_path):
    probs = _problems(_write(tmp_path, [_row("P1", time="-1"), _row("P2", event="x")]))
    assert len(probs) == 2


def test_omics_patients_must_match(tmp_path):
    probs = _problems(_write(tmp_path, [_row("P1"), _row("P2")], omics_ids=["P1", "P9"]))
    assert any("omics.csv" in p and "'P9'" in p and "not in the cohort" in p for p in probs)
    assert any("'P2'" in p and "has no omics row" in p for p in probs)


def test_missing_omics_allowed_when_asked(tmp_path):
    path = _write(tmp_path, [_row("P1"), _row("P2")], omics_ids=["P1"])
    path.write_text(
        path.read_text().replace("omics: {path: omics.csv}", "omics: {path: omics.csv, allow_missing: true}")
    )
    c = load_cohort(path)
    assert c.modalities(c.patients[1]) == ("slides",)
    assert any("no omics data (masked)" in w for w in c.warnings)


def test_site_without_events_warns(tmp_path):
    c = load_cohort(_write(tmp_path, [_row("P1", site="A"), _row("P2", site="B", event="0")]))
    assert any("site 'B' has no events" in w for w in c.warnings)


def test_patient_without_any_modality(tmp_path):
    probs = _problems(_write(tmp_path, [_row("P1"), _row("P2", slides="")]))
    assert any("'P2'" in p and "no modality" in p for p in probs)


def test_missing_columns_and_unknown_keys(tmp_path):
    (tmp_path / "patients.csv").write_text("patient_id,site,time\nP1,A,3\n")
    (tmp_path / "cohort.yaml").write_text("patients: patients.csv\n")
    assert any("missing required column(s) ['event']" in p for p in _problems(tmp_path / "cohort.yaml"))
    (tmp_path / "cohort.yaml").write_text("patients: patients.csv\nomic: {path: x}\n")
    assert any("omic" in p for p in _problems(tmp_path / "cohort.yaml"))


def test_validate_cli(tmp_path, capsys):
    from pipeline.cli import main

    good = _write(tmp_path, [_row("P1"), _row("P2", event="0")])
    assert main(["validate", str(good)]) == 0
    assert "2 patients" in capsys.readouterr().out
    (tmp_path / "patients.csv").write_text("patient_id,site,time,event,slides\nP1,A,-5,1,s1.tif\n")
    assert main(["validate", str(good)]) == 2
    err = capsys.readouterr().err
    assert "field 'time' = '-5'" in err


def test_omics_orientation_detected_or_reported(tmp_path):
    import anndata as ad
    import numpy as np
    import pandas as pd

    path = _write(tmp_path, [_row("P1"), _row("P2", event="0")])
    # genes as rows, patients as columns (an h5ad written the other way round)
    a = ad.AnnData(
        X=np.ones((3, 2), np.float32), obs=pd.DataFrame(index=["G1", "G2", "G3"]), var=pd.DataFrame(index=["P1", "P2"])
    )
    a.write_h5ad(tmp_path / "t.h5ad")
    path.write_text(path.read_text() + "omics: {path: t.h5ad}\n")
    c = load_cohort(path)
    assert c.omics_ids == frozenset({"P1", "P2"})
    (tmp_path / "o.csv").write_text("id,X1,X2\nG1,1,2\n")
    path.write_text(path.read_text().replace("t.h5ad", "o.csv"))
    assert any("o.csv" in p and "cannot tell the orientation" in p for p in _problems(path))
