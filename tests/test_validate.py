"""`histofuse validate` checks what training will check, and reports one root cause once (issue 13)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_specs import CohortError, load_cohort
from data_specs.cohort import OmicsSource
from pipeline.cli import main
from pipeline.omics.readers import read_omics

N = 25
HEADER = "patient_id,site,time,event\n"


def _rows(n: int = N, bad: dict[int, str] | None = None) -> list[str]:
    bad = bad or {}
    return [bad.get(i, f"P{i:02d},{'AB'[i % 2]},{10 + i},{i % 2}") for i in range(n)]


def _cohort(tmp_path, rows=None, omics: str | None = None, extra: str = "", clinical: bool = True):
    """A slide-less cohort: manifest + patients-by-genes omics CSV (+ clinical CSV)."""
    rows = _rows() if rows is None else rows
    (tmp_path / "patients.csv").write_text(HEADER + "\n".join(rows) + "\n")
    if omics is None:
        rng = np.random.default_rng(0)
        omics = "patient_id,G1,G2,G3\n" + "".join(
            f"P{i:02d},{','.join(str(v) for v in rng.integers(0, 50, 3))}\n" for i in range(N)
        )
    (tmp_path / "omics.csv").write_text(omics)
    y = f"name: t\npatients: patients.csv\nomics: {{path: omics.csv{extra}}}\n"
    if clinical:
        (tmp_path / "clinical.csv").write_text("patient_id,age\n" + "".join(f"P{i:02d},{50 + i}\n" for i in range(N)))
        y += "clinical: {path: clinical.csv}\n"
    (tmp_path / "cohort.yaml").write_text(y)
    return tmp_path / "cohort.yaml"


def _validate(spec, capsys) -> tuple[int, str]:
    rc = main(["validate", str(spec)])
    cap = capsys.readouterr()
    return rc, cap.err + cap.out


def _problems(spec) -> list[str]:
    with pytest.raises(CohortError) as ei:
        load_cohort(spec)
    return [str(p) for p in ei.value.problems]


# 1. time values within float32 range -------------------------------------------------------------------


@pytest.mark.parametrize("t", ["1e39", "-1", "inf", "nan"])
def test_time_beyond_float32_or_negative_is_named(tmp_path, capsys, t):
    spec = _cohort(tmp_path, _rows(bad={3: f"P03,B,{t},1"}))
    rc, msg = _validate(spec, capsys)
    assert rc == 2 and "Traceback" not in msg
    assert f"patients.csv, row 4: field 'time' = '{t}'" in msg, msg
    if t == "1e39":
        assert "float32" in msg


# 2. BOM and delimiters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("delim", [",", ";"])
def test_excel_bom_and_semicolon_csvs_are_read(tmp_path, capsys, delim):
    spec = _cohort(tmp_path)
    for name in ("patients.csv", "omics.csv", "clinical.csv"):
        f = tmp_path / name
        f.write_bytes(b"\xef\xbb\xbf" + f.read_text().replace(",", delim).encode())
    rc, msg = _validate(spec, capsys)
    assert rc == 0, msg
    assert f"{N} patients" in msg
    c = load_cohort(spec)
    assert c.omics_ids == frozenset(f"P{i:02d}" for i in range(N)) and len(c.clinical_ids) == N
    a = read_omics(c.omics, [p.patient_id for p in c.patients])
    assert list(a.var_names) == ["G1", "G2", "G3"] and a.n_obs == N
    from pipeline.omics.clinical import ClinicalNormaliser

    df = ClinicalNormaliser.read(c.clinical)
    assert list(df.columns) == ["age"] and df["age"].dtype == np.float64


# 3. a slide path that is a folder -----------------------------------------------------------------------


def test_slide_path_that_is_a_folder_is_named(tmp_path, capsys):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "a.dcm").write_bytes(b"x")
    (tmp_path / "ok.tif").write_bytes(b"x")
    (tmp_path / "patients.csv").write_text("patient_id,site,time,event,slides\nP1,A,10,1,ok.tif\nP2,A,5,0,s1\n")
    (tmp_path / "cohort.yaml").write_text("patients: patients.csv\n")
    rc, msg = _validate(tmp_path / "cohort.yaml", capsys)
    assert rc == 2 and "Traceback" not in msg
    assert "patients.csv, row 2: field 'slides' = 's1': slide path is a folder" in msg, msg
    assert "a.dcm" in msg  # a DICOM series: open one of its files
    assert msg.count("problem") == 1 and "1 problem(s)" in msg


# 4. expression values and orientation -------------------------------------------------------------------


def test_non_numeric_expression_value_fails_validate(tmp_path, capsys):
    omics = "patient_id,G1,G2\n" + "".join(f"P{i:02d},{i},{'high' if i == 7 else i}\n" for i in range(N))
    rc, msg = _validate(_cohort(tmp_path, omics=omics), capsys)
    assert rc == 2 and "Traceback" not in msg
    assert "omics.csv" in msg and "gene column 'G2'" in msg and "P07" in msg and "'high'" in msg, msg
    assert "1 problem(s)" in msg


def test_expression_beyond_float32_fails_validate(tmp_path, capsys):
    omics = "patient_id,G1\n" + "".join(f"P{i:02d},{'1e39' if i == 2 else i}\n" for i in range(N))
    rc, msg = _validate(_cohort(tmp_path, omics=omics, extra=", values: log"), capsys)
    assert rc == 2 and "omics.csv" in msg and "P02" in msg and "float32" in msg, msg


def test_wrong_declared_orientation_is_one_problem_with_the_fix(tmp_path, capsys):
    genes_as_rows = "gene," + ",".join(f"P{i:02d}" for i in range(N)) + "\n"
    genes_as_rows += "".join(f"G{j}," + ",".join(str(i + j) for i in range(N)) + "\n" for j in range(3))
    spec = _cohort(tmp_path, omics=genes_as_rows, extra=", orientation: patients_by_genes")
    rc, msg = _validate(spec, capsys)
    assert rc == 2 and "1 problem(s)" in msg, msg
    assert "orientation: genes_by_patients" in msg and "omics.csv" in msg


# 5. duplicate gene identifiers are merged ---------------------------------------------------------------


def test_duplicate_gene_columns_are_merged_by_mean(tmp_path, caplog):
    (tmp_path / "o.csv").write_text(
        "patient_id,GENE3,GENE1,GENE3,ENSG00000141510.16,ENSG00000141510.17\nP1,1,5,3,2,4\nP2,2,6,6,1,1\n"
    )
    with caplog.at_level(logging.WARNING):
        a = read_omics(OmicsSource(path=tmp_path / "o.csv", values="log"), ["P1", "P2"])
    assert list(a.var_names) == ["GENE3", "GENE1", "ENSG00000141510"]
    np.testing.assert_allclose(a.X, [[2, 5, 3], [4, 6, 1]])
    assert "merged by their mean" in caplog.text and "GENE3 x2" in caplog.text


# 6. one root cause reported once ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["P03,B,soon,1", "P03,B,10,maybe"])
def test_one_bad_row_is_one_problem(tmp_path, capsys, bad):
    rc, msg = _validate(_cohort(tmp_path, _rows(bad={3: bad})), capsys)
    assert rc == 2 and "1 problem(s)" in msg, msg
    assert "not in the cohort" not in msg and "has no" not in msg


def test_unreadable_manifest_is_one_problem(tmp_path, capsys):
    spec = _cohort(tmp_path)
    (tmp_path / "patients.csv").write_text("id,site,time,event\n" + "\n".join(_rows()) + "\n")
    rc, msg = _validate(spec, capsys)
    assert rc == 2 and "1 problem(s)" in msg and "missing required column(s) ['patient_id']" in msg, msg


def test_unreadable_omics_is_one_problem(tmp_path, capsys):
    omics = "patient_id,G1\n" + "".join(f"P{i:02d},x\n" for i in range(N))
    rc, msg = _validate(_cohort(tmp_path, omics=omics, clinical=False), capsys)
    assert rc == 2 and "1 problem(s)" in msg, msg


def test_row_with_more_fields_than_the_header_is_named(tmp_path, capsys):
    rc, msg = _validate(_cohort(tmp_path, _rows(bad={1: "P01,B,3,5,1"})), capsys)
    assert rc == 2 and "patients.csv" in msg and "row 2 has 5 fields but the header has 4" in msg, msg


# clinical columns and values, checked as training reads them ----------------------------------------------


def _clinical_cohort(tmp_path, clinical_csv: str, section: str) -> Path:
    spec = _cohort(tmp_path, clinical=False)
    (tmp_path / "clinical.csv").write_text(clinical_csv)
    spec.write_text(spec.read_text() + f"clinical: {{path: clinical.csv{section}}}\n")
    return spec


def _training_refuses(spec) -> str:
    from data_specs.cohort import CohortFile
    from pipeline.omics.clinical import ClinicalNormaliser

    src = CohortFile.model_validate(yaml.safe_load(spec.read_text())).clinical
    src = src.model_copy(update={"path": spec.parent / src.path})
    with pytest.raises(ValueError) as ei:
        ClinicalNormaliser.read(src)
    return str(ei.value)


@pytest.mark.parametrize(
    "section, missing",
    [(", columns: [age, stage]", "stage"), (", columns: [age, grade], categorical: [grade]", "grade")],
)
def test_declared_clinical_column_missing_from_the_csv_fails_validate(tmp_path, capsys, section, missing):
    csv = "patient_id,age\n" + "".join(f"P{i:02d},{50 + i}\n" for i in range(N))
    spec = _clinical_cohort(tmp_path, csv, section)
    assert missing in _training_refuses(spec)
    rc, msg = _validate(spec, capsys)
    assert rc == 2 and "Traceback" not in msg and "1 problem(s)" in msg, msg
    assert "clinical.csv" in msg and f"'{missing}'" in msg and "not in the header" in msg, msg


def test_non_numeric_clinical_value_outside_categorical_fails_validate(tmp_path, capsys):
    rows = "".join(f"P{i:02d},{'old' if i == 3 else 50 + i},{'AB'[i % 2]}\n" for i in range(N))
    spec = _clinical_cohort(tmp_path, "patient_id,age,grade\n" + rows, ", categorical: [grade]")
    assert "'old'" in _training_refuses(spec)
    rc, msg = _validate(spec, capsys)
    assert rc == 2 and "Traceback" not in msg and "1 problem(s)" in msg, msg
    assert "clinical.csv, row 4" in msg and "'age'" in msg and "'old'" in msg and "P03" in msg, msg
    ok = _clinical_cohort(tmp_path, "patient_id,age,grade\n" + rows.replace("old", "53"), ", categorical: [grade]")
    assert _validate(ok, capsys)[0] == 0  # the declared categorical column's letters are fine
