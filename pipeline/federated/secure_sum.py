"""Secure sums, Flower-free: what a site's numbers look like when the server may learn only their sum over sites.

Under ``federated.secagg`` every phase whose server-side use is a sum (the statistics exchange, the discrete-time
histogram, each training round's validation (``evaluate``), the post-training ``finish.*`` rounds) sends its
numbers through Flower's SecAgg+ instead of in plain text (``secure_sum_app.py`` drives it). SecAgg+ sums integer
vectors modulo 2**32 after quantising floats to ``[-clip, clip]``; here every number becomes whole SecAgg+ inputs
that its quantisation leaves exact:

- a count (``Field.integer``): one integer in ``[-2**23, 2**23)``;
- a real: fixed point with :data:`FRAC_BITS` fractional bits, written as :data:`LIMBS` balanced base-2**24
  digits, each in ``[-2**23, 2**23)``. The digits are summed separately and recombined exactly (Python ints).

With ``clip = 2**23`` and ``quantisation_range = 2**24`` Flower's quantiser maps a digit ``d`` to ``d + 2**23``,
a whole number, so its stochastic rounding never moves it, and up to :data:`MAX_SITES` sites sum without wrapping
the modulus. The sum is then exact for counts; for reals it is the exact sum of the sites' values rounded to
``2**-FRAC_BITS`` each: ``|secure - exact| <= n_sites * 2**-(FRAC_BITS + 1)`` before the one final rounding to
float64 (tested). A real needs ``|x| < 2**(LIMBS * 24 - FRAC_BITS - 1)`` (2**63).

A phase's :data:`Layout` (which fields, how long) is fixed by the request before any site computes, so the
vector has no site-dependent shape; a site with nothing to send (under k) sends zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_specs.summaries import ClinicalNumericStats, ClinicalSiteSummary, OmicsSiteSummary, SiteSummary
from pipeline.stats.curves import RISK_EDGES, TIME_BINS

DIGIT_BITS = 24
LIMBS = 5
FRAC_BITS = 56
HALF = 2 ** (DIGIT_BITS - 1)
CLIP = float(HALF)  # SecAgg+ clipping_range: a digit d in [-2**23, 2**23) is quantised to d + 2**23 exactly
QUANTISATION = 2**DIGIT_BITS  # SecAgg+ quantization_range (2 * CLIP: one quantisation step per unit)
MODULUS = 2**32  # SecAgg+ modulus_range
MAX_SITES = MODULUS // QUANTISATION - 1  # sites whose digits (and weights) sum without wrapping the modulus
GROUP_PREFIX = "secure_sum:"  # Flower group id of a secure-sum round: the prefix and the phase
REQUEST_KEY = "histofuse.secure_sum"  # the train config key that asks a site for a phase's secure-sum vector


def secure_phase(group_id: str) -> str | None:
    """The phase of a secure-sum round's Flower group id (:data:`GROUP_PREFIX` + phase), None for any other."""
    return group_id.removeprefix(GROUP_PREFIX) if group_id.startswith(GROUP_PREFIX) else None


@dataclass(frozen=True)
class Field:
    """One named part of a secure-sum vector: ``length`` numbers, counts (``integer``) or reals."""

    name: str
    length: int
    integer: bool = False

    @property
    def width(self) -> int:
        return self.length * (1 if self.integer else LIMBS)


Layout = tuple[Field, ...]


def layout_size(layout: Layout) -> int:
    """The number of SecAgg+ inputs of ``layout``."""
    return sum(f.width for f in layout)


def _digits(m: int) -> list[int]:
    out = []
    for _ in range(LIMBS):
        d = (m + HALF) % QUANTISATION - HALF
        out.append(d)
        m = (m - d) // QUANTISATION
    if m:
        raise ValueError("a real outside the secure sum's range")
    return out


