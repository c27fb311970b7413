"""The cohort spec: which patients, where their slides, omics and clinical data live, and their outcomes.

A cohort is a YAML file. Patients are listed inline or in a CSV manifest referenced from it::

    name: demo
    time_unit: days
    patients: patients.csv          # columns: patient_id, site, time, event, slides[, split]
    omics: {path: omics.h5ad}       # optional; h5ad (obs = patients) or CSV (rows = patients)
    clinical: {path: clinical.csv}  # optional; one row per patient, numeric covariates

``slides`` holds zero or more paths separated by ``;``. Relative paths resolve against the YAML's
folder. Any non-empty subset of the modalities {slides, omics, clinical} is accepted.

Validation happens once, here, and collects every problem before raising, each naming the file,
row, field and value (:class:`CohortError`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from data_specs.tables import FLOAT32_MAX, read_csv_dicts, read_expression

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
REQUIRED_COLUMNS = ("patient_id", "site", "time", "event")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the cohort, located precisely."""

    file: str
    message: str
    row: int | None = None  # 1-based data row (header excluded) in CSV manifests / list index in YAML
    field: str | None = None
    value: Any = None

    def __str__(self) -> str:
        where = self.file + (f", row {self.row}" if self.row is not None else "")
        what = f" field '{self.field}'" if self.field else ""
        val = f" = {self.value!r}" if self.value is not None else ""
        return f"{where}:{what}{val}: {self.message}" if what or val else f"{where}: {self.message}"


