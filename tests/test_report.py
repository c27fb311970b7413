"""The HTML report: self-contained, sections present when their files are, and a real-browser render check."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline.outputs.report import build_report, render_check


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


def test_report_of_an_empty_folder_still_renders(tmp_path):
    html = build_report(tmp_path).read_text()
    assert "<h2>Versions</h2>" in html and "<img" not in html


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")


@pytest.mark.slow
@needs_chromium
def test_render_check_passes_on_report_and_fails_on_a_broken_page(run_dir, tmp_path):
    r = render_check(build_report(run_dir))
    assert r["images"] >= 5 and r["broken"] == [] and r["errors"] == [] and r["console"] == []
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        "<img alt='x' src='data:image/png;base64,AAAA'><script>console.error('boom')</script></body></html>"
    )
    r = render_check(bad)
    assert r["broken"] == ["x"] and any("boom" in e for e in r["errors"]) and r["console"]
