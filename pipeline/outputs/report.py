"""One self-contained HTML report per run (images embedded as data URIs; no script, no external resource,
so it opens offline). Sections appear when the run folder holds their files:

model card (intended use), limitations, cohort summary, metrics with bootstrap CIs (pooled and per site),
Kaplan-Meier plots, td-AUC, training history, top genes, the biomarker table (genes and phenotypes), phenotype
example tiles, heatmaps with galleries, deletion curves, run metadata (date, version, commit, cohort, config
digest), the resolved config and package versions.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from data_specs.artifacts import RunFiles
from pipeline.files import write_text

VERSIONED = ("torch", "timm", "lightning", "scikit-survival", "lifelines", "captum", "scanpy", "anndata", "flwr")


def _img(path: Path, width: int = 480, photo: bool = False) -> str:
    """Embed an image. Photographic ones (heatmaps over tissue, tile galleries) go in as JPEG: 5-10x smaller."""
    if photo:
        from PIL import Image

        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="JPEG", quality=85)
        data, mime = base64.b64encode(buf.getvalue()).decode(), "image/jpeg"
    else:
        data, mime = base64.b64encode(path.read_bytes()).decode(), "image/png"
    return f'<img src="data:{mime};base64,{data}" width="{width}" alt="{html.escape(path.stem)}">'


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="t", float_format=lambda v: f"{v:.4g}", na_rep="–")


def _num(v: object, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) and np.isfinite(v) else "–"


def _ci(m: dict, k: str) -> str:
    ci = m.get(f"{k}_ci")
    v = _num(m.get(k))
    if ci and all(isinstance(c, int | float) for c in ci):
        return f"{v} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return v


def _p(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, int | float) and np.isfinite(v) else "–"


def _metrics_section(rf: RunFiles, unit: str = "") -> list[str]:
    mj = rf.metrics
    if not mj.is_file():
        return []
    m = json.loads(mj.read_text())
    rows = []
    for scope, v in [("pooled", m["pooled"]), *m.get("per_site", {}).items()]:
        rows.append(
            {
                "scope": scope,
                "patients": v.get("n"),
                "events": v.get("events"),
                "Harrell C [95% CI]": _ci(v, "cindex"),
                "Uno C [95% CI]": _ci(v, "uno_cindex"),
                "mean td-AUC [95% CI]": _ci(v, "mean_td_auc"),
                "IBS [95% CI]": _ci(v, "ibs"),
                "log-rank p": _p(v.get("logrank_p")),
                "notes": "; ".join(f"{k}: {w}" for k, w in v.get("notes", {}).items()),
            }
        )
    split = html.escape(str(m.get("split")))
    b = m.get("bootstrap", {})
    note = (
        "Harrell and Uno C-index (scikit-survival; Uno's truncated at "
        f"t={_num(m.get('uno_tau'), 0)} {html.escape(unit)}), cumulative/dynamic AUC averaged over the horizons "
        f"{html.escape(', '.join(f'{h:g} {unit}'.strip() for h in m.get('horizons', [])))}, integrated Brier score "
        "(lower is better; needs survival curves). "
        f"Censoring weights from the {html.escape(str(m.get('censoring_from')))}. "
        f"CIs: {b.get('resamples')} patient bootstrap resamples (seed {b.get('seed')}). "
        "A dash is a metric that cannot be computed on those patients; the notes say why."
    )
    if m.get("pairs") == "within site":  # a deployment's: from the sites' summed pair counts only
        from pipeline.outputs.privacy_report import DEPLOYED_METRICS_NOTE as note
    parts = [f"<h2>Metrics ({split} set)</h2>", _table(pd.DataFrame(rows)), f"<p class='note'>{note}</p>"]
    km = m["pooled"].get("km_by_group")
    if km:
        t = pd.DataFrame(
            [
                {"risk group": g, **{f"S({h} {unit})".replace(" )", ")"): _num(v) for h, v in d.items()}}
                for g, d in km.items()
            ]
        )
        parts += ["<h3>Kaplan-Meier survival by risk group (pooled)</h3>", _table(t)]
    split_name = str(m.get("split"))
    imgs = [rf.km_plot(split_name), rf.km_plot(split_name, by_site=True), rf.td_auc_plot(split_name)]
    parts.append(
        "<div>" + "".join(_img(p, 460 if "sites" not in p.name else 1150) for p in imgs if p.is_file()) + "</div>"
    )
    return parts


def _cohort_section(rf: RunFiles) -> list[str]:
    from pipeline.outputs.plots import time_unit_of
    from pipeline.outputs.predictions import horizon_of

    rs = rf.risk_scores
    if not rs.is_file():
        return []
    df = pd.read_csv(rs)
    summ = (
        df.groupby("site")
        .agg(patients=("patient_id", "size"), events=("event", "sum"), median_time=("time", "median"))
        .reset_index()
    )
    splits = df.pivot_table(index="site", columns="split", values="patient_id", aggfunc="size", fill_value=0)
    summ = summ.merge(splits.rename_axis(columns=None).reset_index(), on="site")
    unit = time_unit_of(df.columns)
    if unit:
        summ = summ.rename(columns={"median_time": f"median time ({unit})"})
    mods = df.modalities.fillna("none").value_counts().to_dict()
    groups = df.groupby(["split", "risk_group"]).size().unstack(fill_value=0).rename_axis(columns=None).reset_index()
    surv_cols = [c for c in df.columns if horizon_of(c)]
    parts = [
        "<h2>Cohort</h2>",
        _table(summ),
        f"<p>{len(df)} patients, {int(df.event.sum())} events; modalities present: "
        f"{html.escape(', '.join(f'{k}: {v}' for k, v in mods.items()))}.</p>",
        "<h3>Risk groups (cut-points fixed on the training patients)</h3>",
        _table(groups),
    ]
    if surv_cols:
        parts.append(
            "<p>Predicted survival probability at "
            f"{html.escape(', '.join('{:g} {}'.format(*horizon_of(c)) for c in surv_cols))} is in "
            f"<code>{rf.RISK_SCORES}</code>; full curves in <code>{rf.SURVIVAL_CURVES}</code>.</p>"
        )
    return parts


def _training_section(rf: RunFiles) -> list[str]:
    ts = rf.train_summary
    if not ts.is_file():
        return []
    info = json.loads(ts.read_text())
    hist = info.get("history")
    parts = [f"<h2>Training ({html.escape(str(info.get('mode')))})</h2>"]
    if hist:
        h = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict | list)} for r in hist])
        parts.append(f"<details><summary>{len(h)} rounds/epochs</summary>{_table(h)}</details>")
    parts.append(f"<p>best round/epoch: {html.escape(str(info.get('best_round', info.get('best_epoch'))))}</p>")
    return parts


def _biomarker_sections(rf: RunFiles) -> list[str]:
    parts: list[str] = []
    genes = rf.genes
    bio = pd.read_csv(rf.biomarkers) if rf.biomarkers.is_file() else None
    info = json.loads(rf.biomarkers_info.read_text()) if rf.biomarkers_info.is_file() else {}
    if genes.is_file():
        g = pd.read_csv(genes).head(20)[["rank", "gene", "mean_abs_ig", "direction"]]
        if bio is not None and len(bio):
            cox = bio[bio.kind == "gene"].set_index("name")
            g["HR per SD (univariate)"] = [_hr(cox, n, "uni") for n in g.gene]
            g["FDR"] = [_p(cox.uni_fdr.get(n, np.nan)) for n in g.gene]
        parts += [
            "<h2>Top genes (integrated gradients, baseline = training-mean expression)</h2>",
            _table(g),
            "<p class='note'>Per-patient attributions: <code>attributions/gene_attributions.h5ad</code> "
            "(layer <code>ig</code>) and <code>gene_ig.csv</code>.</p>",
        ]
    if bio is not None and len(bio):
        show = bio[bio.top_candidate.astype(bool)] if "top_candidate" in bio else bio
        t = pd.DataFrame(
            {
                "kind": show.kind,
                "name": show.name,
                "attribution rank": show.attribution_rank,
                "univariate HR [95% CI]": [_hr(show.set_index("name"), n, "uni") for n in show.name],
                "p": show.uni_p.map(_p),
                "FDR (BH)": show.uni_fdr.map(_p),
                "multivariable HR [95% CI]": [_hr(show.set_index("name"), n, "multi") for n in show.name],
                "p (multi)": show.multi_p.map(_p),
                "note": show.note.fillna(""),
            }
        )
        mv = info.get("variables", [])
        parts += [
            "<h2>Biomarker table (Cox regression on held-out patients)</h2>",
            f"<p class='note'>{info.get('patients', '?')} held-out patients "
            f"({info.get('left_out_missing_modality', 0)} without a candidate modality left out); "
            "variables standardised (HR per SD); "
            f"{'stratified by site; ' if info.get('stratified_by_site') else ''}candidates: the top genes by "
            "attribution and every phenotype, both chosen without looking at outcomes; a univariate fit for each, "
            "Benjamini-Hochberg FDR over exactly these tests (also in <code>attributions/biomarkers.csv</code>); "
            f"one multivariable fit of {len(mv)} top candidates (at most one per 10 events: "
            f"{info.get('max_variables', 0)}).</p>",
            _table(t),
        ]
    if rf.phenotypes_png.is_file():
        parts += [
            "<h2>Morphological phenotypes</h2>",
            "<p class='note'>Leiden clusters (scanpy) of tile embeddings of the training patients; each "
            "patient's fraction of tiles per cluster is in <code>attributions/phenotype_fractions.csv</code>.</p>",
            _img(rf.phenotypes_png, 640, photo=True),
        ]
    return parts


def _hr(df: pd.DataFrame, name: str, pre: str) -> str:
    if name not in df.index:
        return "–"
    r = df.loc[name]
    hr, lo, hi = r.get(f"{pre}_hr"), r.get(f"{pre}_hr_lo"), r.get(f"{pre}_hr_hi")
    if not all(isinstance(v, int | float) and np.isfinite(v) for v in (hr, lo, hi)):
        return "–"
    return f"{hr:.2f} [{lo:.2f}, {hi:.2f}]"


def _faith_rows(f: dict, kinds: tuple[str, ...]) -> list[dict]:
    """Deletion-curve AUCs of ``faithfulness.json``: one row per attribution against the random order."""
    rows = []
    for kind in kinds:
        c = f.get(kind) if isinstance(f.get(kind), dict) and "auc" in f[kind] else {"auc": {}}
        for k, v in c["auc"].items():
            if k != "random":
                r = {"removed": kind, "ordered by": k, "mean |delta log_hz|": v, "random order": c["auc"]["random"]}
                rows.append({**r, "gap": c["gap"][k], "patients": c["patients"]})
    return rows


def _faith_line(rows: list[dict]) -> str:
    """One sentence per attribution: its deletion AUC against random and the gap, read as faithful or not."""
    say = [
        f"{html.escape(r['ordered by'])}: AUC {_num(r['mean |delta log_hz|'])} vs random {_num(r['random order'])}, "
        f"gap {_num(r['gap'])} ({'more' if r['gap'] > 0 else 'not more'} faithful than random)"
        for r in rows
    ]
    n = rows[0]["patients"]
    return (
        f"<p class='faith'><b>How faithful these heatmaps are</b> (tile deletion, {n} patients): {'; '.join(say)}.</p>"
    )


def _tile_note(rf: RunFiles, role: str, linear_share: bool = False) -> str:
    """The heading and reading note of the tile heatmaps, in the order the report shows them for ``role``;
    ``linear_share``: ``tiles.csv`` has the linear slide term's tile shares."""
    attn = "attention (x number of tiles; 1 = uniform)"
    ig = "integrated gradients per tile (red raises the risk)"
    if role == "pooling":
        order, extra = f"Left: {attn}. Middle: {ig}. Then the top and bottom tiles by attention and by IG", ""
    else:
        weighs = "is uniform" if role == "uniform" else "weighs the tiles for the gated residual branch only"
        order = f"Left: {ig}. Middle: the attention, which in this model {weighs}. Then the top and bottom tiles by IG"
        order += " and by attention"
        extra = (
            " The model's linear slide term adds each tile's exact share to the log hazard: column "
            f"<code>linear_share</code> of <code>{rf.ATTRIBUTIONS}/tiles.csv</code>."
            if linear_share
            else ""
        )
    return (
        f"<h2>Tile attributions</h2><p class='note'>{order}, cut from the slide at full resolution. QuPath GeoJSON "
        f"of every scored tile: <code>{rf.ATTRIBUTIONS}/{rf.GEOJSON}/</code>.{extra}</p>"
    )


