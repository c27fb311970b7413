"""Reading the cohort's tables, the same way for ``histofuse validate`` and for training.

One CSV reader for the patient manifest, clinical and expression tables (:func:`read_header`,
:func:`read_csv_dicts`, :func:`read_csv_frame`): UTF-8 with or without a byte-order mark (as Excel
writes it), the delimiter sniffed among ``,``, ``;`` and tab, and the header read verbatim (a repeated
name stays repeated; pandas would rename it). :func:`read_expression` reads an expression file
(CSV/TSV/h5ad) into ``x [P, G]`` with its patient and raw gene ids and checks every value the way
training needs it: numeric, finite, within float32 range, non-negative counts, missing values only
with ``impute``.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max: larger values become inf in training
DELIMITERS = (",", ";", "\t")
NA_TOKENS = frozenset({"", "na", "nan", "n/a", "#n/a", "null", "none", "-nan", "<na>"})
ORIENTATIONS = ("patients_by_genes", "genes_by_patients")


class ExpressionSpec(Protocol):
    """What :func:`read_expression` needs of the cohort's omics section (``OmicsSource``)."""

    @property
    def path(self) -> Path: ...
    @property
    def values(self) -> str: ...
    @property
    def orientation(self) -> str: ...
    @property
    def gene_column(self) -> str | None: ...
    @property
    def impute(self) -> str: ...
    def resolved_format(self) -> str: ...


def sniff_delimiter(line: str) -> str:
    """The delimiter among ``,``, ``;`` and tab that splits a header line into the most fields (``,`` on a tie)."""
    counts = [len(next(csv.reader([line], delimiter=d), [])) for d in DELIMITERS]
    return DELIMITERS[max(range(len(DELIMITERS)), key=lambda k: (counts[k], -k))]


