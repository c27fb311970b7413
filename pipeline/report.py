"""One self-contained HTML report per run (images embedded as data URIs; opens offline)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd
import yaml


def _img(path: Path, width: int = 480, photo: bool = False) -> str:
    """Embed an image. Photographic ones (heatmaps over tissue) go in as JPEG: 5-10x smaller than PNG."""
    if photo:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="JPEG", quality=85)
        data, mime = base64.b64encode(buf.getvalue()).decode(), "image/jpeg"
    else:
        data, mime = base64.b64encode(path.read_bytes()).decode(), "image/png"
    return f'<img src="data:{mime};base64,{data}" width="{width}" alt="{html.escape(path.stem)}">'


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="t", float_format=lambda v: f"{v:.4g}")


def build_report(out: Path, title: str = "histofuse run") -> Path:
    """Assemble ``report.html`` from whatever the run's folder holds."""
    out = Path(out)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    rs = out / "risk_scores.csv"
    if rs.is_file():
        df = pd.read_csv(rs)
        summ = df.groupby("site").agg(patients=("patient_id", "size"), events=("event", "sum")).reset_index()
        parts += [
            "<h2>Cohort</h2>",
            _table(summ),
            f"<p>{len(df)} patients; modalities: {html.escape(str(df.modalities.value_counts().to_dict()))}</p>",
        ]
    mj = out / "metrics.json"
    if mj.is_file():
        m = json.loads(mj.read_text())
        rows = [{"scope": "pooled", **m["pooled"]}] + [{"scope": s, **v} for s, v in m["per_site"].items()]
        parts += [
            f"<h2>Metrics ({html.escape(m['split'])} set)</h2>",
            _table(pd.DataFrame(rows)),
            f"<p>Log-rank p (high vs low risk): {m.get('logrank_p', float('nan')):.3g}</p>",
        ]
        km = out / f"km_{m['split']}.png"
        if km.is_file():
            parts.append(_img(km))
    ts = out / "train_summary.json"
    if ts.is_file():
        info = json.loads(ts.read_text())
        hist = info.get("history")
        parts.append(f"<h2>Training ({html.escape(str(info.get('mode')))})</h2>")
        if hist:
            h = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict | list)} for r in hist])
            parts.append(_table(h))
        parts.append(f"<p>best round/epoch: {info.get('best_round', info.get('best_epoch'))}</p>")
    genes = out / "attributions" / "genes.csv"
    if genes.is_file():
        g = pd.read_csv(genes).head(20)
        parts += ["<h2>Top genes (integrated gradients)</h2>", _table(g[["rank", "gene", "mean_abs_ig", "direction"]])]
    hm = sorted((out / "attributions" / "heatmaps").glob("*.png")) if (out / "attributions").is_dir() else []
    if hm:
        parts.append("<h2>Tile attention heatmaps</h2><div>" + "".join(_img(p, 360, photo=True) for p in hm) + "</div>")
    cfg = out / "config.yaml"
    if cfg.is_file():
        parts += [
            "<h2>Resolved config</h2>",
            f"<pre>{html.escape(yaml.safe_dump(yaml.safe_load(cfg.read_text())))}</pre>",
        ]
    from importlib.metadata import version

    vers = {p: version(p) for p in ("torch", "timm", "lightning", "scikit-survival", "captum", "scanpy")}
    parts.append(f"<h2>Versions</h2><pre>{html.escape(json.dumps(vers, indent=1))}</pre>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table.t{border-collapse:collapse;margin:.5em 0}table.t td,table.t th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}img{margin:4px}"
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = out / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