def _tile_sections(rf: RunFiles) -> list[str]:
    """Heatmaps and galleries per slide, headed by the tile deletion figure and numbers; then every AUC."""
    hm = sorted(p for p in rf.heatmaps.glob("*.png") if not p.stem.endswith("_ig"))
    f = json.loads(rf.faithfulness.read_text()) if rf.faithfulness.is_file() else None
    tile_rows, parts, fig = _faith_rows(f or {}, ("tiles",)), [], rf.deletion_png.is_file()
    role = ((f or {}).get("tiles") or {}).get("attention_role", "pooling")
    ig_first = role != "pooling"  # attention that is not the whole slide pathway is not the heatmap to read first
    if hm:
        parts.append(_tile_note(rf, role, "linear_share" in ((f or {}).get("tiles") or {}).get("auc", {})))
        parts += ([_faith_line(tile_rows)] if tile_rows else []) + ([_img(rf.deletion_png, 760)] if fig else [])
    for p in hm:
        sid = p.stem
        maps, galleries = [p, rf.heatmap(sid, ig=True)], [rf.gallery(sid), rf.gallery(sid, ig=True)]
        if ig_first:
            maps, galleries = maps[::-1], galleries[::-1]
        row = [_img(q, 330, photo=True) for q in maps if q.is_file()]
        row += [_img(g, 600, photo=True) for g in galleries if g.is_file()]
        parts.append(f"<div class='slide'><h3>{html.escape(sid)}</h3>{''.join(row)}</div>")
    if f is not None:
        rows = _faith_rows(f, ("tiles", "genes"))
        parts += [
            "<h2>Faithfulness: deletion curves</h2>",
            "<p class='note'>Removing the highest-attributed tiles (or resetting the highest-attributed genes to "
            "the training mean) should move the risk more than removing random ones: a positive gap.</p>",
        ]
        parts += ([_table(pd.DataFrame(rows))] if rows else []) + (
            [_img(rf.deletion_png, 760)] if fig and not hm else []
        )
    return parts


