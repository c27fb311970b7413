"""Property: any malformed cohort table is exit 2 from `histofuse validate`, one message naming the file and
the field, never a traceback; and `histofuse train` on it leaves an existing run folder untouched."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_specs.artifacts import RunFiles
from pipeline.cli import main

COLUMNS = ["patient_id", "site", "time", "event"]
N = 6

# a corruption: (field it names, how it changes the table). Values are the cell's new text.
BAD_VALUES = {
    "patient_id": st.sampled_from(["", "  ", "DUP"]),
    "time": st.sampled_from(["soon", "", "1e39", "-5", "inf", "nan", "-0.5", "3,5", "1e400"]),
    "event": st.sampled_from(["2", "yes", "", "-1", "0.5", "nan"]),
    "site": st.sampled_from(["", "   "]),
}


@st.composite
def malformed(draw) -> tuple[str, bytes, str]:
    """``(file name, manifest bytes, field the message must name)``."""
    rows = [[f"P{i}", "AB"[i % 2], str(10 + i), str(i % 2)] for i in range(N)]
    header = list(COLUMNS)
    kind = draw(st.sampled_from(["value", "missing_column", "wrong_delimiter"]))
    if kind == "value":
        field = draw(st.sampled_from(sorted(BAD_VALUES)))
        value = draw(BAD_VALUES[field])
        i = draw(st.integers(1, N - 1))
        if value == "DUP":
            value = rows[0][0]
        rows[i][COLUMNS.index(field)] = value
        text = "\n".join(",".join(r) for r in [header, *rows]) + "\n"
    elif kind == "missing_column":
        field = draw(st.sampled_from(COLUMNS))
        k = COLUMNS.index(field)
        text = "\n".join(",".join(c for j, c in enumerate(r) if j != k) for r in [header, *rows]) + "\n"
    else:  # a delimiter the reader does not know: one column, every required column missing
        field = "patient_id"
        text = "\n".join("|".join(r) for r in [header, *rows]) + "\n"
    data = text.encode()
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data  # an Excel byte-order mark changes nothing
    if kind == "value" and draw(st.booleans()):
        data = data.replace(b",", b";")  # neither does a ';' delimiter
    return draw(st.sampled_from(["patients.csv", "manifest with space.csv"])), data, field


def _write(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    (tmp / "clinical.csv").write_text("patient_id,age\n" + "".join(f"P{i},{40 + i}\n" for i in range(N)))
    (tmp / "cohort.yaml").write_text(f"name: t\npatients: '{name}'\nclinical: {{path: clinical.csv}}\n")
    return tmp / "cohort.yaml"


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(malformed())
def test_validate_names_file_and_field(capsys, case):
    name, data, field = case
    with tempfile.TemporaryDirectory() as d:
        spec = _write(Path(d), name, data)
        rc = main(["validate", str(spec)])
    cap = capsys.readouterr()
    msg = cap.err + cap.out
    assert rc == 2, msg
    assert "Traceback" not in msg
    assert name in msg, msg
    assert f"'{field}'" in msg, msg


@FAST
@given(malformed())
def test_train_leaves_an_existing_run_folder_untouched(capsys, case):
    name, data, _ = case
    with tempfile.TemporaryDirectory() as d:
        spec = _write(Path(d), name, data)
        run = Path(d) / "run"
        run.mkdir()
        (run / RunFiles.MODEL).write_bytes(b"a trained model")
        (run / "config.yaml").write_text("seed: 0\n")
        before = _tree(run)
        rc = main(["train", str(spec), "--out", str(run)])
        after = _tree(run)
    cap = capsys.readouterr()
    assert rc == 2 and "Traceback" not in cap.err + cap.out
    assert after == before
