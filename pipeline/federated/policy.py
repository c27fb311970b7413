"""The disclosure policy: the one check every message a site sends passes before it leaves the site.

:func:`check_site_message` compares a reply with a declared schema (which keys, which types, which shapes)
and with what the site knows about itself (:class:`SiteFacts`: its patient and event counts, the model's
parameter shapes), so a value that is not the declared aggregate fails, e.g. a survival time sent as
``num_examples``, as the allowed metric ``events``, or as an extra field of a site summary. Any aggregate
must cover at least ``min_count`` patients. Flower-free: ``client_app.py`` calls it from a ClientApp mod.

The minimum-count rule (k = ``federated.min_count``, default :data:`MIN_COUNT` = 10): no aggregate over fewer
than k patients or events leaves a site. A model update needs at least k training patients (and k training
events when updates are weighted by events); ``train_events`` travels only when it is at least k; a validation
reply carries metrics only from at least k validation patients and k validation events (otherwise no metric
and ``num_examples`` 0 when the site has fewer than k validation patients); a site summary has no cell of
1..k-1 patients (:func:`data_specs.summaries.small_cells`; sites suppress them first with
:func:`data_specs.summaries.suppress_small_cells`); a histogram has no bin of 1..k-1 patients.

What it cannot catch: a float metric (``train_loss``, ``loss_sum``, ``cindex``) is a real number a
modified client could choose freely within its range; those channels are closed only by not sending
them in plain text, which DP and SecAgg+ runs do (:func:`evaluation_withheld`: no fit metric, and no plain
evaluation metric nor validation count, unless ``federated.secagg_eval_plain`` sends the evaluation replies plain
under SecAgg+). Under SecAgg+ a training reply's plain weight is 1 (:func:`check_fit_reply`): the site's real
weight travels only inside the masked vector (Flower's ``secaggplus_mod`` multiplies the update by
``weight / secagg_max_weight`` before masking and appends that ratio to the vector), so the server learns only the
consortium's total weight.

Validation under SecAgg+ (:func:`secure_evaluation`: ``federated.secagg``, no DP, not ``secagg_eval_plain``): after
each training round every site sends :data:`SECURE_EVAL_FIELDS` for the round's global weights (whether it has
validation patients, their count, their event count, the loss sum of the plain reply, comparable and concordant
pairs) only inside a SecAgg+ secure sum (phase ``evaluate``, ledger ``evaluate.secagg.<stage>``), checked first by
:func:`check_secure_evaluation`. A site takes part with any number of validation patients, also fewer than k: the
minimum-count rule applies to what the server sees, the decoded totals (:func:`secure_totals_rule`): the round has
a validation C-index and loss only when at least two sites with validation patients are in the sum and the sum
holds at least k validation patients and k validation events; otherwise it has none (as a plain round in which
every site is under k). What the server learns per round: those consortium totals (sites with validation
patients, patients, events, loss sum, comparable and concordant pairs), nothing per site. SecAgg+'s usual
assumption bounds it: the server colluding with every other site in the sum (or with enough of them to reach the
reconstruction threshold, ``federated.secagg_threshold``) could subtract their values and learn one site's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from data_specs.config import FederatedConfig
from data_specs.summaries import site_summaries_from_wire, small_cells

MIN_COUNT = 10  # k: patients (or events) behind any aggregate a site sends (federated.min_count's default)

FIT_METRICS = {"train_loss": float, "train_events": float}
EVAL_METRICS = {"cindex": float, "concordant": float, "comparable": float, "loss_sum": float, "events": float}


class DisclosureError(ValueError):
    """A site message that is not what the protocol declares (raised at the site: nothing is sent)."""


@dataclass(frozen=True)
class SiteFacts:
    """What the site knows about itself, against which its replies are checked."""

    site: str
    n_train: int
    n_train_events: int
    n_val: int
    n_val_events: int
    shapes: tuple[tuple[int, ...], ...]  # trainable parameter shapes, in order
    min_count: int = MIN_COUNT
    eval_metrics: bool = True  # False: no plain evaluation metric in this run (:func:`evaluation_withheld`)
    secagg: bool = False  # SecAgg+: a training reply's plain weight is 1 and it carries no metric


def evaluation_withheld(fc: FederatedConfig) -> str | None:
    """Why no site sends a plain evaluation reply with metrics in this run, or None when it does (subject to k).

    Under DP (``dp_noise`` > 0) the accountant covers the aggregated updates only: a validation C-index, pair
    count or loss would leave un-noised and unaccounted, so none is sent at all. Under SecAgg+ a plain reply
    would bypass the masks, so none is sent in plain; the validation goes as a secure sum instead
    (:func:`secure_evaluation`). ``federated.secagg_eval_plain=true`` sends the plain replies under SecAgg+ (the
    server then sees each site's validation scalars).
    """
    if fc.dp_noise > 0:
        return "federated.dp_noise > 0 (evaluation replies are not covered by the DP accountant)"
    if fc.secagg and not fc.secagg_eval_plain:
        return "federated.secagg (validation leaves a site only inside a secure sum)"
    return None


def secure_evaluation(fc: FederatedConfig) -> bool:
    """Whether each round's validation goes as a SecAgg+ secure sum: SecAgg+ on, no DP, not ``secagg_eval_plain``."""
    return fc.secagg and fc.dp_noise <= 0 and not fc.secagg_eval_plain


# One site's part of a round's secure validation sum (``secure_sum.phase_layout("evaluate")``): counts, then reals
SECURE_EVAL_FIELDS = ("sites", "n_val", "val_events", "loss_sum", "comparable", "concordant")


def check_secure_evaluation(facts: SiteFacts, values: Mapping[str, Any]) -> None:
    """A site's values for the secure validation sum, before masking: exactly :data:`SECURE_EVAL_FIELDS`; ``sites``
    1 with validation patients (0 without), ``n_val`` and ``val_events`` the site's counts, pair counts possible for
    ``n_val`` patients, a finite loss sum (0 without validation events)."""
    if set(values) != set(SECURE_EVAL_FIELDS):
        raise _fail(facts, f"secure validation: fields {sorted(values)}, declared {list(SECURE_EVAL_FIELDS)}")
    v = {k: float(values[k]) for k in SECURE_EVAL_FIELDS}
    _check_count(facts, "secure validation n_val", v["n_val"], {facts.n_val})
    _check_count(facts, "secure validation val_events", v["val_events"], {facts.n_val_events})
    _check_count(facts, "secure validation sites", v["sites"], {int(facts.n_val > 0)})
    pairs = facts.n_val * (facts.n_val - 1) / 2
    comp, conc = v["comparable"], v["concordant"]
    if not (comp.is_integer() and 0 <= comp <= pairs and 0 <= conc <= comp and (2 * conc).is_integer()):
        raise _fail(facts, f"secure validation: pair counts {conc}/{comp} impossible for {facts.n_val} patients")
    if not math.isfinite(v["loss_sum"]) or (facts.n_val_events == 0 and v["loss_sum"] != 0.0):
        raise _fail(facts, f"secure validation: loss_sum = {v['loss_sum']!r}")


def secure_totals_rule(sites: int, n_val: int, val_events: int, k: int) -> str | None:
    """Why a round's decoded secure validation totals give no validation, None when they do: at least two sites
    with validation patients in the sum, and at least ``k`` validation patients and ``k`` events in it."""
    if sites < 2:
        return f"{sites} site(s) with validation patients in the secure sum (at least 2 needed)"
    if min(n_val, val_events) < k:
        return f"{n_val} validation patient(s), {val_events} event(s) in the sum: fewer than federated.min_count={k}"
    return None


def _fail(facts: SiteFacts, what: str) -> DisclosureError:
    return DisclosureError(f"site {facts.site}: disclosure policy: {what}")


def _check_metrics(facts: SiteFacts, metrics: Mapping[str, Any], allowed: dict[str, type]) -> None:
    extra = set(metrics) - set(allowed) - {"site"}
    if extra:
        raise _fail(facts, f"undeclared metric(s) {sorted(extra)}; allowed {sorted(allowed)}")
    if metrics.get("site", facts.site) != facts.site:
        raise _fail(facts, f"metric 'site' is {metrics['site']!r}")
    for k, v in metrics.items():
        if k != "site" and not isinstance(v, allowed[k]):
            raise _fail(facts, f"metric {k!r} is {type(v).__name__}, declared {allowed[k].__name__}")


def _check_count(facts: SiteFacts, field: str, value: Any, expected: set[int]) -> None:
    if isinstance(value, bool) or not float(value).is_integer() or int(value) not in expected:
        raise _fail(facts, f"{field} = {value!r} is not the site's count ({sorted(expected)})")


def check_fit_reply(facts: SiteFacts, num_examples: int, metrics: Mapping[str, Any], shapes: list[tuple]) -> None:
    """A train reply: the update's shapes (none under SecAgg+), a weight that is the site's training patient
    or event count (1 under DP), and only the declared metrics, ``train_events`` equal to the site's count. Under
    SecAgg+ (``facts.secagg``) the plain weight is 1 and no metric is sent: both would bypass the masks."""
    if shapes and tuple(map(tuple, shapes)) != facts.shapes:
        raise _fail(facts, f"update shapes {shapes} are not the model's trainable parameters")
    if facts.secagg:  # the real weight is inside the masked vector: 1 here is no count of patients or events
        _check_count(facts, "num_examples (plain, under SecAgg+)", num_examples, {1})
        if extra := sorted(set(metrics) - {"site"}):
            raise _fail(facts, f"training metric(s) {extra} in plain text under federated.secagg")
        if facts.n_train < facts.min_count:
            raise _fail(facts, f"{facts.n_train} training patients, fewer than the minimum count {facts.min_count}")
        return
    _check_count(facts, "num_examples", num_examples, {facts.n_train, facts.n_train_events, 1})
    if facts.n_train < facts.min_count:
        raise _fail(facts, f"{facts.n_train} training patients, fewer than the minimum count {facts.min_count}")
    if num_examples == facts.n_train_events != facts.n_train and 0 < num_examples < facts.min_count:
        raise _fail(facts, f"weight {num_examples} training events, fewer than the minimum count {facts.min_count}")
    _check_metrics(facts, metrics, FIT_METRICS)
    if "train_events" in metrics:
        _check_count(facts, "train_events", metrics["train_events"], {facts.n_train_events})
        if facts.n_train_events < facts.min_count:
            raise _fail(facts, f"train_events: {facts.n_train_events}, fewer than the minimum count {facts.min_count}")


def check_evaluate_reply(facts: SiteFacts, num_examples: int, metrics: Mapping[str, Any]) -> None:
    """An evaluate reply: ``num_examples`` and ``events`` are the site's validation counts, pair counts
    are within what ``n_val`` patients allow, the C-index is in [0, 1]; in a run that withholds evaluation
    metrics (``facts.eval_metrics`` False: DP, SecAgg+) no metric at all and ``num_examples`` 0."""
    if not facts.eval_metrics:
        _check_count(facts, "num_examples", num_examples, {0})
        if extra := sorted(set(metrics) - {"site"}):
            raise _fail(facts, f"evaluation metric(s) {extra} in a run that sends none (DP or SecAgg+)")
        return
    _check_count(facts, "num_examples", num_examples, {facts.n_val} if facts.n_val >= facts.min_count else {0})
    _check_metrics(facts, metrics, EVAL_METRICS)
    if "events" in metrics:
        _check_count(facts, "events", metrics["events"], {facts.n_val_events})
    pairs = facts.n_val * (facts.n_val - 1) / 2
    comp, conc = float(metrics.get("comparable", 0.0)), float(metrics.get("concordant", 0.0))
    if not (comp.is_integer() and 0 <= comp <= pairs and 0 <= conc <= comp and (2 * conc).is_integer()):
        raise _fail(facts, f"pair counts concordant={conc}, comparable={comp} impossible for {facts.n_val} patients")
    c = float(metrics.get("cindex", 0.5))
    if not (math.isnan(c) or 0.0 <= c <= 1.0):
        raise _fail(facts, f"cindex = {c} outside [0, 1]")
    if set(metrics) - {"site"} and min(facts.n_val, facts.n_val_events) < facts.min_count:
        raise _fail(
            facts,
            f"validation metrics from {facts.n_val} patients / {facts.n_val_events} events, fewer than the "
            f"minimum count {facts.min_count}",
        )


def check_summaries(facts: SiteFacts, summaries: Mapping[str, Any]) -> None:
    """The statistics exchange: the wire form of the typed site summaries
    (:func:`data_specs.summaries.site_summaries_from_wire`: declared parts and fields only, per-gene /
    per-column vectors, counts within the patients behind them), each covering at least ``min_count`` and
    at most the site's training patients."""
    try:
        typed = site_summaries_from_wire(summaries)
    except ValueError as e:
        raise _fail(facts, str(e)) from None
    for part, s in typed.items():
        _check_count(facts, f"{part}.n_patients", s.n_patients, set(range(facts.min_count, facts.n_train + 1)))
        if small := small_cells(s, facts.min_count):
            raise _fail(facts, f"{len(small)} summary cell(s) of fewer than {facts.min_count} patients: {small[:5]}")


def check_histogram(facts: SiteFacts, field: str, counts: Any, n_max: int) -> None:
    """A histogram on a pre-agreed grid: whole counts, none of 1..k-1, summing to at most ``n_max``."""
    c = [float(x) for x in counts]
    if any(not x.is_integer() or x < 0 for x in c) or sum(c) > n_max:
        raise _fail(facts, f"{field}: not a histogram of at most {n_max} patients")
    if any(0 < x < facts.min_count for x in c):
        raise _fail(facts, f"{field}: a bin of fewer than {facts.min_count} patients")


def check_follow_up(facts: SiteFacts, value: Any) -> None:
    """A follow-up ceiling: 0 or a number of at most two significant digits (what ``nice_ceil`` gives)."""
    from pipeline.stats.curves import nice_ceil

    v = float(value)
    if v != 0.0 and nice_ceil(v) != v:
        raise _fail(facts, f"follow_up.ceiling = {value!r} is not rounded to two significant digits")


# The linear family's slide projection (pipeline.training.slide_norm.prepare_slide_projection): two aggregates per
# site over its patients in the fit, each over at least min_count of them. "slide_moments": the second moments of
# the tile features (each patient's tiles weighted 1 / N_i: one patient counts once), D-vectors and a D x D matrix;
# "slide_scores": per-score sums and sums of squares of the patients' projected mean tiles (r-vectors).
SLIDE_SCHEMAS: dict[str, dict[str, str]] = {
    "slide_moments": {"n_patients": "count", "n_rows": "count", "sum": "vector", "cross": "matrix"},
    "slide_scores": {"n": "count", "sum": "vector", "sumsq": "vector"},
    "slide_composition": {"n": "count", "sum": "vector", "sumsq": "vector"},  # tile phenotypes' fractions (below)
}


def check_slide_aggregate(facts: SiteFacts, kind: str, message: Mapping[str, Any], dim: int) -> None:
    """A slide aggregate of ``kind`` (:data:`SLIDE_SCHEMAS`): exactly the declared fields; counts whole, the patient
    count within ``min_count .. n_train`` (``n_rows`` >= it); vectors of ``dim`` finite values, a symmetric
    ``dim x dim`` matrix."""
    import numpy as np

    if kind not in SLIDE_SCHEMAS:
        raise _fail(facts, f"undeclared slide aggregate {kind!r}; declared {sorted(SLIDE_SCHEMAS)}")
    schema = SLIDE_SCHEMAS[kind]
    if set(message) != set(schema):
        raise _fail(facts, f"{kind}: fields {sorted(message)}, declared {sorted(schema)}")
    n = message["n_patients" if kind == "slide_moments" else "n"]
    _check_count(facts, f"{kind} patients", n, set(range(facts.min_count, facts.n_train + 1)))
    for key, what in schema.items():
        v = message[key]
        if what == "count":
            if isinstance(v, bool) or not float(v).is_integer() or int(v) < int(n):
                raise _fail(facts, f"{kind}.{key} = {v!r} is not a count of at least {n}")
            continue
        a = np.asarray(v, dtype=float)
        shape = (dim,) if what == "vector" else (dim, dim)
        if a.shape != shape or not np.isfinite(a).all():
            raise _fail(facts, f"{kind}.{key}: shape {a.shape}, declared {shape} finite values")
        if what == "matrix" and not np.allclose(a, a.T, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(a).max()))):
            raise _fail(facts, f"{kind}.{key} is not symmetric")


