"""The baselines as people read them: console lines and the report's HTML section.

Renders what :mod:`pipeline.outputs.baselines` puts in ``metrics.json`` (keys ``baselines`` and
``modality_contributions``): :func:`summary_lines` for the console, :func:`baselines_html` for the report.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd


def _fmt(c: float | None, ci: list | None) -> str:
    if c is None or not np.isfinite(c):
        return "-"
    ok = ci is not None and all(v is not None and np.isfinite(v) for v in ci)
    return f"{c:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ok else f"{c:.3f}"  # type: ignore[index]


def linear_penalty(fl: dict) -> str:
    """The federated linear baseline's penalty in words: the full-batch fit's (ridge, lasso or the elastic net with
    its mix, and whether the CV chose the mix) or the mini-batch path's weight decay."""
    if "linear_fit" not in fl:
        return "weight decay"
    fit = fl["linear_fit"]
    a = float(fit.get("l1_ratio", 0.0))  # records from before the elastic net: ridge
    kind = "ridge" if a == 0 else "lasso" if a == 1 else f"elastic net (l1_ratio {a:g})"
    chosen = ", mix chosen by CV" if fit.get("l1_ratio_setting") == "auto" else ""
    return f"{kind}{chosen}, penalty per patient"


def federated_linear_line(fl: dict) -> str:
    """One console line: the model against the federated linear Cox baseline."""
    d = fl.get("model_minus_this", {})
    secagg = " + SecAgg+" if fl.get("secagg") else ""
    penalty = linear_penalty(fl)
    return (
        f"model vs {fl['label']}, {fl['strategy']}{secagg}, {penalty} {fl['weight_decay']:.3g}: "
        f"test C {_fmt(fl['cindex'], None)}; model - baseline {_fmt(d.get('diff'), d.get('ci'))}: "
        f"{d.get('verdict', '')}"
    )


def summary_lines(baselines: dict, contributions: dict | None = None) -> list[str]:
    """A few console lines: the model against the best centralised baseline (and each one) and, in a federated
    run, against the federated linear baseline, plainly."""
    res = baselines.get("baselines", {})
    fl = [federated_linear_line(baselines["federated_linear"])] if "federated_linear" in baselines else []
    if not res or "model" not in baselines:
        notes = "; ".join(f"{k}: {v}" for k, v in baselines.get("notes", {}).items())
        return [f"centralised baselines: none fitted ({notes})", *fl]
    best, d = baselines["best"], baselines["model_minus_best"]
    lines = [
        f"model vs best centralised Coxnet baseline ({best}, chosen by CV on train+val): "
        f"{_fmt(baselines['model']['cindex'], None)} vs {_fmt(res[best]['cindex'], None)}; "
        f"model - baseline {_fmt(d['diff'], d.get('ci'))}: {d['verdict']}",
        "  Coxnet (centralised) test C: " + ", ".join(f"{k} {v['cindex']:.3f}" for k, v in res.items()),
        *fl,
    ]
    if contributions:
        drops = [f"{k[8:]} {v['drop']['diff']:+.3f}" for k, v in contributions.items() if k.startswith("without_")]
        lines.append("  C-index drop with a modality masked at inference: " + ", ".join(drops))
    return lines


def baselines_html(metrics: dict) -> list[str]:
    """Report section: the model beside each centralised baseline, and the modality contributions."""
    bl, mc = metrics.get("baselines"), metrics.get("modality_contributions")
    if not bl or not (bl.get("baselines") or bl.get("federated_linear")):
        return []
    rows = []
    if "model" in bl:
        c = _fmt(bl["model"]["cindex"], bl["model"].get("cindex_ci"))
        rows.append({"model": "histofuse (this run)", "test Harrell C [95% CI]": c})
    for k, v in bl["baselines"].items():
        d = v.get("model_minus_this", {})
        rows.append(
            {
                "model": f"Coxnet {k}" + (" (best by CV)" if k == bl.get("best") else ""),
                "test Harrell C [95% CI]": _fmt(v["cindex"], v.get("cindex_ci")),
                "model - this [95% CI]": _fmt(d.get("diff"), d.get("ci")) if d else "",
                "CV C (train+val)": f"{v['cv_cindex']:.3f}",
            }
        )
    fl = bl.get("federated_linear")
    if fl:
        rows.append(_federated_linear_row(fl))
    verdict = bl.get("model_minus_best", {}).get("verdict", "")
    parts = [
        "<h2>Baselines</h2>",
        pd.DataFrame(rows).fillna("").to_html(index=False, classes="t", border=0),
        f"<p class='note'>Against the best centralised baseline: <b>{html.escape(verdict)}</b>. Elastic-net Cox "
        "(scikit-survival Coxnet, l1_ratio 0.5, alpha by stratified CV on train+val patients) on each modality "
        "and all together; slides as PCA of mean-pooled tile features. These baselines pool patient data "
        "in one place (centralised). Paired patient-bootstrap CIs on the same test patients.</p>",
    ]
    if fl:
        parts.append(_federated_linear_note(fl))
    if mc:
        rows = [{"inputs": "all", "test Harrell C [95% CI]": _fmt(mc["full"]["cindex"], mc["full"].get("cindex_ci"))}]
        for k, v in mc.items():
            if k.startswith("without_"):
                c, d = _fmt(v["cindex"], v.get("cindex_ci")), _fmt(v["drop"]["diff"], v["drop"].get("ci"))
                rows.append({"inputs": k.replace("_", " "), "test Harrell C [95% CI]": c, "drop [95% CI]": d})
        parts += [
            "<h3>Modality contributions</h3>",
            pd.DataFrame(rows).fillna("").to_html(index=False, classes="t", border=0),
            "<p class='note'>Each modality masked at inference (the model is not retrained); a positive drop "
            "means the model uses that modality.</p>",
        ]
    return parts


def _federated_linear_row(fl: dict) -> dict:
    d = fl.get("model_minus_this", {})
    return {
        "model": f"{fl['label']}, {fl['strategy']}" + (" + SecAgg+" if fl.get("secagg") else ""),
        "test Harrell C [95% CI]": _fmt(fl["cindex"], fl.get("cindex_ci")),
        "model - this [95% CI]": _fmt(d.get("diff"), d.get("ci")),
        "validation C (pooled across sites)": _fmt(fl["val_cindex"], None),
    }


def _federated_linear_note(fl: dict) -> str:
    note = (
        f"Against the federated linear Cox baseline: <b>{html.escape(fl['model_minus_this'].get('verdict', ''))}"
        "</b>. The linear model family (log hazard linear in the standardised mean-pooled tile features, genes "
        "and clinical covariates) trained through the same sites, split, strategy, SecAgg+ and DP as the run, "
        f"without pooling; {html.escape(linear_penalty(fl))}: {html.escape(fl['choice'])} (candidates tried: "
        f"{', '.join(format(c['weight_decay'], 'g') for c in fl['candidates'])})."
    )
    if "epsilon_total" in fl:
        note += f" Under DP it spent epsilon {fl['epsilon_total']:.2f} in all ({html.escape(fl['privacy_note'])})."
    return f"<p class='note'>{note}</p>"