class CohortError(ValueError):
    """Raised when a cohort spec is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in cohort:\n{lines}")


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


@dataclass(frozen=True)
class Patient:
    patient_id: str
    site: str
    time: float
    event: bool
    slides: tuple[Path, ...] = ()
    split: Split | None = None
    slide_mpps: tuple[float | None, ...] = ()  # per slide, from the manifest's optional slide_mpp column


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
        lines.append("modalities per patient: " + ", ".join(f"{k}: {v}" for k, v in sorted(combos.items())))
        n_slides = sum(len(p.slides) for p in self.patients)
        lines.append(f"slides: {n_slides}")
        splits = Counter(p.split or "unassigned" for p in self.patients)
        lines.append("splits: " + ", ".join(f"{k}: {v}" for k, v in sorted(splits.items())))
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


def _read_manifest(path: Path, problems: list[Problem]) -> list[dict[str, Any]]:
    if not path.is_file():
        problems.append(Problem(str(path), "patient manifest not found"))
        return []
    try:
        header, rows = read_csv_dicts(path)
    except ValueError as e:
        problems.append(Problem(str(path), str(e).removeprefix(f"{path}: ")))
        return []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        problems.append(Problem(str(path), f"missing required column(s) {missing}; header is {header}"))
        return []
    return rows


def _parse_rows(rows: list[dict[str, Any]], src: str, root: Path, problems: list[Problem]) -> list[Patient]:
    patients: list[Patient] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=1):
        ok = True
        pid = str(row.get("patient_id") or "").strip()
        if not pid:
            problems.append(Problem(src, "patient_id is empty", i, "patient_id", row.get("patient_id")))
            ok = False
        elif pid in seen:
            problems.append(Problem(src, f"duplicate patient_id (first at row {seen[pid]})", i, "patient_id", pid))
            ok = False
        else:
            seen[pid] = i
        site = str(row.get("site") or "").strip()
        if not site:
            problems.append(Problem(src, "site is empty", i, "site", row.get("site")))
            ok = False
        raw_t = row.get("time")
        try:
            t = float(raw_t)  # type: ignore[arg-type]
            if not math.isfinite(t) or t < 0:
                problems.append(Problem(src, "time must be a finite number >= 0", i, "time", raw_t))
                ok = False
            elif t > FLOAT32_MAX:
                msg = f"time is beyond the float32 range training uses (at most {FLOAT32_MAX:.4g})"
                problems.append(Problem(src, msg, i, "time", raw_t))
                ok = False
        except (TypeError, ValueError):
            problems.append(Problem(src, "time is not a number", i, "time", raw_t))
            ok = False
        raw_e = row.get("event")
        ev_s = str(raw_e).strip().lower()
        if ev_s in ("1", "1.0", "true"):
            ev = True
        elif ev_s in ("0", "0.0", "false"):
            ev = False
        else:
            problems.append(Problem(src, "event must be 0 or 1", i, "event", raw_e))
            ok = False
        raw_slides = row.get("slides") or []
        if isinstance(raw_slides, str):
            raw_slides = [s for s in (x.strip() for x in raw_slides.split(";")) if s]
        slides = []
        for s in raw_slides:
            p = Path(s)
            p = p if p.is_absolute() else root / p
            if not p.exists():
                problems.append(Problem(src, f"slide file not found: {p}", i, "slides", s))
                ok = False
            elif not p.is_file():
                problems.append(Problem(src, _not_a_file(p), i, "slides", s))
                ok = False
            slides.append(p)
        mpps = _parse_slide_mpps(row.get("slide_mpp"), len(slides), src, i, problems)
        ok = ok and mpps is not None
        split = (str(row.get("split") or "").strip().lower()) or None
        if split is not None and split not in ("train", "val", "test"):
            problems.append(Problem(src, "split must be train, val or test", i, "split", row.get("split")))
            ok = False
        if ok:
            patients.append(Patient(pid, site, t, ev, tuple(slides), split, mpps or ()))  # type: ignore[arg-type]
    return patients


def _not_a_file(p: Path) -> str:
    """Why a slide path that exists is not a slide: a folder (a DICOM series is opened by one of its files)."""
    if p.is_dir():
        dcm = sorted(p.glob("*.dcm"))[:1]
        hint = f"; for a DICOM slide give one of its .dcm files (e.g. {dcm[0].name})" if dcm else ""
        return f"slide path is a folder, not a slide file: {p}{hint}"
    return f"slide path is not a regular file: {p}"


def _parse_slide_mpps(
    raw: Any, n_slides: int, src: str, row: int, problems: list[Problem]
) -> tuple[float | None, ...] | None:
    """Optional ``slide_mpp`` field: empty, one value for all the row's slides, or one per slide (``;``).

    Returns one entry per slide (None = from the slide's metadata), or None after recording a problem.
    """
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return (None,) * n_slides
    if isinstance(raw, str):
        parts: list[Any] = [x.strip() for x in raw.split(";")]
    else:
        parts = list(raw) if isinstance(raw, list | tuple) else [raw]
    if len(parts) == 1:
        parts = parts * n_slides
    if len(parts) != n_slides:
        problems.append(Problem(src, f"{len(parts)} slide_mpp values for {n_slides} slides", row, "slide_mpp", raw))
        return None
    out: list[float | None] = []
    for x in parts:
        if x == "":
            out.append(None)
            continue
        try:
            v = float(x)
        except (TypeError, ValueError):
            v = float("nan")
        if not (math.isfinite(v) and v > 0):
            msg = "slide_mpp must be a positive number (microns per pixel)"
            problems.append(Problem(src, msg, row, "slide_mpp", x))
            return None
        out.append(v)
    return tuple(out)


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
    return [str(r.get(src.id_column) or "").strip() for r in rows]


def _check_coverage(
    kind: str, file: Path, ids: list[str], cohort_ids: set[str], allow_missing: bool, problems: list[Problem]
) -> list[str]:
    warnings = []
    counts = Counter(ids)
    for pid, n in counts.items():
        if n > 1:
            problems.append(Problem(str(file), f"{kind} lists this patient {n} times", None, "patient_id", pid))
    for pid in sorted(set(ids) - cohort_ids):
        problems.append(Problem(str(file), f"patient in {kind} file but not in the cohort", None, "patient_id", pid))
    absent = sorted(cohort_ids - set(ids))
    if absent:
        if allow_missing:
            warnings.append(f"{len(absent)} cohort patient(s) have no {kind} data (masked): {absent[:5]}")
        else:
            for pid in absent:
                problems.append(
                    Problem(
                        str(file),
                        f"cohort patient has no {kind} row (set {kind}.allow_missing: true to mask instead)",
                        None,
                        "patient_id",
                        pid,
                    )
                )
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
    """What reading the omics and clinical files found; ``complete`` is False when one could not be read."""

    warnings: list[str] = field(default_factory=list)
    omics_ids: list[str] = field(default_factory=list)
    clinical_ids: list[str] = field(default_factory=list)
    complete: bool = True


def _check_sources(
    spec: Path,
    omics: OmicsSource | None,
    clinical: ClinicalSource | None,
    ids: set[str] | None,
    problems: list[Problem],
) -> _SourceCheck:
    """Read the omics and clinical files as training will and check their patients against ``ids`` (the ids
    of every manifest row, valid or not). ``ids`` None (the manifest itself is unreadable): only check that
    the files exist, so that one root cause is not reported again as every patient missing."""
    out = _SourceCheck()
    if omics is not None:
        if not omics.path.is_file():
            problems.append(Problem(str(spec), "omics file not found", None, "omics.path", str(omics.path)))
            out.complete = False
        elif ids is not None:
            try:
                out.omics_ids = read_omics_ids(omics, ids)
            except (ValueError, OSError) as e:
                problems.append(Problem(str(omics.path), str(e).removeprefix(f"{omics.path}: ")))
                out.complete = False
            else:
                out.warnings += _check_coverage("omics", omics.path, out.omics_ids, ids, omics.allow_missing, problems)
    if clinical is not None:
        if not clinical.path.is_file():
            problems.append(Problem(str(spec), "clinical file not found", None, "clinical.path", str(clinical.path)))
            out.complete = False
        elif ids is not None:
            try:
                out.clinical_ids = read_clinical_ids(clinical)
            except CohortError as e:
                problems += e.problems
                out.complete = False
            else:
                out.warnings += _check_coverage(
                    "clinical", clinical.path, out.clinical_ids, ids, clinical.allow_missing, problems
                )
    return out


def load_cohort(path: str | Path) -> Cohort:
    """Read and validate a cohort YAML (or a bare CSV manifest). Raises :class:`CohortError`.

    Every problem is collected before raising, and each root cause is reported once: a row rejected for
    its time or event still counts as a cohort patient when the omics and clinical files are checked, and
    an unreadable manifest or omics file is not reported again as every patient missing.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise CohortError([Problem(str(path), "cohort file not found")])
    root = path.parent
    problems: list[Problem] = []
    doc = _read_doc(path)
    if isinstance(doc.patients, str):
        manifest = Path(doc.patients)
        manifest = manifest if manifest.is_absolute() else root / manifest
        rows = _read_manifest(manifest, problems)
        src = str(manifest)
    else:
        rows, src = doc.patients, f"{path} (patients)"
        for i, r in enumerate(rows, start=1):
            missing = [c for c in REQUIRED_COLUMNS if c not in r]
            if missing:
                problems.append(Problem(src, f"missing required field(s) {missing}", i))
    patients = _parse_rows(rows, src, root, problems)
    if not rows and not problems:
        problems.append(Problem(src, "the cohort lists no patients"))

    def _abs(p: Path) -> Path:
        return p if p.is_absolute() else (root / p).resolve()

    omics = doc.omics.model_copy(update={"path": _abs(doc.omics.path)}) if doc.omics else None
    clinical = doc.clinical.model_copy(update={"path": _abs(doc.clinical.path)}) if doc.clinical else None
    known = {str(r.get("patient_id") or "").strip() for r in rows} - {""} if rows else None
    found = _check_sources(path, omics, clinical, known, problems)
    cohort = Cohort(
        doc.name,
        root,
        doc.time_unit,
        patients,
        omics,
        clinical,
        doc.slide_mpp,
        found.warnings,
        frozenset(found.omics_ids),
        frozenset(found.clinical_ids),
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
