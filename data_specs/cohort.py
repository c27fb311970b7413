"""The cohort spec: which patients, where their slides, omics and clinical data live, and their outcomes.

A cohort is a YAML file. Patients are listed inline or in a CSV manifest referenced from it::

    name: demo
    time_unit: days
    patients: patients.csv          # columns: patient_id, site, time, event, slides[, split]
    omics: {path: omics.h5ad}       # optional; h5ad (obs = patients) or CSV (rows = patients)
    clinical: {path: clinical.csv}  # optional; one row per patient, numeric covariates

``slides`` holds zero or more paths separated by ``;``. Relative paths resolve against the YAML's
folder. Any non-empty subset of the modalities {slides, omics, clinical} is accepted. A bare ``patients.csv``
is a cohort too: ``load_cohort(path, omics=, clinical=, time_unit=)`` (the CLI's ``--omics``, ``--clinical``,
``--time-unit``) adds its other sources, or replaces a YAML's (:func:`with_sources`).

Validation happens once, here, and collects every problem before raising, each naming the file,
row, field and value (:class:`CohortError`). The manifest's rows are checked in :mod:`data_specs.manifest`,
the tables read in :mod:`data_specs.tables`; this module owns the YAML, the omics/clinical sources and
their patient coverage, and re-exports the manifest's and problems' public names.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from data_specs.manifest import REQUIRED_COLUMNS, Patient, Split, parse_rows, read_manifest
from data_specs.problems import CohortError, Problem
from data_specs.tables import is_number, read_csv_dicts, read_csv_frame, read_expression

__all__ = [
    "REQUIRED_COLUMNS",
    "ClinicalSource",
    "Cohort",
    "CohortError",
    "CohortFile",
    "OmicsSource",
    "Patient",
    "Problem",
    "Split",
    "clinical_column_problems",
    "load_cohort",
    "read_clinical_ids",
    "read_omics_ids",
    "with_sources",
]

log = logging.getLogger(__name__)

Orientation = Literal["auto", "patients_by_genes", "genes_by_patients"]


class OmicsSource(BaseModel):
    """Where gene expression lives. ``h5ad``: AnnData with patients as ``obs_names`` (or as ``var_names``);
    ``csv``/``tsv``: first column the row ids, one row per patient or one row per gene (``orientation``,
    detected from the cohort's patient ids when ``auto``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: Path
    format: Literal["auto", "h5ad", "csv", "tsv"] = "auto"
    values: Literal["counts", "log"] = "counts"  # counts -> normalize_total + log1p; log -> used as is
    allow_missing: bool = False  # cohort patients absent from the file: error (False) or masked (True)
    orientation: Orientation = "auto"
    gene_column: str | None = None  # gene identifiers from this h5ad var column / CSV column (genes as rows)
    impute: Literal["none", "mean", "zero"] = "none"  # missing values: error, training mean, or 0
    extra_rows: Literal["error", "ignore"] = "error"  # rows of patients not in the cohort (a shared file): ignore

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        suffix = self.path.suffix.lower()
        return {".h5ad": "h5ad", ".tsv": "tsv", ".txt": "tsv"}.get(suffix, "csv")


class ClinicalSource(BaseModel):
    """Clinical covariates: a CSV with an id column and one numeric column per covariate."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: Path
    id_column: str = "patient_id"
    columns: tuple[str, ...] | None = None  # default: every column but the id
    allow_missing: bool = False
    categorical: tuple[str, ...] | None = None  # one-hot columns; default: those with non-numeric values


class CohortFile(BaseModel):
    """The YAML document, as written by the user (paths still relative)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "cohort"
    time_unit: str = "days"
    patients: str | list[dict[str, Any]]
    omics: OmicsSource | None = None
    clinical: ClinicalSource | None = None
    slide_mpp: float | None = None  # microns per pixel for slides whose metadata lacks it


@dataclass
class Cohort:
    """A validated cohort. Paths are absolute; omics/clinical patient coverage has been checked."""

    name: str
    root: Path
    time_unit: str
    patients: list[Patient]
    omics: OmicsSource | None = None
    clinical: ClinicalSource | None = None
    slide_mpp: float | None = None
    warnings: list[str] = field(default_factory=list)
    omics_ids: frozenset[str] = frozenset()
    clinical_ids: frozenset[str] = frozenset()

    @property
    def sites(self) -> list[str]:
        return sorted({p.site for p in self.patients})

    def modalities(self, p: Patient) -> tuple[str, ...]:
        """Modalities present for one patient, in the fixed order slides, omics, clinical."""
        out = []
        if p.slides:
            out.append("slides")
        if self.omics is not None and p.patient_id in self.omics_ids:
            out.append("omics")
        if self.clinical is not None and p.patient_id in self.clinical_ids:
            out.append("clinical")
        return tuple(out)

    def slide_mpp_overrides(self) -> dict[str, float]:
        """Microns per pixel given per slide in the manifest: ``str(slide path)`` -> mpp."""
        pairs = (pair for p in self.patients for pair in zip(p.slides, p.slide_mpps, strict=False))
        return {str(s): m for s, m in pairs if m is not None}

    def summary(self) -> str:
        n_ev = sum(p.event for p in self.patients)
        lines = [f"cohort '{self.name}': {len(self.patients)} patients, {n_ev} events, {len(self.sites)} sites"]
        for s in self.sites:
            ps = [p for p in self.patients if p.site == s]
            lines.append(f"  site {s}: {len(ps)} patients, {sum(p.event for p in ps)} events")
        combos = Counter("+".join(self.modalities(p)) or "none" for p in self.patients)
        for kind, src, ids in (("omics", self.omics, self.omics_ids), ("clinical", self.clinical, self.clinical_ids)):
            if src is not None:
                fmt = f" ({src.resolved_format()})" if isinstance(src, OmicsSource) else ""
                n = sum(p.patient_id in ids for p in self.patients)
                lines.append(f"{kind}: {src.path}{fmt}, {n} of {len(self.patients)} patients")
        lines.append(f"time unit: {self.time_unit}")
        lines.append("modalities per patient: " + ", ".join(f"{k}: {v}" for k, v in sorted(combos.items())))
        n_slides = sum(len(p.slides) for p in self.patients)
        lines.append(f"slides: {n_slides}")
        splits = Counter(p.split or "blank" for p in self.patients)
        rule = "blanks assigned to " + ("train/val" if splits.get("test") else "train/val/test") + " by site and event"
        rule = "used as given" if "blank" not in splits else f"given cells kept; {rule}" if len(splits) > 1 else rule
        lines.append("split column: " + ", ".join(f"{k}: {v}" for k, v in sorted(splits.items())) + f" ({rule})")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


def read_omics_ids(src: OmicsSource, patient_ids: list[str] | set[str] | None = None) -> list[str]:
    """Patient ids in an omics file, in file order, after reading and checking every value the way training
    does (:func:`data_specs.tables.read_expression`). Raises ``ValueError`` naming the file and value."""
    return read_expression(src, patient_ids).patient_ids


def read_clinical_ids(src: ClinicalSource) -> list[str]:
    """Patient ids of a clinical CSV, in file order. Raises :class:`CohortError` for a missing id column."""
    try:
        header, rows = read_csv_dicts(src.path)
    except ValueError as e:
        raise CohortError([Problem(str(src.path), str(e).removeprefix(f"{src.path}: "))]) from e
    if src.id_column not in header:
        msg = f"id column not in header {header}"
        raise CohortError([Problem(str(src.path), msg, None, "clinical.id_column", src.id_column)])
    problems = clinical_column_problems(src, header)
    if problems:
        raise CohortError(problems)
    return [str(r.get(src.id_column) or "").strip() for r in rows]


def clinical_column_problems(src: ClinicalSource, header: list[str]) -> list[Problem]:
    """What training's clinical reader (``pipeline.omics.clinical.ClinicalNormaliser.read``) refuses: a declared
    column not in the CSV's ``header``, a categorical column not among the clinical columns and, when
    ``categorical`` is declared, a non-numeric value in any other column (the first one per column)."""
    f = str(src.path)
    cols = list(src.columns) if src.columns else [c for c in header if c != src.id_column]
    msg = f"clinical column not in the header {header}"
    problems = [Problem(f, msg, None, "clinical.columns", c) for c in cols if c not in header]
    if src.categorical is None:
        return problems  # training makes every column with a non-numeric value categorical
    msg = f"categorical column is not among the clinical columns {cols}"
    problems += [Problem(f, msg, None, "clinical.categorical", c) for c in src.categorical if c not in cols]
    df = read_csv_frame(src.path)
    for c in cols:
        if c in src.categorical or c not in df.columns:
            continue
        for i, v in enumerate(df[c]):
            if isinstance(v, str) and not is_number(v.strip()):
                pid = str(df[src.id_column].iloc[i]).strip()
                why = f"not numeric (patient '{pid}') and the column is not listed in clinical.categorical"
                problems.append(Problem(f, why, i + 1, c, v.strip()))
                break
    return problems


def _check_coverage(kind: str, src: OmicsSource | ClinicalSource, ids: list[str], cohort_ids: set[str],
                    problems: list[Problem]) -> list[str]:  # fmt: skip
    """Warnings (masked patients, ignored rows) after recording each patient of ``src`` that is a problem."""
    file, allow_missing, extra_rows = src.path, src.allow_missing, getattr(src, "extra_rows", "error")
    warnings = []
    counts = Counter(ids)
    for pid, n in counts.items():
        if n > 1:
            problems.append(Problem(str(file), f"{kind} lists this patient {n} times", None, "patient_id", pid))
    extra = sorted(set(ids) - cohort_ids)
    if extra and extra_rows == "ignore":
        warnings.append(f"{file}: {len(extra)} {kind} row(s) of patients not in the cohort are ignored "
                        f"({kind}.extra_rows: ignore), e.g. {extra[:5]}")  # fmt: skip
    elif extra:
        msg = f"patient in {kind} file but not in the cohort"
        msg += " (a file shared with other cohorts: set omics.extra_rows: ignore)" if kind == "omics" else ""
        problems += [Problem(str(file), msg, None, "patient_id", pid) for pid in extra]
    absent = sorted(cohort_ids - set(ids))
    if absent:
        if allow_missing:
            warnings.append(f"{len(absent)} cohort patient(s) have no {kind} data (masked): {absent[:5]}")
        else:
            msg = f"cohort patient has no {kind} row (set {kind}.allow_missing: true to mask instead)"
            problems += [Problem(str(file), msg, None, "patient_id", pid) for pid in absent]
    return warnings


def _read_doc(path: Path) -> CohortFile:
    """The YAML document (or a bare CSV manifest as one). Raises :class:`CohortError`."""
    if path.suffix.lower() == ".csv":
        return CohortFile(name=path.stem, patients=path.name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CohortError([Problem(str(path), f"not valid YAML: {e}")]) from e
    if not isinstance(raw, dict):
        raise CohortError([Problem(str(path), "expected a mapping with at least 'patients'", value=raw)])
    try:
        return CohortFile.model_validate(raw)
    except ValidationError as e:
        raise CohortError(
            [
                Problem(str(path), err["msg"], None, ".".join(str(x) for x in err["loc"]), err.get("input"))
                for err in e.errors()
            ]
        ) from e


@dataclass
class _SourceCheck:
    """What reading the omics and clinical files found: ``ids`` maps ``"omics"``/``"clinical"`` to the patient
    ids of each file read; ``complete`` is False when one could not be read."""

    warnings: list[str] = field(default_factory=list)
    ids: dict[str, list[str]] = field(default_factory=dict)
    complete: bool = True


def _check_sources(
    spec: Path,
    omics: OmicsSource | None,
    clinical: ClinicalSource | None,
    ids: set[str] | None,
    problems: list[Problem],
    flags: frozenset[str] = frozenset(),
) -> _SourceCheck:
    """Read the omics and clinical files as training will and check their patients against ``ids`` (the ids
    of every manifest row, valid or not). ``ids`` None (the manifest itself is unreadable): only check that
    the files exist, so that one root cause is not reported again as every patient missing. A kind in ``flags``
    was given on the command line: a missing file names the flag (``--omics``) instead of ``omics.path``."""
    out = _SourceCheck()
    for kind, src in (("omics", omics), ("clinical", clinical)):
        if src is None:
            continue
        if not src.path.is_file():
            where = f"--{kind}" if kind in flags else f"{kind}.path"
            problems.append(Problem(str(spec), f"{kind} file not found", None, where, str(src.path)))
            out.complete = False
            continue
        if ids is None:
            continue
        try:
            found = read_omics_ids(src, ids) if isinstance(src, OmicsSource) else read_clinical_ids(src)
        except CohortError as e:
            problems += e.problems
            out.complete = False
            continue
        except (ValueError, OSError) as e:
            problems.append(Problem(str(src.path), str(e).removeprefix(f"{src.path}: ")))
            out.complete = False
            continue
        out.ids[kind] = found
        out.warnings += _check_coverage(kind, src, found, ids, problems)
    return out


def _patient_rows(doc: CohortFile, path: Path, problems: list[Problem]) -> tuple[list[dict[str, Any]], str]:
    """The patient rows of ``doc`` (from its CSV manifest or inline list) and where they came from."""
    if isinstance(doc.patients, str):
        manifest = Path(doc.patients)
        manifest = manifest if manifest.is_absolute() else path.parent / manifest
        return read_manifest(manifest, problems), str(manifest)
    rows, src = doc.patients, f"{path} (patients)"
    for i, r in enumerate(rows, start=1):
        missing = [c for c in REQUIRED_COLUMNS if c not in r]
        if missing:
            problems.append(Problem(src, f"missing required field(s) {missing}", i))
    return rows, src


def with_sources(
    doc: CohortFile, omics: str | Path | None = None, clinical: str | Path | None = None, time_unit: str | None = None
) -> CohortFile:
    """``doc`` with an omics file, a clinical file and a time unit given outside it (the CLI's flags). Each given
    one replaces the document's: a source with its default options (format and orientation auto-detected,
    ``values: counts``, no missing patients), its path resolved against the current folder."""
    update: dict[str, Any] = {}
    if omics is not None:
        update["omics"] = OmicsSource(path=Path(omics).resolve())
    if clinical is not None:
        update["clinical"] = ClinicalSource(path=Path(clinical).resolve())
    if time_unit is not None:
        if not time_unit.strip():
            raise CohortError([Problem("--time-unit", "empty time unit (e.g. days, months, years)")])
        update["time_unit"] = time_unit.strip()
    return doc.model_copy(update=update)


def load_cohort(
    path: str | Path,
    omics: str | Path | None = None,
    clinical: str | Path | None = None,
    time_unit: str | None = None,
) -> Cohort:
    """Read and validate a cohort YAML (or a bare CSV manifest). Raises :class:`CohortError`.

    ``omics`` (h5ad, CSV or TSV, orientation detected from the patient ids), ``clinical`` (CSV) and
    ``time_unit`` add to a CSV manifest what a YAML would declare, or replace the YAML's (:func:`with_sources`).

    Every problem is collected before raising, and each root cause is reported once: a row rejected for
    its time or event still counts as a cohort patient when the omics and clinical files are checked, and
    an unreadable manifest or omics file is not reported again as every patient missing.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise CohortError([Problem(str(path), "cohort file not found")])
    root = path.parent
    problems: list[Problem] = []
    doc = with_sources(_read_doc(path), omics, clinical, time_unit)
    flags = frozenset(k for k, v in (("omics", omics), ("clinical", clinical)) if v is not None)
    rows, src = _patient_rows(doc, path, problems)
    patients = parse_rows(rows, src, root, problems)
    if not rows and not problems:
        problems.append(Problem(src, "the cohort lists no patients"))

    def _abs(p: Path) -> Path:
        return p if p.is_absolute() else (root / p).resolve()

    osrc = doc.omics.model_copy(update={"path": _abs(doc.omics.path)}) if doc.omics else None
    csrc = doc.clinical.model_copy(update={"path": _abs(doc.clinical.path)}) if doc.clinical else None
    known = {str(r.get("patient_id") or "").strip() for r in rows} - {""} if rows else None
    found = _check_sources(path, osrc, csrc, known, problems, flags)
    cohort = Cohort(
        doc.name,
        root,
        doc.time_unit,
        patients,
        osrc,
        csrc,
        doc.slide_mpp,
        found.warnings,
        frozenset(found.ids.get("omics", ())),
        frozenset(found.ids.get("clinical", ())),
    )
    if found.complete:  # a file that could not be read is one problem, not one per patient
        for p in patients:
            if not cohort.modalities(p):
                msg = "patient has no modality (no slides, no omics row, no clinical row)"
                problems.append(Problem(src, msg, None, "patient_id", p.patient_id))
    if problems:
        raise CohortError(problems)
    for s in cohort.sites:
        if not any(p.event for p in patients if p.site == s):
            cohort.warnings.append(f"site '{s}' has no events: it adds nothing to a site-stratified Cox loss")
    for w in cohort.warnings:
        log.warning(w)
    return cohort
