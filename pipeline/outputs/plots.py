"""The run's figures: Kaplan-Meier by risk group (pooled and per site), td-AUC, attention/IG heatmaps over
the slide thumbnail, tile galleries, deletion curves, phenotype examples.

Draws only (the numbers come from :mod:`pipeline.stats` and :mod:`pipeline.outputs`); every PNG is
written through :func:`save_figure`, atomically. Matplotlib's non-interactive backend is chosen when a
figure is first drawn, never at import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import atomic_path
from pipeline.outputs.attribution import read_tiles
from pipeline.outputs.biomarkers import NAN, Phenotypes
from pipeline.stats.metrics import group_order, logrank_p


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (chosen here, at first use, not at import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically, through :mod:`pipeline.files`) and close it."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def time_unit_of(columns) -> str:
    """The cohort's time unit as spelled in ``risk_scores.csv``'s horizon columns (``surv_365days``: ``days``);
    ``""`` when there is none."""
    from pipeline.outputs.predictions import horizon_of

    units = [h[1] for h in map(horizon_of, columns) if h]
    return units[0] if units else ""


def time_label(time_unit: str = "", what: str = "time") -> str:
    """An axis label with the unit: ``time (days)``; ``time`` when the unit is unknown."""
    return f"{what} ({time_unit})" if time_unit else what


KM_COLOURS = {"low": "#2b83ba", "intermediate": "#fdae61", "high": "#d7191c"}


def _km_axes(
    ax, time: np.ndarray, event: np.ndarray, group: np.ndarray, title: str, order: list[str], time_unit: str = ""
) -> float:
    """Kaplan-Meier (lifelines) per group with 95% confidence bands and a number-at-risk table under ``ax``.
    Groups of fewer than 2 patients are not drawn (a note says so); returns the log-rank p of those drawn."""
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    fitters, drawn, skipped = [], [], []
    for g in order:
        m = group == g
        if m.sum() == 0:
            continue
        if m.sum() < 2:
            skipped.append(f"{g} (n={int(m.sum())})")
            continue
        kmf = KaplanMeierFitter(label=str(g)).fit(time[m], event[m].astype(bool))
        kmf.plot_survival_function(ax=ax, ci_show=True, ci_alpha=0.15, color=KM_COLOURS.get(str(g)),
                                   label=f"{g} (n={int(m.sum())}, {int(event[m].sum())} events)")  # fmt: skip
        fitters.append(kmf)
        drawn.append(str(g))
    keep = np.isin(group, drawn)
    p, _ = logrank_p(time[keep], event[keep], group[keep]) if keep.any() else (float("nan"), None)
    ax.set_xlabel(time_label(time_unit))
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title} log-rank p = {p:.3g}" if np.isfinite(p) else f"{title} (log-rank n/a)", fontsize=10)
    if skipped:
        ax.text(0.98, 0.02, "not drawn (< 2 patients): " + ", ".join(skipped), transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8, color="#555")  # fmt: skip
    if fitters:
        ax.legend(frameon=False, fontsize=8, loc="lower left")
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"], fontsize=8)
    return p


def km_by_group(
    time: np.ndarray, event: np.ndarray, group: np.ndarray, path, title: str = "", time_unit: str = ""
) -> float:
    """Kaplan-Meier curves per risk group with 95% bands and a number-at-risk table (PNG at ``path``); returns
    the log-rank p-value (NaN if one group). ``time_unit`` labels the time axis."""
    plt = pyplot()

    group = np.asarray(group).astype(str)
    fig, ax = plt.subplots(figsize=(5.6, 4.6), dpi=110)
    p = _km_axes(ax, np.asarray(time, float), np.asarray(event), group, title, group_order(group), time_unit)
    fig.tight_layout()
    save_figure(fig, path)
    return float(p)


def km_per_site(
    time: np.ndarray, event: np.ndarray, group: np.ndarray, site_names: np.ndarray, path: Path, time_unit: str = ""
) -> None:
    """One Kaplan-Meier panel per site (PNG), each with 95% bands and its own number-at-risk table."""
    plt = pyplot()

    group, site_names = np.asarray(group).astype(str), np.asarray(site_names).astype(str)
    sites = sorted(set(site_names))
    cols = min(3, len(sites))
    rows = int(np.ceil(len(sites) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), dpi=100, squeeze=False)
    order = group_order(group)
    for ax, s in zip(axes.ravel(), sites, strict=False):
        m = site_names == s
        _km_axes(ax, np.asarray(time, float)[m], np.asarray(event)[m], group[m], f"{s}:", order, time_unit)
    for ax in axes.ravel()[len(sites) :]:
        ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, path)


def plot_td_auc(metrics: dict, path: Path, time_unit: str = "") -> None:
    """Time-dependent AUC per horizon, pooled and per site (PNG)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    for name, m in [("pooled", metrics["pooled"]), *metrics["per_site"].items()]:
        hs = [float(h) for h in m["td_auc"]]
        ax.plot(hs, list(m["td_auc"].values()), "o-" if name == "pooled" else ".--", label=name,
                lw=2 if name == "pooled" else 1)  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel(time_label(time_unit, "horizon"))
    ax.set_ylabel("cumulative/dynamic AUC")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def attention_heatmap(
    tiles: pd.DataFrame, features_dir: Path, slide_id: str, out_png: Path, column: str = "attn_rel"
) -> None:
    """Overlay one slide's tile scores (``column``: ``attn_rel`` or ``ig``) on its thumbnail, tissue tiles
    only, with a colour bar. Signed scores (``ig``) use a diverging map centred on zero."""
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm
    from PIL import Image

    from pipeline.slides.features import read_tile_geometry

    t = tiles[tiles.slide_id == slide_id]
    geo = read_tile_geometry(Path(features_dir) / f"{slide_id}.h5")
    w0, size0 = geo.width0, geo.size0
    thumb = Image.open(Path(features_dir) / f"{slide_id}.thumb.jpg")
    scale = thumb.size[0] / w0
    grid = np.full((thumb.size[1], thumb.size[0]), np.nan)
    side = int(np.ceil(size0 * scale))
    for x, y, a in zip(t.x, t.y, t[column], strict=True):
        x0, y0 = int(x * scale), int(y * scale)
        grid[y0 : y0 + side, x0 : x0 + side] = a
    signed = column != "attn_rel"
    fig, ax = plt.subplots(figsize=(6, 6 * thumb.size[1] / thumb.size[0] + 0.3), dpi=100)
    ax.imshow(thumb)
    if signed:
        lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        norm = TwoSlopeNorm(0.0, -lim or -1.0, lim or 1.0)
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="coolwarm", norm=norm, alpha=0.6)
        label = "integrated gradients (+ raises risk)"
    else:
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="inferno", alpha=0.55)
        label = "attention x tiles (1 = uniform)"
    fig.colorbar(im, ax=ax, fraction=0.035, label=label)
    ax.set_axis_off()
    ax.set_title(slide_id, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png)


