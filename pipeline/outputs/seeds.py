"""A run repeated over seeds (``histofuse run --seeds N``): each metric's mean +- sd over the seeds' runs.

Computes and renders only; :mod:`pipeline.cli` runs the seeds (``DIR/seed-<k>/``, each a run of its own) and
writes ``seeds_summary.json`` through :mod:`pipeline.files`.
"""

from __future__ import annotations

import numpy as np

POOLED = ("cindex", "uno_cindex", "mean_td_auc", "ibs")  # test-set metrics of metrics.json["pooled"]


def _mean_sd(v: list[float | None]) -> dict:
    a = np.asarray([x for x in v if x is not None], float)
    a = a[np.isfinite(a)]
    nan = float("nan")
    return {
        "mean": float(a.mean()) if len(a) else nan,
        "sd": float(a.std(ddof=1)) if len(a) > 1 else nan,
        "n": len(a),
        "values": [None if x is None else float(x) for x in v],
    }


def seeds_summary(seeds: list[int], metrics: list[dict]) -> dict:
    """``seeds_summary.json``: per seed's ``metrics.json`` (same order as ``seeds``), the mean +- sd (ddof 1) of
    the pooled test metrics, of each site's test C-index and of (model - best centralised baseline) C-index."""
    out: dict = {"seeds": list(seeds), "split": metrics[0].get("split", "test")}
    out["pooled"] = {k: _mean_sd([m["pooled"].get(k) for m in metrics]) for k in POOLED if k in metrics[0]["pooled"]}
    sites = sorted({s for m in metrics for s in m.get("per_site", {})})
    out["per_site_cindex"] = {s: _mean_sd([m.get("per_site", {}).get(s, {}).get("cindex") for m in metrics])
                              for s in sites}  # fmt: skip
    diffs = [m.get("baselines", {}).get("model_minus_best", {}).get("diff") for m in metrics]
    if any(d is not None for d in diffs):
        out["model_minus_best_baseline"] = _mean_sd(diffs)
    return out


def _pm(d: dict, signed: bool = False) -> str:
    m = f"{d['mean']:+.3f}" if signed else f"{d['mean']:.3f}"
    return m if not np.isfinite(d["sd"]) else f"{m} +- {d['sd']:.3f}"


def seeds_lines(summary: dict) -> list[str]:
    """The console table: one row per metric, its value for each seed and the mean +- sd."""
    seeds = summary["seeds"]
    head = f"{'test metric':<28}" + "".join(f"{'seed ' + str(s):>10}" for s in seeds) + "   mean +- sd"
    rows = [(k, d, False) for k, d in summary["pooled"].items()]
    rows += [(f"C-index site {s}", d, False) for s, d in summary["per_site_cindex"].items()]
    if "model_minus_best_baseline" in summary:
        rows.append(("model - best baseline", summary["model_minus_best_baseline"], True))
    lines = [f"{len(seeds)} seeds (train.seed and the split seed):", head]
    for name, d, signed in rows:
        vals = "".join(f"{'-' if v is None or not np.isfinite(v) else format(v, '+.3f' if signed else '.3f'):>10}"
                       for v in d["values"])  # fmt: skip
        lines.append(f"{name:<28}{vals}   {_pm(d, signed)}")
    return lines
