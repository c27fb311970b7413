"""Typed site summaries: what one site shares about its training patients for the cohort-level normalisers.

:class:`OmicsSiteSummary` and :class:`ClinicalSiteSummary` (per-gene / per-column sufficient statistics, no
patient axis) are made by ``pipeline.omics`` and cross the federated boundary as plain JSON values
(``to_wire`` / ``from_wire``, float64 exact); a summary with unexpected fields, wrong shapes, impossible
counts or fewer than :data:`MIN_SUMMARY_PATIENTS` patients is refused naming the site and field.

The minimum-count rule (k, ``federated.min_count``): :func:`suppress_small_cells` is what a site applies before
sending, :func:`small_cells` what the disclosure policy checks. A cell is a count of patients: a category's
count, a column's missing count, a gene's or numeric column's number of observed values, and the count of
ones (and of zeros) of a 0/1 column (its ``sum``). A cell with 1..k-1 patients is suppressed: its counts and
sums are sent as 0 (a gene or numeric column is then left out of that site's contribution, a category or a
missing count is not sent); within a categorical column, further cells are suppressed (smallest first) until
the suppressed patients number 0 or at least k, so no suppressed count follows from the others and the
column's total. A gene's or numeric column's missing count is ``n_patients - n`` (and, for a clinical column,
``missing``): when it is 1..k-1 the observed count is coarsened to ``n_patients - k`` (:func:`coarsen_missing`:
the sums scaled by the same factor, so the site's mean and mean square are kept and only its weight shrinks;
``missing`` sent as 0), so that count cannot be derived; a column left with fewer than k is suppressed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


OMICS_SUMMARY = "histofuse-omics-summary/1"
CLINICAL_SUMMARY = "histofuse-clinical-summary/1"
MIN_SUMMARY_PATIENTS = 2  # a summary of one patient is that patient's values: refuse it


def _vector(dtype: type) -> BeforeValidator:
    """A 1-D array of ``dtype`` (no patient axis); int64 counts must be whole numbers (no silent truncation)."""

    def conv(v: Any) -> np.ndarray:
        a = np.asarray(v)
        if a.ndim != 1:
            raise ValueError(f"shape {list(a.shape)}; declared a vector (no patient axis)")
        if dtype is np.int64 and a.size and not np.all(np.mod(a, 1) == 0):
            raise ValueError("a count that is not a whole number")
        return a.astype(dtype)

    return BeforeValidator(conv)


Counts = Annotated[np.ndarray, _vector(np.int64)]
Sums = Annotated[np.ndarray, _vector(np.float64)]


def _check(model: Any, keys: tuple[str, ...], length: int, n_patients: int) -> None:
    """Every ``keys`` vector has ``length`` entries; the count ``n`` is within ``0..n_patients``."""
    for k in keys:
        if len(getattr(model, k)) != length:
            raise ValueError(f"{k} has length {len(getattr(model, k))}; declared [{length}]")
    _counts_within("n", model.n, n_patients)


def _counts_within(where: str, counts: Any, n: int) -> None:
    c = np.asarray(list(counts), np.float64)
    if c.size and (c.min() < 0 or c.max() > n):
        raise ValueError(f"{where} holds a count outside 0..{n} patients")


class _Summary(_Frozen):
    KIND: ClassVar[str] = ""
    PART: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        """Plain JSON values (arrays as lists; float64 round-trips exactly through ``json``), tagged by kind."""

        def plain(o: Any) -> Any:
            return (
                o.tolist()
                if isinstance(o, np.ndarray)
                else {k: plain(v) for k, v in o.items()}
                if isinstance(o, dict)
                else o
            )

        return {"kind": self.KIND, **plain(self.model_dump())}

    @classmethod
    def from_wire(cls, d: Any, site: str | None = None) -> Any:
        """The summary from :meth:`to_wire`'s dict; ``ValueError`` naming the site and field otherwise."""
        where = f"site {site}: {cls.PART} summary" if site is not None else f"{cls.PART} summary"
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
        if d.get("kind") != cls.KIND:
            raise ValueError(f"{where}: kind {d.get('kind')!r}, expected {cls.KIND!r}")
        try:
            return cls.model_validate({k: v for k, v in d.items() if k != "kind"})
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, x['loc'])) or '(summary)'}: {x['msg']}" for x in e.errors())
            raise ValueError(f"{where}: {msgs}") from None


