"""The HTML report: self-contained, sections present when their files are, and a real-browser render check."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline.outputs.render_check import render_check
from pipeline.outputs.report import build_report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with risk scores, metrics (two sites, one without events) and a few attribution files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.outputs.evaluate import stage_evaluate

    out = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    n = 80
    lh = rng.normal(size=n)
    time = rng.exponential(np.exp(-lh) * 10) + 0.1
    event = rng.random(n) < 0.7
    site = np.where(np.arange(n) % 4 == 0, "b", "a")
    event[site == "b"] = False
    pd.DataFrame(
        {"patient_id": [f"P{i}" for i in range(n)], "site": site, "split": np.where(np.arange(n) < 40, "train", "test"),
         "log_hz": lh, "risk_group": np.where(lh > 0, "high", "low"), "surv_5days": 0.5, "modalities": "omics",
         "time": time, "event": event.astype(int)}
    ).to_csv(out / "risk_scores.csv", index=False)  # fmt: skip
    stage_evaluate(out / "risk_scores.csv", out, "test", ["evaluate.bootstrap=10"])
    a = out / "attributions"
    (a / "heatmaps").mkdir(parents=True)
    for name in ("heatmaps/S1.png", "heatmaps/S1_ig.png", "deletion.png"):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.imshow(rng.random((8, 8)))
        fig.savefig(a / name)
        plt.close(fig)
    pd.DataFrame({"rank": [1, 2], "gene": ["MKI67", "ESR1"], "mean_abs_ig": [0.3, 0.2], "mean_ig": [0.1, -0.1],
                  "direction_rho": [0.9, -0.8], "direction": ["higher expression -> higher risk",
                                                              "higher expression -> lower risk"]}
                 ).to_csv(a / "genes.csv", index=False)  # fmt: skip
    (a / "faithfulness.json").write_text(
        json.dumps({"tiles": {"fraction": [0, 0.5], "attention": [0, 0.2], "random": [0, 0.1], "patients": 3,
                              "auc": {"attention": 0.1, "random": 0.05}, "gap": {"attention": 0.05}}})
    )  # fmt: skip
    (out / "config.yaml").write_text("train: {lr: 0.001}\n")
    return out


def test_report_is_self_contained_with_sections(run_dir):
    html = build_report(run_dir, "t <&> title").read_text()
    assert "<title>t &lt;&amp;&gt; title</title>" in html
    for h in ("Cohort", "Metrics (test set)", "Top genes", "Tile attributions", "Faithfulness", "Resolved config"):
        assert f"<h2>{h}" in html, h
    srcs = re.findall(r'<img src="([^"]{0,30})', html)
    assert len(srcs) >= 5 and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r"(src|href)=['\"](https?:|//|file:)", html)
    assert "no events (all censored)" in html  # site b: the reason, not a crash
    assert "scikit-survival" in html and "lifelines" in html  # versions


def _sections(page: str) -> dict[str, str]:
    """``{h2 id: text of the section up to the next h2}`` from an HTML page (stdlib parser)."""
    from html.parser import HTMLParser

    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cur, self.out = None, {}

        def handle_starttag(self, tag, attrs):
            if tag == "h2":
                self.cur = dict(attrs).get("id", "")
                self.out.setdefault(self.cur, "")

        def handle_data(self, data):
            if self.cur is not None:
                self.out[self.cur] += data

    p = P()
    p.feed(page)
    return p.out


def test_report_has_model_card_limitations_and_metadata(run_dir):
    s = _sections(build_report(run_dir).read_text())
    assert {"model-card", "limitations", "run-metadata"} <= set(s), list(s)
    card = s["model-card"]
    for k in ("tile encoder", "slide pooling (MIL)", "fusion", "loss", "patients and events per site", "Intended use"):
        assert k in card, k
    assert "a: 60 patients" in card and "b: 20 patients, 0 events" in card
    assert "Research use only, not for clinical decisions" in s["limitations"]
    meta = s["run-metadata"]
    for k in ("report date (UTC)", "histofuse version", "git commit", "cohort", "time unit: days", "config digest"):
        assert k in meta, k
    assert re.search(r"config digest: [0-9a-f]{12}", meta)  # config.yaml validates as a RunConfig
    assert "median time (days)" in build_report(run_dir).read_text()


def test_risk_group_table_has_no_blank_index_column(run_dir):
    page = build_report(run_dir).read_text()
    t = page.split("Risk groups", 1)[1].split("</table>", 1)[0]
    heads = re.findall(r"<th[^>]*>(.*?)</th>", t, re.S)
    assert heads and all(h.strip() for h in heads), heads


def test_km_plot_has_bands_at_risk_table_and_unit_labels(tmp_path, monkeypatch):
    import matplotlib

    from pipeline.outputs import plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figs.append(fig))
    rng = np.random.default_rng(1)
    n = 30
    t, e = rng.exponential(5, n) + 0.1, rng.random(n) < 0.7
    g = np.array(["low"] * 14 + ["high"] * 15 + ["intermediate"])  # a group of 1: not drawn
    plots.km_by_group(t, e, g, tmp_path / "km.png", title="test", time_unit="days")
    plots.km_per_site(t, e, g, np.where(np.arange(n) % 2, "s1", "s2"), tmp_path / "km_sites.png", time_unit="days")
    for fig in figs:
        main = [ax for ax in fig.axes if ax.get_ylabel() == "survival probability"]
        assert main and all(ax.get_xlabel() == "time (days)" for ax in main)
        assert len(fig.axes) >= 2 * len(main)  # one at-risk table axes under each panel
        assert any(isinstance(c, matplotlib.collections.PolyCollection) for ax in main for c in ax.collections)  # CI
        texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
        assert "not drawn (< 2 patients): intermediate (n=1)" in texts
        tables = [ax for ax in fig.axes if "At risk" in " ".join(x.get_text() for x in ax.get_xticklabels())]
        assert len(tables) == len(main)  # lifelines' number-at-risk table under each panel
        assert "low   14" in tables[0].get_xticklabels()[0].get_text() or len(main) > 1
    matplotlib.pyplot.close("all")


def test_report_of_an_empty_folder_still_renders(tmp_path):
    html = build_report(tmp_path).read_text()
    assert "<h2>Versions</h2>" in html and "<img" not in html


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")


@pytest.mark.slow
@needs_chromium
def test_render_check_passes_on_report_and_fails_on_a_broken_page(run_dir, tmp_path):
    report = build_report(run_dir)
    r = render_check(report)
    assert r["images"] >= 5 and r["broken"] == [] and r["errors"] == [] and r["console"] == []
    page = report.read_text()
    for anchor in ("id='model-card'", "id='limitations'", "id='run-metadata'"):
        assert anchor in page, anchor
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        "<img alt='x' src='data:image/png;base64,AAAA'><script>console.error('boom')</script></body></html>"
    )
    r = render_check(bad)
    assert r["broken"] == ["x"] and any("boom" in e for e in r["errors"]) and r["console"]


def test_model_card_names_dropped_and_retried_sites(tmp_path):
    """Every dropped or retried site of a federated run is in the report, with its round."""
    (tmp_path / "train_summary.json").write_text(
        json.dumps({"mode": "federated", "min_sites": 2, "history": [{"round": 0}, {"round": 1}],
                    "dropped": [{"round": 1, "site": "south"}], "retried": [{"round": 1, "site": "south"}]})
    )  # fmt: skip
    card = _sections(build_report(tmp_path).read_text())["model-card"]
    assert "minimum 2 sites a round" in card
    assert "dropped: south (round 1)" in card and "retried: south (round 1)" in card
    (tmp_path / "train_summary.json").write_text(json.dumps({"mode": "federated", "history": [{"round": 0}]}))
    assert "no site dropped or retried" in _sections(build_report(tmp_path).read_text())["model-card"]


def test_heatmaps_carry_their_faithfulness_figure_and_numbers(run_dir):
    page = build_report(run_dir).read_text()
    tiles = page.split("<h2>Tile attributions")[1].split("<h2>")[0]  # the heatmap section only
    assert "How faithful these heatmaps are" in tiles and "3 patients" in tiles
    assert "attention: AUC 0.100 vs random 0.050, gap 0.050 (more faithful than random)" in tiles
    assert tiles.index('alt="deletion"') < tiles.index('alt="S1"')  # the deletion curves head the heatmaps
    rest = page.split("<h2>Faithfulness")[1]
    assert 'alt="deletion"' not in rest and "0.05" in rest  # the figure once; the full table still there