def read_header(path: Path, delimiter: str | None = None) -> tuple[list[str], str]:
    """The header row (names stripped, verbatim otherwise) and the delimiter (given, or sniffed from it)."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        line = fh.readline()
    delim = delimiter or sniff_delimiter(line.rstrip("\r\n"))
    header = next(csv.reader([line.rstrip("\r\n")], delimiter=delim), [])
    return [h.strip() for h in header], delim


def repeated(names: list[str]) -> list[str]:
    """Names occurring more than once, in first-occurrence order."""
    seen: set[str] = set()
    out: list[str] = []
    for n in names:
        if n in seen and n not in out:
            out.append(n)
        seen.add(n)
    return out


def read_csv_dicts(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a CSV as dicts of stripped-header -> raw cell (blank lines skipped). Raises
    ``ValueError`` for a repeated column name (the second would silently replace the first) and for a row
    with more fields than the header (its values would shift into the wrong columns)."""
    header, delim = read_header(path)
    dup = repeated(header)
    if dup:
        raise ValueError(f"{path}: column(s) {dup} appear more than once in the header {header}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delim)
        next(reader, None)
        rows: list[dict[str, str]] = []
        for r in reader:
            if not any(c.strip() for c in r):
                continue
            if len(r) > len(header) and any(c.strip() for c in r[len(header) :]):
                raise ValueError(
                    f"{path}: row {len(rows) + 1} has {len(r)} fields but the header has {len(header)} {header} "
                    f"(a {delim!r} inside a value? quote the value); the row is {r}"
                )
            rows.append(dict(zip(header, r, strict=False)))
    return header, rows


def read_csv_frame(path: Path):  # -> pandas.DataFrame, every column str (NaN = missing)
    """A CSV as a pandas DataFrame of strings, with the shared reader's encoding, delimiter and header rules."""
    import pandas as pd

    header, delim = read_header(path)
    dup = repeated(header)
    if dup:
        raise ValueError(f"{path}: column(s) {dup} appear more than once in the header {header}")
    return pd.read_csv(path, sep=delim, header=0, names=header, dtype=str, encoding="utf-8-sig")


def detect_orientation(
    rows: list[str], cols: list[str], patient_ids: list[str] | set[str] | None, declared: str, file: str
) -> str:
    """``patients_by_genes`` or ``genes_by_patients`` for a table with row ids ``rows`` and column ids ``cols``.

    ``auto``: the axis sharing more ids with the cohort's patients (rows when no patient ids are known).
    A declared orientation is checked against the patient ids: when more of them are on the other axis,
    ``ValueError`` with the orientation to set. Also raises when neither axis matches.
    """
    if patient_ids is None:
        return declared if declared != "auto" else "patients_by_genes"
    ids = set(patient_ids)
    in_rows = sum(str(r).strip() in ids for r in rows)
    in_cols = sum(str(c).strip() in ids for c in cols)
    if declared != "auto":
        n_decl, n_other = (in_rows, in_cols) if declared == "patients_by_genes" else (in_cols, in_rows)
        if n_other > n_decl:
            other = ORIENTATIONS[1 - ORIENTATIONS.index(declared)]
            axes = ("rows", "columns") if declared == "patients_by_genes" else ("columns", "rows")
            raise ValueError(
                f"{file}: orientation {declared} says patients are the {axes[0]}, but {n_other} of the cohort's "
                f"{len(ids)} patient ids are {axes[1]} and {n_decl} are {axes[0]}; set orientation: {other} "
                "(or auto) in the omics section"
            )
        return declared
    if in_rows == 0 and in_cols == 0:
        raise ValueError(
            f"{file}: cannot tell the orientation: neither the row ids (e.g. {list(rows)[:3]}) nor the column ids "
            f"(e.g. {list(cols)[:3]}) match the cohort's patient ids; set orientation: patients_by_genes or "
            "genes_by_patients in the omics section"
        )
    return "genes_by_patients" if in_cols > in_rows else "patients_by_genes"


@dataclass
class ExpressionTable:
    """An expression file as read: ``x [P, G]`` float64 (NaN = missing), patient ids ``[P]``, raw gene ids ``[G]``."""

    x: Any  # numpy.ndarray
    patient_ids: list[str]
    gene_ids: list[str]


def _first_non_numeric(col: Any) -> tuple[int, str] | None:
    """Position and text of the first cell of a str Series that is neither missing nor a number."""
    for k, v in enumerate(col):
        if isinstance(v, str) and v.strip().lower() not in NA_TOKENS:
            try:
                float(v)
            except ValueError:
                return k, v
    return None


def _read_delimited(src: ExpressionSpec, patient_ids: list[str] | set[str] | None) -> ExpressionTable:
    """CSV/TSV: first column the row ids, header read verbatim (repeated gene names kept for merging)."""
    import numpy as np
    import pandas as pd

    path = src.path
    header, delim = read_header(path, "\t" if src.resolved_format() == "tsv" else None)
    try:
        body = pd.read_csv(path, sep=delim, header=None, skiprows=1, dtype={0: str}, encoding="utf-8-sig")
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: not a well-formed table ({e})") from e
    if body.shape[1] != len(header):
        raise ValueError(f"{path}: the header has {len(header)} columns but the rows have {body.shape[1]}")
    row_ids = body[0].fillna("").str.strip().tolist()
    gene_col = src.gene_column
    data = [j for j in range(1, len(header)) if header[j] != gene_col]
    orient = detect_orientation(row_ids, [header[j] for j in data], patient_ids, src.orientation, str(path))
    gene_ids: list[str] | None = None
    if gene_col is not None:
        if orient != "genes_by_patients":
            raise ValueError(
                f"{path}: gene_column '{gene_col}' applies to a genes-by-patients table (one row per gene); "
                "this table has one row per patient"
            )
        if gene_col not in header:
            raise ValueError(f"{path}: gene_column '{gene_col}' not in header {header}")
        j = header.index(gene_col)
        gene_ids = row_ids if j == 0 else body[j].fillna("").str.strip().tolist()
    for j in data:
        if pd.api.types.is_numeric_dtype(body[j]):
            continue
        bad = _first_non_numeric(body[j])
        if bad is not None:
            k, v = bad
            kind, other = ("gene", "patient") if orient == "patients_by_genes" else ("patient", "gene")
            where = f"{kind} column '{header[j]}' is not numeric (column {j + 1}): {other} '{row_ids[k]}' has {v!r}"
            hint = "; name it as gene_column if it holds gene identifiers" if orient == "genes_by_patients" else ""
            if delim == ";" and re.fullmatch(r"\s*[-+]?\d+,\d+\s*", v):
                hint += "; it looks like a decimal comma: write numbers with '.'"
            raise ValueError(f"{path}: {where}{hint}")
    num = body[data].apply(
        lambda s: s if pd.api.types.is_numeric_dtype(s) else pd.to_numeric(s.str.strip(), errors="coerce")
    )
    x = num.to_numpy(np.float64) if len(data) else np.zeros((len(row_ids), 0))
    cols = [header[j] for j in data]
    if orient == "patients_by_genes":
        return ExpressionTable(x, row_ids, cols)
    return ExpressionTable(x.T, cols, gene_ids if gene_ids is not None else row_ids)


def _read_h5ad(src: ExpressionSpec, patient_ids: list[str] | set[str] | None) -> ExpressionTable:
    import anndata as ad
    import numpy as np

    a = ad.read_h5ad(src.path)
    obs, var = [str(i) for i in a.obs_names], [str(g) for g in a.var_names]
    orient = detect_orientation(obs, var, patient_ids, src.orientation, str(src.path))
    x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    x = np.asarray(x, np.float64)
    if src.gene_column is not None:
        frame = a.var if orient == "patients_by_genes" else a.obs
        if src.gene_column not in frame.columns:
            where = "var" if orient == "patients_by_genes" else "obs"
            raise ValueError(
                f"{src.path}: gene_column '{src.gene_column}' is not a {where} column (have {list(frame.columns)})"
            )
        ids = frame[src.gene_column].astype(str).tolist()
        var, obs = (ids, obs) if orient == "patients_by_genes" else (var, ids)
    if orient == "genes_by_patients":
        x, obs, var = x.T, var, obs
    return ExpressionTable(x, obs, var)


def read_expression(src: ExpressionSpec, patient_ids: list[str] | set[str] | None = None) -> ExpressionTable:
    """Read and check an expression file in the declared or detected orientation.

    Raises ``ValueError`` naming the file, patient, gene and value for a non-numeric, infinite or
    out-of-float32-range value, a negative count (``values: counts``), missing values without ``impute``,
    or a patient listed twice. With ``impute: zero`` missing values are returned as 0.
    """
    import numpy as np

    t = _read_h5ad(src, patient_ids) if src.resolved_format() == "h5ad" else _read_delimited(src, patient_ids)
    t.patient_ids = [str(p).strip() for p in t.patient_ids]
    x, pids, genes = t.x, t.patient_ids, t.gene_ids
    with np.errstate(invalid="ignore"):
        huge = np.abs(x) > FLOAT32_MAX  # includes inf
    if huge.any():
        i, j = np.argwhere(huge)[0]
        raise ValueError(
            f"{src.path}: value {x[i, j]!r} for patient '{pids[i]}', gene '{genes[j]}' is infinite or beyond the "
            f"float32 range (|x| <= {FLOAT32_MAX:.3g})"
        )
    miss = np.isnan(x)
    if miss.any():
        rows, cols = np.flatnonzero(miss.any(1)), np.flatnonzero(miss.any(0))
        msg = (
            f"{src.path}: {int(miss.sum())} missing value(s) in {len(rows)} patient(s) (e.g. "
            f"{[pids[i] for i in rows[:3]]}) and {len(cols)} gene(s) (e.g. {[genes[j] for j in cols[:3]]})"
        )
        if src.impute == "none":
            raise ValueError(msg + "; set impute: mean or impute: zero in the cohort's omics section")
        log.warning("%s; imputed with the %s", msg, "training mean" if src.impute == "mean" else "value 0")
        if src.impute == "zero":
            t.x = x = np.where(miss, 0.0, x)
    if src.values == "counts" and (x < 0).any():
        i, j = np.argwhere(x < 0)[0]
        raise ValueError(
            f"{src.path}: negative count {x[i, j]} for patient '{pids[i]}', gene "
            f"'{genes[j]}' (values: counts); set values: log for already-log data"
        )
    dup = repeated(pids)
    if dup:
        raise ValueError(f"{src.path}: patient id(s) listed more than once: {dup[:5]}")
    return t


def is_number(v: str) -> bool:
    """True when ``float(v)`` parses (a numeric table cell)."""
    try:
        float(v)
        return True
    except ValueError:
        return False
