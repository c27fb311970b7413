"""The patient manifest: its rows (a CSV file or the YAML's inline list) turned into :class:`Patient` records.

:func:`read_manifest` reads the CSV and checks its required columns; :func:`parse_rows` checks each row's
fields (id, site, time, event, slides, slide_mpp, split) and keeps the valid rows, recording a
:class:`~data_specs.problems.Problem` naming the row, field and value for everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_specs.problems import Problem
from data_specs.tables import FLOAT32_MAX, read_csv_dicts

Split = Literal["train", "val", "test"]
REQUIRED_COLUMNS = ("patient_id", "site", "time", "event")


@dataclass(frozen=True)
class Patient:
    patient_id: str
    site: str
    time: float
    event: bool
    slides: tuple[Path, ...] = ()
    split: Split | None = None
    slide_mpps: tuple[float | None, ...] = ()  # per slide, from the manifest's optional slide_mpp column


def read_manifest(path: Path, problems: list[Problem]) -> list[dict[str, Any]]:
    """The rows of a CSV manifest, or ``[]`` after recording why it cannot be used."""
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


def parse_rows(rows: list[dict[str, Any]], src: str, root: Path, problems: list[Problem]) -> list[Patient]:
    """The valid rows as patients (slide paths resolved against ``root``); every invalid field is recorded
    in ``problems`` (``src`` names the manifest, rows are 1-based)."""
    patients: list[Patient] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=1):
        p = _parse_row(row, i, src, root, seen, problems)
        if p is not None:
            patients.append(p)
    return patients


def _parse_row(
    row: dict[str, Any], i: int, src: str, root: Path, seen: dict[str, int], problems: list[Problem]
) -> Patient | None:
    """One row as a patient, or None after recording its problems (every field is checked either way)."""
    n_before = len(problems)
    pid = _parse_id(row, i, src, seen, problems)
    site = str(row.get("site") or "").strip()
    if not site:
        problems.append(Problem(src, "site is empty", i, "site", row.get("site")))
    t = _parse_time(row.get("time"), i, src, problems)
    ev = _parse_event(row.get("event"), i, src, problems)
    slides = _parse_slides(row.get("slides") or [], i, src, root, problems)
    mpps = _parse_slide_mpps(row.get("slide_mpp"), len(slides), src, i, problems)
    split = (str(row.get("split") or "").strip().lower()) or None
    if split is not None and split not in ("train", "val", "test"):
        problems.append(Problem(src, "split must be train, val or test", i, "split", row.get("split")))
    if len(problems) > n_before or pid is None or t is None or ev is None or mpps is None:
        return None
    return Patient(pid, site, t, ev, tuple(slides), split, mpps)  # type: ignore[arg-type]


def _parse_id(row: dict[str, Any], i: int, src: str, seen: dict[str, int], problems: list[Problem]) -> str | None:
    """The row's patient id, or None when empty or already used (``seen``: id -> first row)."""
    pid = str(row.get("patient_id") or "").strip()
    if not pid:
        problems.append(Problem(src, "patient_id is empty", i, "patient_id", row.get("patient_id")))
        return None
    if pid in seen:
        problems.append(Problem(src, f"duplicate patient_id (first at row {seen[pid]})", i, "patient_id", pid))
        return None
    seen[pid] = i
    return pid


def _parse_time(raw: Any, i: int, src: str, problems: list[Problem]) -> float | None:
    """A finite time >= 0 within float32 range, or None after recording a problem."""
    try:
        t = float(raw)
    except (TypeError, ValueError):
        problems.append(Problem(src, "time is not a number", i, "time", raw))
        return None
    if not math.isfinite(t) or t < 0:
        problems.append(Problem(src, "time must be a finite number >= 0", i, "time", raw))
        return None
    if t > FLOAT32_MAX:
        msg = f"time is beyond the float32 range training uses (at most {FLOAT32_MAX:.4g})"
        problems.append(Problem(src, msg, i, "time", raw))
        return None
    return t


def _parse_event(raw: Any, i: int, src: str, problems: list[Problem]) -> bool | None:
    """``0``/``1`` (also ``0.0``, ``1.0``, ``false``, ``true``) as a bool, or None after recording a problem."""
    ev_s = str(raw).strip().lower()
    if ev_s in ("1", "1.0", "true"):
        return True
    if ev_s in ("0", "0.0", "false"):
        return False
    problems.append(Problem(src, "event must be 0 or 1", i, "event", raw))
    return None


def _parse_slides(raw: str | list[Any], i: int, src: str, root: Path, problems: list[Problem]) -> list[Path]:
    """Slide paths (``;``-separated in a CSV, relative to ``root``); a missing or non-file path is recorded
    as a problem but still listed, so that the slide_mpp count is checked against every slide."""
    if isinstance(raw, str):
        raw = [s for s in (x.strip() for x in raw.split(";")) if s]
    slides = []
    for s in raw:
        p = Path(s)
        p = p if p.is_absolute() else root / p
        if not p.exists():
            problems.append(Problem(src, f"slide file not found: {p}", i, "slides", s))
        elif not p.is_file():
            problems.append(Problem(src, _not_a_file(p), i, "slides", s))
        slides.append(p)
    return slides


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