# The linear family's tile phenotypes (pipeline.training.slide_clusters, model.linear_slide=composition|both): each
# Lloyd round a site sends "slide_clusters" over its patients in the fit: per cluster the number of its patients with
# a tile there (0 or >= min_count: smaller cells are sent empty), the sum of their tile fractions and of their tiles'
# projected scores (each patient's tiles weighted 1 / N_i); then "slide_composition" (SLIDE_SCHEMAS' form, K-vectors).
CLUSTER_SCHEMA: dict[str, str] = {"n_patients": "count", "n_tiles": "count", "patients": "cells", "mass": "cells",
                                  "sum": "rows"}  # fmt: skip


def check_cluster_aggregate(facts: SiteFacts, message: Mapping[str, Any], k: int) -> None:
    """A site's Lloyd answer for ``k`` tile clusters (:data:`CLUSTER_SCHEMA`): exactly the declared fields; the
    patient count within ``min_count .. n_train``, ``n_tiles`` >= it; ``patients [k]`` whole, each 0 or within
    ``min_count .. n_patients``; ``mass [k]`` finite, 0 where ``patients`` is 0, at most ``patients``, summing to at
    most ``n_patients``; ``sum [k, r]`` finite, 0 where ``patients`` is 0."""
    import numpy as np

    if set(message) != set(CLUSTER_SCHEMA):
        raise _fail(facts, f"slide_clusters: fields {sorted(message)}, declared {sorted(CLUSTER_SCHEMA)}")
    n = message["n_patients"]
    _check_count(facts, "slide_clusters patients", n, set(range(facts.min_count, facts.n_train + 1)))
    tiles = message["n_tiles"]
    if isinstance(tiles, bool) or not float(tiles).is_integer() or int(tiles) < int(n):
        raise _fail(facts, f"slide_clusters.n_tiles = {tiles!r} is not a count of at least {n}")
    cells, mass, total = (np.asarray(message[key], dtype=float) for key in ("patients", "mass", "sum"))
    if cells.shape != (k,) or mass.shape != (k,) or total.ndim != 2 or total.shape[0] != k:
        raise _fail(facts, f"slide_clusters: shapes {cells.shape}, {mass.shape}, {total.shape} for {k} clusters")
    if not (np.isfinite(mass).all() and np.isfinite(total).all()):
        raise _fail(facts, "slide_clusters: values not finite")
    if (cells != np.round(cells)).any() or (cells < 0).any() or (cells > int(n)).any():
        raise _fail(facts, f"slide_clusters.patients: not counts of at most {n} patients")
    if ((cells > 0) & (cells < facts.min_count)).any():
        raise _fail(facts, f"slide_clusters: a cluster of fewer than {facts.min_count} patients")
    empty = cells == 0
    if (mass < 0).any() or (mass > cells + 1e-9).any() or (mass[empty] != 0).any() or (total[empty] != 0).any():
        raise _fail(facts, "slide_clusters: mass or sums outside what its cells' patients allow")
    if float(mass.sum()) > int(n) * (1 + 1e-9):  # = n_patients unless a small cell was sent empty
        raise _fail(facts, f"slide_clusters: mass sums to {float(mass.sum())!r}, more than its {n} patients")