def build_report(out: Path, title: str = "histofuse run") -> Path:
    """Assemble ``report.html`` from whatever the run's folder holds."""
    from pipeline.outputs.model_card import limitations_html, metadata_html, model_card_html, package_version
    from pipeline.outputs.plots import time_unit_of
    from pipeline.outputs.privacy_report import privacy_html, site_local_html

    rf = RunFiles(root=Path(out))
    unit = time_unit_of(pd.read_csv(rf.risk_scores, nrows=0).columns) if rf.risk_scores.is_file() else ""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += model_card_html(rf) + limitations_html(rf)
    parts += _cohort_section(rf)
    parts += _metrics_section(rf, unit)
    if rf.metrics.is_file():  # model vs centralised baselines, modality contributions
        from pipeline.outputs.baseline_report import baselines_html

        parts += baselines_html(json.loads(rf.metrics.read_text()))
    parts += _training_section(rf) + privacy_html(rf) + site_local_html(rf)
    if rf.attributions.is_dir():
        parts += _biomarker_sections(rf)
        parts += _tile_sections(rf)
    parts += metadata_html(rf, unit)
    cfg = rf.config
    if cfg.is_file():
        parts += [
            "<h2>Resolved config</h2>",
            f"<pre>{html.escape(yaml.safe_dump(yaml.safe_load(cfg.read_text()), sort_keys=False))}</pre>",
        ]
    vers = {p: package_version(p) for p in VERSIONED}
    parts.append(f"<h2>Versions</h2><pre>{html.escape(json.dumps(vers, indent=1))}</pre>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table.t{border-collapse:collapse;margin:.5em 0;font-size:13px}table.t td,table.t th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}img{margin:4px;vertical-align:top}"
        ".note{color:#555;font-size:13px}div.slide{border-top:1px solid #eee}ul.card li{margin:2px 0}"
    )
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<link rel='icon' href='data:,'><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = write_text(rf.report, page)
    return path