class OmicsSiteSummary(_Summary):
    """Per-gene sufficient statistics of one site's training patients (no per-patient value).

    ``genes`` [G]; over the log-normalised expression ``x`` (missing values skipped): ``n`` [G] int64
    (patients with a value), ``sum``/``sumsq`` [G] float64 of ``x``, ``sum_expm1``/``sumsq_expm1`` [G]
    float64 of ``expm1(x)`` (scanpy's seurat HVG rule).
    """

    KIND: ClassVar[str] = OMICS_SUMMARY
    PART: ClassVar[str] = "omics"
    values: str
    genes: list[str]
    n_patients: int = Field(ge=MIN_SUMMARY_PATIENTS)
    n: Counts
    sum: Sums
    sumsq: Sums
    sum_expm1: Sums
    sumsq_expm1: Sums

    @model_validator(mode="after")
    def _shapes(self) -> OmicsSiteSummary:
        _check(self, ("n", "sum", "sumsq", "sum_expm1", "sumsq_expm1"), len(self.genes), self.n_patients)
        return self


class ClinicalNumericStats(_Frozen):
    """Sums over the observed values of the numeric clinical columns: ``n`` [C] int64, ``sum``/``sumsq`` [C]."""

    columns: list[str]
    n: Counts
    sum: Sums
    sumsq: Sums


class ClinicalSiteSummary(_Summary):
    """Per-column sufficient statistics of one site's training patients (no per-patient value).

    ``columns``: every column, in order; ``numeric``: :class:`ClinicalNumericStats`; ``categorical``:
    column -> {category: count}; ``missing``: column -> count of missing values.
    """

    KIND: ClassVar[str] = CLINICAL_SUMMARY
    PART: ClassVar[str] = "clinical"
    n_patients: int = Field(ge=MIN_SUMMARY_PATIENTS)
    columns: list[str]
    numeric: ClinicalNumericStats
    categorical: dict[str, dict[str, int]]
    missing: dict[str, int]

    @model_validator(mode="after")
    def _consistent(self) -> ClinicalSiteSummary:
        _check(self.numeric, ("n", "sum", "sumsq"), len(self.numeric.columns), self.n_patients)
        for where, names in (("numeric.columns", self.numeric.columns), ("categorical", self.categorical)):
            if unknown := sorted(set(names) - set(self.columns)):
                raise ValueError(f"{where} names column(s) {unknown} not in columns")
        _counts_within("missing", self.missing.values(), self.n_patients)
        for c, counts in self.categorical.items():
            _counts_within(f"categorical.{c}", counts.values(), self.n_patients)
        return self


SiteSummary = OmicsSiteSummary | ClinicalSiteSummary


def _small(c: Any, k: int) -> np.ndarray:
    c = np.asarray(c, np.float64)
    return (c > 0) & (c < k)


def _binary_small(n: np.ndarray, total: np.ndarray, sumsq: np.ndarray, k: int) -> np.ndarray:
    """0/1 columns (``sum == sumsq``: every value 0 or 1) whose count of ones or of zeros is 1..k-1."""
    binary = np.isclose(total, sumsq) & (n > 0)
    return binary & (_small(total, k) | _small(n - total, k))


def _missing_small(n: Any, n_patients: int, k: int) -> np.ndarray:
    """Observed columns (``n [C]`` > 0) whose missing count ``n_patients - n`` is 1..k-1."""
    n = np.asarray(n, np.float64)
    return (n > 0) & _small(n_patients - n, k)