NAME_PARTS = {
    "omics": {"values": str, "genes": list},
    "clinical": {"columns": list, "numeric": list, "categories": dict},
}


def check_names(site: str, names: Any) -> None:
    """A site's summary names, sent in plain under SecAgg+ before its numbers go into a secure sum
    (``secure_sum.summary_names``): the declared parts and fields, each text or lists of text; no number."""

    def fail(what: str) -> DisclosureError:
        return DisclosureError(f"site {site}: disclosure policy: summary names: {what}")

    def texts(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    if not isinstance(names, Mapping) or set(names) - set(NAME_PARTS):
        raise fail(f"parts {sorted(names) if isinstance(names, Mapping) else type(names).__name__}")
    for part, fields in ((p, v) for p, v in names.items()):
        if not isinstance(fields, Mapping) or set(fields) != set(NAME_PARTS[part]):
            raise fail(f"{part}: fields {sorted(fields) if isinstance(fields, Mapping) else fields!r}")
        for key, kind in NAME_PARTS[part].items():
            v = fields[key]
            ok = isinstance(v, str) if kind is str else texts(v) if kind is list else (
                isinstance(v, Mapping) and all(isinstance(c, str) and texts(x) for c, x in v.items()))  # fmt: skip
            if not ok:
                raise fail(f"{part}.{key} is not text")