GALLERY_PT = 11  # tile-gallery label size in points (at the figure's 100 dpi: ~15 px in the PNG)


def tile_gallery(
    tiles: pd.DataFrame, slide_path: Path, size0: int, out_png: Path, k: int = 6, column: str = "attn"
) -> None:
    """Top-k (first row) and bottom-k (second row) tiles of one slide by ``column``, at full resolution."""
    plt = pyplot()

    t = tiles.sort_values(column, ascending=False, kind="stable")
    k = max(1, min(k, len(t) // 2 or 1))
    top, bottom = t.head(k), t.tail(k).iloc[::-1]
    imgs = read_tiles(slide_path, [(r.x, r.y) for r in pd.concat([top, bottom]).itertuples()], size0)
    # about 1 inch per tile at 100 dpi: the report shows the figure ~420 px wide, so 11 pt labels stay ~10 px tall
    fig, axes = plt.subplots(2, k, figsize=(max(1.0 * k, 4.5), 2.9), dpi=100, squeeze=False)
    for j, (ax, img, r) in enumerate(zip(axes.ravel(), imgs, pd.concat([top, bottom]).itertuples(), strict=False)):
        ax.imshow(img)
        ax.set_title(f"{getattr(r, column):.3g}", fontsize=GALLERY_PT, pad=2)
        ax.set_xticks([])
        ax.set_yticks([])
        if j % k == 0:
            ax.set_ylabel("top" if j == 0 else "bottom", fontsize=GALLERY_PT)
    fig.suptitle(f"{t.slide_id.iloc[0]}: top/bottom {k} by {column}", fontsize=GALLERY_PT)
    fig.tight_layout()
    save_figure(fig, out_png)


def plot_deletion(curves: dict[str, dict], path: Path) -> None:
    """One panel per curve set (tiles, genes): |delta log_hz| against the fraction removed."""
    plt = pyplot()

    sets = {k: v for k, v in curves.items() if "random" in v}
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(4.4 * max(1, len(sets)), 3.3), dpi=100, squeeze=False)
    for ax, (name, c) in zip(axes.ravel(), sets.items(), strict=False):
        x = c.get("genes_reset", c["fraction"])
        for k in c["auc"]:
            ax.plot(x, c[k], "--" if k == "random" else "-o", ms=3,
                    label=f"{k} (mean {c['auc'][k]:.3g})", color="grey" if k == "random" else None)  # fmt: skip
        if "genes_reset" in c:
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlabel("genes reset to the training mean (highest-attributed first)")
        else:
            ax.set_xlabel(f"fraction of {name} removed (highest-attributed first)")
        ax.set_ylabel("mean |change in log hazard|")
        ax.set_title(f"{name}: deletion curves ({c['patients']} patients)", fontsize=9)
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def phenotype_examples_png(
    ph: Phenotypes, slide_paths: dict[str, Path], size0: dict[str, int], out_png: Path, stats: pd.DataFrame | None
) -> None:
    """One row of example tiles (full resolution) per phenotype, labelled with its univariate HR."""
    plt = pyplot()

    k = max(len(v) for v in ph.examples.values())
    fig, axes = plt.subplots(len(ph.names), k, figsize=(1.5 * k, 1.6 * len(ph.names)), dpi=90, squeeze=False)
    hr = dict(zip(stats.name, stats.uni_hr, strict=True)) if stats is not None and len(stats) else {}
    for r, name in enumerate(ph.names):
        ex = ph.examples[name]
        imgs = []
        for sid in dict.fromkeys(s for s, _, _ in ex):
            imgs += read_tiles(slide_paths[sid], [(x, y) for s, x, y in ex if s == sid], size0[sid], 160)
        for c in range(k):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c])
            else:
                ax.set_axis_off()
        h = hr.get(name, NAN)
        axes[r, 0].set_ylabel(f"{name}\nHR {h:.2f}" if np.isfinite(h) else name, fontsize=8)
    fig.suptitle("phenotypes (Leiden clusters of tile embeddings): tiles nearest each centre", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_png)