def encode(layout: Layout, values: Mapping[str, Any]) -> np.ndarray:
    """``values`` (field name -> number or ``[length]`` numbers; a missing field is zeros) as the SecAgg+ input
    vector ``[layout_size]`` float64 of whole numbers in ``[-2**23, 2**23)``. ``ValueError`` naming the field
    for a wrong length, a non-finite number, a count that is not whole or a number out of range."""
    if extra := sorted(set(values) - {f.name for f in layout}):
        raise ValueError(f"secure sum: undeclared field(s) {extra}")
    parts = []
    for f in layout:
        v = np.asarray(values.get(f.name, np.zeros(f.length)), np.float64).reshape(-1)
        if v.size != f.length:
            raise ValueError(f"secure sum: {f.name} has {v.size} value(s), declared {f.length}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"secure sum: {f.name} holds a value that is not finite")
        if f.integer:
            if np.any(v != np.round(v)) or np.any(np.abs(v) >= HALF):
                raise ValueError(f"secure sum: {f.name} holds a count that is not whole or not below {HALF}")
            parts.append(v)
            continue
        try:
            parts.append(np.asarray([d for x in v for d in _digits(round(math.ldexp(float(x), FRAC_BITS)))], float))
        except ValueError:
            raise ValueError(f"secure sum: {f.name} holds a real of magnitude 2**63 or more") from None
    return np.concatenate(parts) if parts else np.zeros(0)


def decode(layout: Layout, total: np.ndarray) -> dict[str, np.ndarray]:
    """The summed fields from the summed vector ``total [layout_size]`` (whole numbers): counts as int64, reals
    recombined exactly and rounded once to float64."""
    t = np.rint(np.asarray(total, np.float64)).astype(np.int64)
    if t.size != layout_size(layout):
        raise ValueError(f"secure sum: {t.size} summed value(s), the layout declares {layout_size(layout)}")
    out, at = {}, 0
    base = [QUANTISATION**j for j in range(LIMBS)]
    for f in layout:
        chunk = t[at : at + f.width]
        at += f.width
        if f.integer:
            out[f.name] = chunk.copy()
            continue
        limbs = chunk.reshape(f.length, LIMBS).tolist()
        out[f.name] = np.asarray([math.ldexp(float(sum(d * b for d, b in zip(x, base, strict=True))), -FRAC_BITS)
                                  for x in limbs], np.float64)  # fmt: skip
    return out


# ---- the finish.* rounds and the discrete-time histogram: fixed layouts from the request


def phase_layout(phase: str, request: Mapping[str, Any]) -> Layout:
    """The layout of a phase whose reply is a flat sum (``finish.*``, ``statistics.event_histogram``)."""
    if phase == "finish.moments":
        return (Field("n", 1, True), Field("sum", 1), Field("sumsq", 1))
    if phase == "finish.cutpoints":
        return (Field("counts", len(RISK_EDGES) - 1, True),)
    if phase in ("finish.horizons", "statistics.event_histogram"):
        return (Field("counts", int(request.get("bins", TIME_BINS)), True),)
    if phase == "finish.baseline":
        k = len(request["grid"])
        return (Field("events", k, True), Field("risk_sum", k))
    if phase == "finish.evaluate":
        return (Field("n_test", 1, True), Field("test_events", 1, True), Field("concordant", 1), Field("comparable", 1))
    if phase == "statistics.summaries":
        return summaries_layout(request["layout"])
    if phase == "evaluate":  # a training round's validation (policy.SECURE_EVAL_FIELDS): counts, then reals
        counts = (Field("sites", 1, True), Field("n_val", 1, True), Field("val_events", 1, True))
        return (*counts, Field("loss_sum", 1), Field("comparable", 1, True), Field("concordant", 1))
    raise ValueError(f"secure sum: no layout for phase {phase!r}")


SUMMED_KEYS = {  # the keys of a plain reply that, under SecAgg+, leave a site only inside a secure sum
    "finish.moments": {"n", "sum", "sumsq"},
    "finish.cutpoints": {"counts"},
    "finish.horizons": {"counts"},
    "finish.baseline": {"events", "risk_sum"},
    "finish.evaluate": {"n_test", "test_events", "concordant", "comparable"},
}


# ---- the statistics exchange: names in plain (the layout), every number in the secure sum

CEILING_DECADES = range(-3, 10)  # follow-up ceilings from 1e-3 to 1e10 in the cohort's time unit


def _ceiling_grid() -> np.ndarray:
    """Every value :func:`~pipeline.stats.curves.nice_ceil` can give in :data:`CEILING_DECADES`, increasing."""
    vals = {float(np.float64(m) * (10.0 ** (np.float64(e) - 1))) for e in CEILING_DECADES for m in range(10, 101)}
    return np.asarray(sorted(vals))


CEILING_GRID = _ceiling_grid()


def ceiling_one_hot(ceiling: float) -> np.ndarray:
    """A follow-up ceiling (0: none) as a one-hot ``[len(CEILING_GRID)]``: the sum's largest filled cell is the
    largest ceiling (a maximum made a sum); ``ValueError`` for a value off the grid."""
    out = np.zeros(len(CEILING_GRID), np.int64)
    if ceiling == 0:
        return out
    i = int(np.argmin(np.abs(CEILING_GRID - ceiling)))
    if not math.isclose(CEILING_GRID[i], ceiling, rel_tol=1e-9):
        raise ValueError(f"follow-up ceiling {ceiling!r} is not on the pre-agreed grid of 2-digit values")
    out[i] = 1
    return out


def largest_ceiling(counts: np.ndarray) -> float:
    """The largest ceiling in a summed one-hot histogram, 0.0 when empty."""
    nz = np.flatnonzero(np.asarray(counts))
    return float(CEILING_GRID[nz[-1]]) if nz.size else 0.0


def summary_names(summaries: Mapping[str, SiteSummary]) -> dict:
    """What a site sends in plain under SecAgg+ for its summaries: names only (genes, columns, numeric columns,
    the categories left after suppression, the omics value kind), no count."""
    out: dict = {}
    if (o := summaries.get("omics")) is not None:
        out["omics"] = {"values": o.values, "genes": list(o.genes)}
    if (c := summaries.get("clinical")) is not None:
        cats = {col: sorted(v for v, x in counts.items() if x > 0) for col, counts in c.categorical.items()}
        out["clinical"] = {"columns": list(c.columns), "numeric": list(c.numeric.columns), "categories": cats}
    return out


def merge_names(names: list[dict]) -> dict:
    """The consortium's summary layout from the sites' :func:`summary_names` (in node order): genes measured at
    every site with omics (first site's order), one omics value kind, the same clinical columns everywhere,
    numeric where numeric at every site, the union of the categories. ``ValueError`` as the plain fit raises."""
    om = [x["omics"] for x in names if "omics" in x]
    cl = [x["clinical"] for x in names if "clinical" in x]
    out: dict = {}
    if om:
        if len(vals := {x["values"] for x in om}) > 1:
            raise ValueError(f"sites disagree on omics values: {sorted(vals)}; every site must declare the same")
        common = set(om[0]["genes"]).intersection(*(x["genes"] for x in om[1:]))
        out["omics"] = {"values": om[0]["values"], "genes": [g for g in om[0]["genes"] if g in common]}
    if cl:
        cols = cl[0]["columns"]
        if bad := [k for k, x in enumerate(cl) if x["columns"] != cols]:
            raise ValueError(f"site summary {bad[0]} has clinical columns {cl[bad[0]]['columns']}, site 0 has {cols}")
        numeric = [c for c in cols if all(c in x["numeric"] for x in cl)]
        if mixed := [c for c in cols if c not in numeric and any(c in x["numeric"] for x in cl)]:
            raise ValueError(
                f"clinical column '{mixed[0]}' is numeric at some sites and categorical at others; "
                "list it in the clinical section's categorical to treat it as categorical everywhere"
            )
        cats = {c: sorted(set().union(*(x["categories"].get(c, []) for x in cl))) for c in cols if c not in numeric}
        out["clinical"] = {"columns": cols, "numeric": numeric, "categories": cats}
    return out


def summaries_layout(merged: Mapping[str, Any]) -> Layout:
    """The secure-sum layout of the statistics exchange on the merged names (and the follow-up one-hot)."""
    fields: list[Field] = []
    if (o := merged.get("omics")) is not None:
        g = len(o["genes"])
        fields += [Field("omics.n_patients", 1, True), Field("omics.n", g, True)]
        fields += [Field(f"omics.{k}", g) for k in ("sum", "sumsq", "sum_expm1", "sumsq_expm1")]
    if (c := merged.get("clinical")) is not None:
        m = len(c["numeric"])
        fields += [Field("clinical.n_patients", 1, True), Field("clinical.numeric.n", m, True)]
        fields += [Field("clinical.numeric.sum", m), Field("clinical.numeric.sumsq", m)]
        fields += [Field("clinical.categorical", sum(len(v) for v in c["categories"].values()), True)]
        fields.append(Field("clinical.missing", len(c["columns"]), True))
    fields.append(Field("follow_up", len(CEILING_GRID), True))
    return tuple(fields)


def summaries_values(summaries: Mapping[str, SiteSummary], merged: Mapping[str, Any], ceiling: float) -> dict:
    """One site's summaries (cells under k already suppressed) on the merged layout: zeros for a modality it
    does not summarise; its genes reordered to the layout's."""
    out: dict = {"follow_up": ceiling_one_hot(ceiling)}
    if (o := summaries.get("omics")) is not None and "omics" in merged:
        pos = {g: i for i, g in enumerate(o.genes)}
        ix = np.asarray([pos[g] for g in merged["omics"]["genes"]], int)
        out["omics.n_patients"] = o.n_patients
        for k in ("n", "sum", "sumsq", "sum_expm1", "sumsq_expm1"):
            out[f"omics.{k}"] = np.asarray(getattr(o, k), np.float64)[ix]
    if (c := summaries.get("clinical")) is not None and "clinical" in merged:
        lay = merged["clinical"]
        pos = {col: i for i, col in enumerate(c.numeric.columns)}
        ix = np.asarray([pos[col] for col in lay["numeric"]], int)
        out["clinical.n_patients"] = c.n_patients
        for k in ("n", "sum", "sumsq"):
            out[f"clinical.numeric.{k}"] = np.asarray(getattr(c.numeric, k), np.float64)[ix]
        cats = [c.categorical.get(col, {}).get(v, 0) for col, vs in lay["categories"].items() for v in vs]
        out["clinical.categorical"] = np.asarray(cats, np.float64)
        out["clinical.missing"] = np.asarray([c.missing.get(col, 0) for col in lay["columns"]], np.float64)
    return out


def summaries_from_sum(merged: Mapping[str, Any], total: Mapping[str, np.ndarray]) -> dict[str, SiteSummary]:
    """The consortium's summed summaries (one "site" holding every site's counts and sums), which the plain
    fit (``omics.normalise.fit_normalisers``) turns into the same normalisers as the per-site summaries."""
    out: dict[str, SiteSummary] = {}
    if (o := merged.get("omics")) is not None and int(total["omics.n_patients"][0]) > 0:
        out["omics"] = OmicsSiteSummary(
            values=o["values"], genes=o["genes"], n_patients=int(total["omics.n_patients"][0]),
            **{k: total[f"omics.{k}"] for k in ("n", "sum", "sumsq", "sum_expm1", "sumsq_expm1")},
        )  # fmt: skip
    if (c := merged.get("clinical")) is not None and int(total["clinical.n_patients"][0]) > 0:
        counts, cats, at = total["clinical.categorical"], {}, 0
        for col, vs in c["categories"].items():
            cats[col] = {v: int(x) for v, x in zip(vs, counts[at : at + len(vs)], strict=True) if x > 0}
            at += len(vs)
        num = ClinicalNumericStats(
            columns=c["numeric"], n=total["clinical.numeric.n"], sum=total["clinical.numeric.sum"],
            sumsq=total["clinical.numeric.sumsq"],
        )  # fmt: skip
        missing = {col: int(x) for col, x in zip(c["columns"], total["clinical.missing"], strict=True)}
        out["clinical"] = ClinicalSiteSummary(n_patients=int(total["clinical.n_patients"][0]), columns=c["columns"],
                                              numeric=num, categorical=cats, missing=missing)  # fmt: skip
    return out