def small_cells(summary: SiteSummary, k: int) -> list[str]:
    """The fields of ``summary`` that hold a count of 1..k-1 patients (empty: it satisfies the k rule)."""
    bad: list[str] = []
    if isinstance(summary, OmicsSiteSummary):
        bad += [f"omics.n[{summary.genes[i]}]" for i in np.flatnonzero(_small(summary.n, k))]
        miss = _missing_small(summary.n, summary.n_patients, k)
        return bad + [f"omics.n_patients - n[{summary.genes[i]}] (missing)" for i in np.flatnonzero(miss)]
    num = summary.numeric
    n, tot, sq = (np.asarray(x, np.float64) for x in (num.n, num.sum, num.sumsq))
    bad += [f"clinical.numeric.n[{num.columns[i]}]" for i in np.flatnonzero(_small(n, k))]
    miss = _missing_small(n, summary.n_patients, k)
    bad += [f"clinical.n_patients - numeric.n[{num.columns[i]}] (missing)" for i in np.flatnonzero(miss)]
    bad += [f"clinical.numeric.sum[{num.columns[i]}] (0/1)" for i in np.flatnonzero(_binary_small(n, tot, sq, k))]
    for c, counts in summary.categorical.items():
        bad += [f"clinical.categorical.{c}[{v}]" for v, x in counts.items() if 0 < x < k]
    bad += [f"clinical.missing[{c}]" for c, x in summary.missing.items() if 0 < x < k]
    return bad


def coarsen_missing(n: np.ndarray, n_patients: int, k: int, sums: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Observed counts ``n [C]`` whose missing count ``n_patients - n`` is 1..k-1 coarsened to ``n_patients - k``,
    each of ``sums`` (name -> ``[C]``) scaled by the same factor ``(n_patients - k) / n`` (the site's mean and mean
    square are unchanged); a column left with fewer than k observed values is zeroed. Returns ``(n, sums)``."""
    n = np.asarray(n, np.int64)
    off = _missing_small(n, n_patients, k)
    target = n_patients - k
    scale = np.where(off, (target if target >= k else 0) / np.maximum(n, 1), 1.0)
    new_n = np.where(off, target if target >= k else 0, n).astype(np.int64)
    return new_n, {name: np.asarray(v, np.float64) * scale for name, v in sums.items()}


def _suppress_column(cells: dict[str, int], k: int) -> set[str]:
    """Cells of one categorical column to suppress: those under k, then the smallest others until the
    suppressed total is 0 or at least k."""
    drop = {c for c, x in cells.items() if 0 < x < k}
    rest = sorted((x, c) for c, x in cells.items() if c not in drop and x > 0)
    while 0 < sum(cells[c] for c in drop) < k and rest:
        drop.add(rest.pop(0)[1])
    return drop


def suppress_small_cells(summary: SiteSummary, k: int) -> tuple[SiteSummary, list[str]]:
    """``summary`` with every cell of 1..k-1 patients suppressed (module docstring), and what was suppressed
    (field names, for the site's warning). The result passes :func:`small_cells`."""
    notes: list[str] = []
    if isinstance(summary, OmicsSiteSummary):
        keys = ("sum", "sumsq", "sum_expm1", "sumsq_expm1")
        if (miss := _missing_small(summary.n, summary.n_patients, k)).any():
            notes.append(f"omics: {int(miss.sum())} gene(s) missing in 1..{k - 1} patients (observed count coarsened)")
            n, sums = coarsen_missing(summary.n, summary.n_patients, k, {x: getattr(summary, x) for x in keys})
            summary = summary.model_copy(update={"n": n, **sums})
        off = _small(summary.n, k)
        if off.any():
            notes.append(f"omics: {int(off.sum())} gene(s) observed in 1..{k - 1} patients")
            return summary.model_copy(update={x: np.where(off, 0, getattr(summary, x)) for x in ("n", *keys)}), notes
        return summary, notes
    num = summary.numeric
    miss = _missing_small(num.n, summary.n_patients, k)
    notes += [f"clinical.numeric.{num.columns[i]} (missing in 1..{k - 1}: observed count coarsened)"
              for i in np.flatnonzero(miss)]  # fmt: skip
    n_c, sums = coarsen_missing(num.n, summary.n_patients, k, {"sum": num.sum, "sumsq": num.sumsq})
    n, tot, sq = np.asarray(n_c, np.float64), sums["sum"], sums["sumsq"]
    off = _small(n, k) | _binary_small(n, tot, sq, k)
    notes += [f"clinical.numeric.{num.columns[i]}" for i in np.flatnonzero(off)]
    numeric = num.model_copy(update={"n": np.where(off, 0, n_c), "sum": np.where(off, 0.0, tot),
                                     "sumsq": np.where(off, 0.0, sq)})  # fmt: skip
    categorical, missing = {}, dict(summary.missing)
    for i in np.flatnonzero(miss | off):  # nor its missing count, from which n_patients - missing = n would follow
        missing[num.columns[i]] = 0
    for c, counts in summary.categorical.items():
        cells = {**{f"={v}": int(x) for v, x in counts.items()}, "missing": int(summary.missing.get(c, 0))}
        drop = _suppress_column(cells, k)
        notes += [f"clinical.categorical.{c}[{x.removeprefix('=')}]" for x in sorted(drop - {"missing"})]
        if "missing" in drop:
            notes.append(f"clinical.missing.{c}")
            missing[c] = 0
        categorical[c] = {v: x for v, x in counts.items() if f"={v}" not in drop}
    out = summary.model_copy(update={"numeric": numeric, "categorical": categorical, "missing": missing})
    return out, notes


SUMMARY_PARTS: dict[str, type[_Summary]] = {"omics": OmicsSiteSummary, "clinical": ClinicalSiteSummary}


def site_summaries_from_wire(d: Any, site: str | None = None) -> dict[str, SiteSummary]:
    """One site's ``{"omics": ..., "clinical": ...}`` wire dicts (either may be absent) as typed summaries."""
    where = f"site {site}: " if site is not None else ""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}site summaries: expected a mapping, got {type(d).__name__}")
    if extra := sorted(set(d) - set(SUMMARY_PARTS)):
        raise ValueError(f"{where}undeclared summary part(s) {extra}; declared {sorted(SUMMARY_PARTS)}")
    return {part: SUMMARY_PARTS[part].from_wire(v, site) for part, v in d.items()}


def drop_empty_columns(summaries: list[ClinicalSiteSummary]) -> tuple[list[ClinicalSiteSummary], list[str]]:
    """The clinical summaries without the columns that hold no value at any site once small cells are
    suppressed (a numeric column observed in no patient, a categorical one with no category left), and their
    names: a column suppressed everywhere is left out of the model instead of failing the run."""
    if not summaries:
        return summaries, []
    empty = []
    for c in summaries[0].columns:
        stats = [s.numeric for s in summaries if c in s.numeric.columns]
        if stats:
            n = sum(int(np.asarray(x.n)[x.columns.index(c)]) for x in stats)
        else:
            n = sum(sum(s.categorical.get(c, {}).values()) for s in summaries)
        if n == 0:
            empty.append(c)
    if not empty:
        return summaries, []
    out = []
    for s in summaries:
        keep = [i for i, c in enumerate(s.numeric.columns) if c not in empty]
        num = s.numeric.model_copy(update={"columns": [s.numeric.columns[i] for i in keep], "n": s.numeric.n[keep],
                                           "sum": s.numeric.sum[keep], "sumsq": s.numeric.sumsq[keep]})  # fmt: skip
        update = {
            "columns": [c for c in s.columns if c not in empty],
            "numeric": num,
            "categorical": {c: v for c, v in s.categorical.items() if c not in empty},
            "missing": {c: v for c, v in s.missing.items() if c not in empty},
        }
        out.append(s.model_copy(update=update))
    return out, empty
