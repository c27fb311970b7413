from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from data_specs.artifacts import RunFiles
from pipeline.cli import main
from pipeline.training.bundle import load_bundle, read_card

MODEL = RunFiles.MODEL


@pytest.fixture(scope="module")
def e2e_run(tiny_features):
    """``histofuse run`` on the tiny demo cohort once: (cohort, out folder, exit code, stdout)."""
    import contextlib
    import io

    from pipeline.training import survival_summary

    cohort, cfg, fdir = tiny_features
    out = cfg.out
    buf = io.StringIO()
    # the tiny demo's sites have 1-2 training events: a released baseline needs steps of >= 10 (k) events
    # per site, so with k = 2 here the run's survival curves and horizon columns are not trivially absent
    with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
        mp.setattr(survival_summary, "MIN_SITE_EVENTS", 2)
        rc = main(
            [
                "run",
                str(cohort),
                "--out",
                str(out),
                "--set",
                "federated.rounds=2",
                "--set",
                "federated.local_epochs=1",
                "--set",
                "federated.min_count=2",  # the tiny demo's sites have 2 training patients (default k is 10)
                "--set",
                "train.batch_size=4",
                "--set",
                "extract.batch_size=32",
                "--set",
                "evaluate.bootstrap=20",
            ]
        )
    return cohort, out, rc, buf.getvalue()


def test_run_end_to_end(e2e_run):
    cohort, out, rc, printed = e2e_run
    assert rc == 0
    assert "test C-index (pooled" in printed and "report.html" in printed
    for f in (
        "config.yaml",
        "model.safetensors",
        "risk_scores.csv",
        "metrics.json",
        "km_test.png",
        "report.html",
        "train_summary.json",
        "attributions/tiles.csv",
        "attributions/genes.csv",
        "attributions/gene_ig.csv",
        "attributions/gene_attributions.h5ad",
        "attributions/biomarkers.csv",
        "attributions/faithfulness.json",
        "attributions/deletion.png",
        "survival_curves.csv",
        "km_test_sites.png",
    ):
        assert (out / f).is_file(), f
    rs = pd.read_csv(out / "risk_scores.csv")
    assert list(rs.columns[:5]) == ["patient_id", "site", "split", "log_hz", "risk_group"]
    assert len(rs) == 12 and rs.log_hz.notna().all() and set(rs.risk_group) <= {"high", "low"}
    assert set(rs.split) <= {"train", "val", "test"}
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["pooled"]["cindex"] <= 1 and m["pooled"]["n"] == (rs.split == "test").sum()
    for k in ("uno_cindex", "td_auc", "ibs", "logrank_p", "notes"):
        assert k in m["pooled"], k
    # survival probabilities at the training event-time quartiles, from the Breslow baseline in the bundle
    surv = [c for c in rs.columns if c.startswith("surv_") and c.endswith("days")]  # the demo's time_unit
    assert surv and rs[surv].notna().all().all() and ((rs[surv] >= 0) & (rs[surv] <= 1)).all().all()
    assert (np.diff(rs[surv].to_numpy(), axis=1) <= 1e-9).all()  # non-increasing in time
    for _, g in rs.groupby("site"):  # one baseline per site: higher risk, lower survival
        assert (np.diff(g.sort_values("log_hz")[surv[-1]].to_numpy()) <= 1e-9).all()
    no_omics = rs[rs.patient_id == "DEMO-0010"].iloc[0]  # the demo patient without omics is scored, not dropped
    assert "omics" not in no_omics.modalities and np.isfinite(no_omics.log_hz)
    # tile outputs: IG per tile, a QuPath GeoJSON per slide, galleries cut from the slides
    gj = json.loads(next((out / "attributions" / "geojson").glob("*.geojson")).read_text())
    assert gj["type"] == "FeatureCollection" and "Attention" in gj["features"][0]["properties"]["measurements"]
    assert list((out / "attributions" / "galleries").glob("*.png"))
    genes = pd.read_csv(out / "attributions" / "genes.csv")
    assert len(genes) == 40 and genes["rank"].tolist() == list(range(1, 41))
    tiles = pd.read_csv(out / "attributions" / "tiles.csv")
    assert tiles.ig.notna().all()
    for _, t in tiles.groupby("patient_id"):
        assert t.attn.sum() == pytest.approx(1.0, abs=1e-4)
    assert list((out / "attributions" / "heatmaps").glob("*.png"))
    # a fitted network's tile attention is its residual branch's: the linear slide term's exact tile shares beside it
    faith = json.loads((out / "attributions" / "faithfulness.json").read_text())["tiles"]
    skip = read_card(out / "model.safetensors").config.model.skip
    assert skip in ("fitted", "none") and faith["attention_role"] == ("residual" if skip == "fitted" else "pooling")
    assert ("linear_share" in tiles.columns) == ("linear_share" in faith["auc"]) == (skip == "fitted")
    if skip == "fitted":
        assert tiles.linear_share.notna().all() and "Linear slide term share (log hazard)" in str(gj)
    html = (out / "report.html").read_text()
    sid = next((out / "attributions" / "heatmaps").glob("*_ig.png")).stem.removesuffix("_ig")
    ig_first = html.index(f'alt="{sid}_ig"') < html.index(f'alt="{sid}"')
    assert ig_first == (skip == "fitted")  # the heatmap to read first: IG's where attention is the residual's
    assert "data:image/png;base64," in html and "Top genes" in html and "<table" in html
    for section in ("Cohort", "Metrics (test set)", "Biomarker table", "Faithfulness", "Resolved config", "Versions"):
        assert f"<h2>{section}" in html, section
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    b = read_card(out / "model.safetensors")
    assert b.config.federated.rounds == 2 and b.omics and sorted(b.omics["genes"]) == sorted(genes.gene)
    assert b.features and b.features.encoder == "efficientnet_lite0_imagenet" and b.features.feature_kind == "imagenet"
    # predict again from the saved model alone: same scores
    rc = main(["predict", str(cohort), "--model", str(out / MODEL), "--out", str(out / "again")])
    assert rc == 0
    rs2 = pd.read_csv(out / "again" / "risk_scores.csv")
    np.testing.assert_allclose(rs2.log_hz, rs.log_hz, atol=1e-5)


def test_predict_refuses_other_encoder_features(e2e_run, tiny_features, tmp_path, capsys):
    cohort, out, rc, _ = e2e_run
    assert rc == 0
    fdir = tiny_features[2]
    other = tmp_path / "feat"
    shutil.copytree(fdir, other)
    for f in other.glob("*.h5"):
        with h5py.File(f, "a") as h:
            h.attrs["encoder"] = "resnet50"
    rc = main(["predict", str(cohort), "--model", str(out / MODEL), "--out", str(tmp_path), "--features", str(other)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "attribute 'encoder' is 'resnet50', expected 'efficientnet_lite0_imagenet'" in err


def test_predict_refuses_other_gene_panel_and_takes_overrides(e2e_run, tiny_features, tmp_path, capsys):
    import anndata as ad

    cohort, out, rc, _ = e2e_run
    fdir = tiny_features[2]
    a = ad.read_h5ad(cohort.parent / "omics.h5ad")
    genes = pd.read_csv(out / "attributions" / "genes.csv").gene
    a[:, [g for g in a.var_names if g != genes.iloc[0]]].copy().write_h5ad(tmp_path / "omics.h5ad")
    spec = tmp_path / "cohort.yaml"
    spec.write_text(cohort.read_text().replace("omics.h5ad", str(tmp_path / "omics.h5ad")))
    shutil.copy(cohort.parent / "patients.csv", tmp_path / "patients.csv")
    shutil.copy(cohort.parent / "clinical.csv", tmp_path / "clinical.csv")
    pts = pd.read_csv(tmp_path / "patients.csv")
    pts["slides"] = [str(cohort.parent / s) for s in pts.slides]
    pts.to_csv(tmp_path / "patients.csv", index=False)
    args = [
        "predict",
        str(spec),
        "--model",
        str(out / MODEL),
        "--out",
        str(tmp_path / "p"),
        "--features",
        str(fdir),
    ]
    assert main(args) == 2
    assert f"lack 1 gene(s) of the model's panel, e.g. ['{genes.iloc[0]}']" in capsys.readouterr().err
    # the unchanged cohort with tertile risk groups and chosen horizons
    args = ["predict", str(cohort), "--model", str(out / MODEL), "--out", str(tmp_path / "q"), "--features",
            str(fdir), "--set", "evaluate.risk_groups=tertiles", "--set", "evaluate.horizons=[1,2]"]  # fmt: skip
    assert main(args) == 0
    rs = pd.read_csv(tmp_path / "q" / "risk_scores.csv")
    assert set(rs.risk_group) <= {"low", "intermediate", "high"} and {"surv_1days", "surv_2days"} <= set(rs.columns)
    assert (
        main(["evaluate", str(tmp_path / "q" / "risk_scores.csv"), "--split", "all", "--set", "evaluate.bootstrap=10"])
        == 0
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(e2e_run):
    """The run's report in a real browser: it loads without console errors and every image decodes."""
    from pipeline.outputs.render_check import render_check

    _, out, rc, _ = e2e_run
    assert rc == 0
    r = render_check(out / "report.html")
    assert r["images"] >= 8 and r["broken"] == [] and r["errors"] == [] and r["console"] == []


@pytest.mark.parametrize("keep", ["omics", "clinical"])
def test_single_modality_cohorts_train(tiny_demo, tmp_path, keep, capsys):
    root = tiny_demo.parent
    pts = pd.read_csv(root / "patients.csv")
    pts["slides"] = ""
    pts.to_csv(tmp_path / "patients.csv", index=False)
    src = {
        "omics": "omics: {path: %s, allow_missing: true}\n" % (root / "omics.h5ad"),
        "clinical": "clinical: {path: %s}\n" % (root / "clinical.csv"),
    }[keep]
    spec = tmp_path / "cohort.yaml"
    ids = set(pts.patient_id)
    if keep == "omics":  # patients without omics would have no modality at all: leave them out
        import anndata as ad

        ids = set(ad.read_h5ad(root / "omics.h5ad").obs_names)
        pts[pts.patient_id.isin(ids)].to_csv(tmp_path / "patients.csv", index=False)
    spec.write_text("patients: patients.csv\n" + src)
    assert main(["validate", str(spec)]) == 0
    rc = main(
        [
            "train",
            str(spec),
            "--out",
            str(tmp_path / "run"),
            "--centralised",
            "--set",
            "train.epochs=2",
            "--set",
            "train.batch_size=4",
        ]
    )
    assert rc == 0
    dims = read_card(tmp_path / "run" / "model.safetensors").model_dims
    assert (dims["n_genes"] > 0) == (keep == "omics") and (dims["n_clinical"] > 0) == (keep == "clinical")
    assert dims["feature_dim"] == 0


def test_bad_config_value_is_one_line(tiny_demo, capsys):
    rc = main(["train", str(tiny_demo), "--set", "train.lr=-1"])
    assert rc == 2
    assert "train.lr = -1" in capsys.readouterr().err


def test_discrete_time_model_predicts_curves_from_hazards(tiny_demo, tmp_path):
    """A clinical-only NLL model: survival curves come from its hazards (cumprod(1 - h)) at the bin edges."""
    root = tiny_demo.parent
    pts = pd.read_csv(root / "patients.csv")
    pts["slides"] = ""
    pts.to_csv(tmp_path / "patients.csv", index=False)
    spec = tmp_path / "cohort.yaml"
    spec.write_text("patients: patients.csv\nclinical: {path: %s}\n" % (root / "clinical.csv"))
    run = tmp_path / "run"
    sets = ["train.loss=nll", "train.epochs=2", "train.batch_size=4", "evaluate.risk_groups=tertiles"]
    assert main(["train", str(spec), "--out", str(run), "--centralised", *sum((["--set", s] for s in sets), [])]) == 0
    assert main(["predict", str(spec), "--model", str(run / "model.safetensors")]) == 0
    model, card = load_bundle(run / "model.safetensors")
    assert card.baseline is None  # no Breslow baseline for a discrete-time head
    edges = model.get_buffer("bin_edges").numpy()
    curves = pd.read_csv(run / "survival_curves.csv")  # long form: patient_id, time, survival
    assert list(curves.columns) == ["patient_id", "time", "survival"]
    wide = curves.pivot(index="patient_id", columns="time", values="survival")
    assert wide.columns.tolist() == pytest.approx(edges[1:].tolist())
    s = wide.to_numpy()
    assert ((s >= 0) & (s <= 1)).all() and (np.diff(s, axis=1) <= 1e-9).all()
    rs = pd.read_csv(run / "risk_scores.csv")
    assert set(rs.risk_group) <= {"low", "intermediate", "high"} and any(c.startswith("surv_") for c in rs.columns)
    assert main(["evaluate", str(run / "risk_scores.csv"), "--split", "all", "--set", "evaluate.bootstrap=5"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["pooled"]["ibs"] is not None or "ibs" in m["pooled"]["notes"]


# ---------------------------------------------------------------- named errors, and a refused run damages nothing


def _clinical_cohort(tiny_demo, tmp_path, **changes):
    """The tiny demo's patients without slides (clinical only: trains in seconds), with column ``changes``."""
    root = tiny_demo.parent
    pts = pd.read_csv(root / "patients.csv")
    pts["slides"] = ""
    for k, v in changes.items():
        pts[k] = v
    pts.to_csv(tmp_path / "patients.csv", index=False)
    spec = tmp_path / "cohort.yaml"
    spec.write_text("patients: patients.csv\nclinical: {path: %s}\n" % (root / "clinical.csv"))
    return spec


def _one_line_error(capsys, *needles, lines: int | None = 1):
    """The stderr of a refused command: one ``error: ...`` (``lines`` lines long; a cohort's problem list is
    longer) naming every one of ``needles``, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    msg = err[err.index("error: ") :].rstrip("\n")
    assert lines is None or len(msg.splitlines()) == lines, err
    for n in needles:
        assert str(n) in msg, msg
    return msg


def test_all_censored_train_is_refused_and_keeps_the_previous_run(tiny_demo, tmp_path, capsys):
    spec = _clinical_cohort(tiny_demo, tmp_path, event=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the record of an earlier model\n")
    (run / "model.safetensors").write_bytes(b"earlier weights")
    rc = main(["train", str(spec), "--out", str(run), "--centralised", "--set", "train.epochs=1"])
    assert rc == 2
    _one_line_error(capsys, spec, "no patient has an event")
    assert (run / "config.yaml").read_text() == "the record of an earlier model\n"
    assert (run / "model.safetensors").read_bytes() == b"earlier weights"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "model.safetensors"]


def test_a_bad_cohort_writes_nothing_into_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("earlier\n")
    for cmd in ("train", "run", "cv"):
        assert main([cmd, str(tmp_path / "missing.yaml"), "--out", str(run)]) == 2
        _one_line_error(capsys, "missing.yaml", lines=None)
    assert [p.name for p in run.iterdir()] == ["config.yaml"] and (run / "config.yaml").read_text() == "earlier\n"


def test_no_event_in_training_or_validation_is_a_named_error():
    from types import SimpleNamespace

    from pipeline.stages import NoEventsError, check_trainable

    data = SimpleNamespace(
        splits={"train": np.array([0, 1]), "val": np.array([2]), "test": np.array([3])},
        event=np.array([False, False, False, True]),
        site=np.array([0, 1, 0, 1]),
        sites=["north", "south"],
    )
    with pytest.raises(NoEventsError, match=r"cohort.yaml: no site has an event .*'north': 0, 'south': 0"):
        check_trainable(data, "cohort.yaml")
    data.event[2] = True
    check_trainable(data, "cohort.yaml")  # one validation event is enough


def test_out_that_is_a_file_or_not_writable_is_a_named_error(tiny_demo, tmp_path, capsys, monkeypatch):
    spec = _clinical_cohort(tiny_demo, tmp_path)
    f = tmp_path / "taken"
    f.write_text("not a folder")
    assert main(["train", str(spec), "--out", str(f)]) == 2
    _one_line_error(capsys, f"--out {f}", "existing file")
    assert main(["train", str(spec), "--out", str(f / "sub")]) == 2
    _one_line_error(capsys, f"{f} is a file")
    import pipeline.cli

    monkeypatch.setattr(pipeline.cli.os, "access", lambda *a: False)  # running as root ignores chmod
    assert main(["train", str(spec), "--out", str(tmp_path / "ro")]) == 2
    _one_line_error(capsys, "not writable")
    assert f.read_text() == "not a folder" and not (tmp_path / "ro").exists()


def test_a_damaged_model_file_is_one_line_and_verbose_shows_the_traceback(tiny_demo, tmp_path, capsys):
    spec = _clinical_cohort(tiny_demo, tmp_path)
    for name, content in (("model.safetensors", b"\x00\x01 truncated"), ("model.pt", b"plain text, not a pickle")):
        bad = tmp_path / name
        bad.write_bytes(content)
        assert main(["predict", str(spec), "--model", str(bad), "--out", str(tmp_path / "o")]) == 2
        _one_line_error(capsys, bad)
    assert main(["predict", str(spec), "--model", str(bad), "--out", str(tmp_path / "o"), "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "exc, needles",
    [
        (PermissionError(13, "Permission denied", "/runs/x/config.yaml"), ["/runs/x/config.yaml", "Permission denied"]),
        (IsADirectoryError(21, "Is a directory", "/data/slide.svs"), ["/data/slide.svs", "folder"]),
        (FileExistsError(17, "File exists", "/runs/x"), ["/runs/x", "File exists"]),
        (OSError(22, "Invalid argument", "/m/model.pt"), ["/m/model.pt", "Invalid argument"]),
        (EOFError("Ran out of input"), ["/m/model.pt", "not a readable model file"]),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), ["out of GPU memory", "batch_size"]),
    ],
)
def test_every_expected_failure_is_one_line_naming_the_path(exc, needles, monkeypatch, capsys):
    import pickle

    import pipeline.cli

    assert isinstance(exc, pipeline.cli.expected_errors())
    assert issubclass(pickle.UnpicklingError, pipeline.cli.expected_errors())

    def boom(args, argv):
        raise exc

    monkeypatch.setitem(pipeline.cli.COMMANDS, "predict", boom)
    assert main(["predict", "c.yaml", "--model", "/m/model.pt"]) == 2
    _one_line_error(capsys, *needles)


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("pooled"), TypeError("bad call")])
def test_an_unexpected_error_is_not_swallowed(exc, monkeypatch):
    """Only the failures a user can fix become one line; a bug keeps its traceback (pytest sees it raised)."""
    import pipeline.cli

    def boom(args, argv):
        raise exc

    monkeypatch.setitem(pipeline.cli.COMMANDS, "predict", boom)
    with pytest.raises(type(exc)):
        main(["predict", "c.yaml", "--model", "/m/model.pt"])


# ---------------------------------------------------------------- TRIDENT/CLAM-style flags, --version, config --print


def test_version_flag(capsys):
    from pipeline.cli_parser import package_version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"histofuse {package_version()}"


@pytest.mark.parametrize("cmd", ["extract", "run", "demo"])
def test_tile_flags_map_onto_the_extract_config(cmd, tmp_path):
    from pipeline.cli_parser import build_parser, config_from_args

    flags = ["--encoder", "resnet18", "--mpp", "0.25", "--tile-px", "256", "--batch-size", "auto", "--device", "cpu"]
    cohort = [] if cmd == "demo" else [str(tmp_path / "c.yaml")]
    args = build_parser().parse_args([cmd, *cohort, "--out", str(tmp_path), "--set", "extract.tile_px=512", *flags])
    e = config_from_args(args, None).extract
    assert (e.encoder, e.target_mpp, e.tile_px, e.batch_size, e.device) == ("resnet18", 0.25, 256, "auto", "cpu")
    args = build_parser().parse_args([cmd, *cohort, "--mag", "40", "--batch-size", "16"])
    e = config_from_args(args, None, tmp_path).extract
    assert e.target_mpp == pytest.approx(0.25) and e.batch_size == 16


def test_bad_tile_flags_are_refused_by_the_parser(capsys):
    for bad in (["--batch-size", "0"], ["--batch-size", "big"], ["--mpp", "0.5", "--mag", "20"]):
        with pytest.raises(SystemExit) as e:
            main(["extract", "slides/", *bad])
        assert e.value.code == 2
    assert "expected a positive integer or 'auto'" in capsys.readouterr().err


def test_config_print_shows_the_resolved_config(tmp_path, capsys):
    import yaml

    from data_specs.config import resolve_config

    user = tmp_path / "mine.yaml"
    user.write_text("train: {epochs: 7}\n")
    assert main(["config", "--print", "--config", str(user), "--set", "train.lr=0.01", "--tile-px", "256"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    want = resolve_config(user, ["train.lr=0.01", "extract.tile_px=256"]).to_dict()
    del want["out"]  # not set: each command makes its own timestamped folder
    assert printed == want and "# out: not set" in text
    saved = tmp_path / "printed.yaml"  # the printed YAML is a valid --config file
    saved.write_text(text)
    assert resolve_config(saved).train.epochs == 7
    assert main(["config", "--print", "--out", str(tmp_path / "r")]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["out"] == str(tmp_path / "r")


def test_the_cohort_argument_has_help(capsys):
    from pipeline.cli_parser import COHORT_HELP

    for cmd in ("validate", "extract", "train", "run", "predict", "attribute", "cv"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert COHORT_HELP.split(";")[0] in out, cmd


def test_runs_without_out_get_a_new_timestamped_folder(tmp_path, monkeypatch):
    import re

    from pipeline.cli_parser import build_parser, config_from_args, timestamped_out

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "c.yaml"])
    out = config_from_args(args, None).out
    assert re.fullmatch(r"runs/train-\d{8}-\d{6}", out.as_posix()), out
    first = timestamped_out("train", now=0)
    first.mkdir(parents=True)
    assert timestamped_out("train", now=0).name == first.name + "-2"  # never an existing folder
    yaml_out = tmp_path / "cfg.yaml"
    yaml_out.write_text("out: from_yaml\n")
    args = build_parser().parse_args(["run", "c.yaml", "--config", str(yaml_out)])
    assert config_from_args(args, None).out == Path("from_yaml")  # a config's own out is kept


# ---------------------------------------------------------------- a failing train never damages the previous run


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["--centralised", "--federated"])
def test_a_train_failing_after_loading_leaves_the_previous_run_byte_identical(
    mode, tiny_demo, tmp_path, monkeypatch, capsys
):
    import pipeline.federated.embedded
    import pipeline.training.module

    spec = _clinical_cohort(tiny_demo, tmp_path)
    run = tmp_path / "run"
    sets = ["--set", "train.epochs=1", "--set", "federated.rounds=1", "--set", "train.batch_size=4"]
    sets += ["--set", "federated.min_count=2"]  # the tiny demo's sites have 2 training patients (default k is 10)
    assert main(["train", str(spec), "--out", str(run), mode, *sets]) == 0
    before = _snapshot(run)
    assert {"config.yaml", MODEL, "train_summary.json"} <= set(before)
    weights = read_card(run / MODEL).weights_sha256
    loaded = []

    def fails(data, cfg, out=None, *a, **k):
        loaded.append(len(data.patient_ids))  # the cohort loaded: the failure comes after
        if out is not None:  # a federated run has checkpointed a round before failing
            (Path(out) / "server_state.json").parent.mkdir(parents=True, exist_ok=True)
            (Path(out) / "server_state.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.training.module, "fit_local", lambda data, cfg, **k: fails(data, cfg))
    monkeypatch.setattr(pipeline.federated.embedded, "train_federated", fails)
    rc = main(["train", str(spec), "--out", str(run), mode, "--set", "train.lr=0.5", *sets])
    assert rc == 2 and loaded and "No space left on device" in capsys.readouterr().err
    after = _snapshot(run)
    staged = {k for k in after if k.startswith(".incomplete/")}
    assert {k: v for k, v in after.items() if k not in staged} == before
    # a federated run keeps its staged checkpoints for --resume; a centralised one leaves nothing behind
    kept = {".incomplete/config.yaml", ".incomplete/federated/server_state.json"}
    assert staged == (kept if mode == "--federated" else set())
    monkeypatch.undo()
    assert main(["train", str(spec), "--out", str(run), mode, *sets]) == 0  # a fresh run discards stale staging
    assert not (run / ".incomplete").exists()
    assert read_card(run / MODEL).weights_sha256 == weights  # same config, same seed: the same weights


def test_train_resume_continues_the_committed_federated_run(tiny_demo, tmp_path):
    spec = _clinical_cohort(tiny_demo, tmp_path)
    run = tmp_path / "run"
    sets = ["--set", "federated.rounds=2", "--set", "train.batch_size=4", "--set", "federated.min_count=2"]
    assert main(["train", str(spec), "--out", str(run), *sets]) == 0
    before = _snapshot(run)
    assert any(k.startswith("federated/") for k in before)
    weights = read_card(run / MODEL).weights_sha256
    assert main(["train", str(spec), "--out", str(run), "--resume", *sets]) == 0
    assert not (run / ".incomplete").exists()
    hist = json.loads((run / "train_summary.json").read_text())
    assert len(hist["history"]) == len(json.loads(before["train_summary.json"])["history"])
    assert read_card(run / MODEL).weights_sha256 == weights


def test_a_missing_optional_package_names_its_extra(monkeypatch, capsys):
    import pipeline.cli

    def needs_tifffile(args, argv):
        raise ModuleNotFoundError("No module named 'tifffile'", name="tifffile")

    monkeypatch.setitem(pipeline.cli.COMMANDS, "demo", needs_tifffile)
    assert main(["demo", "--build-only"]) == 2
    assert "pip install 'histofuse[demo]'" in _one_line_error(capsys, "tifffile")

    def a_bug(args, argv):
        raise ModuleNotFoundError("No module named 'nonexistent'", name="nonexistent")

    monkeypatch.setitem(pipeline.cli.COMMANDS, "demo", a_bug)
    with pytest.raises(ModuleNotFoundError):
        main(["demo", "--build-only"])


def test_a_cv_failing_in_a_fold_leaves_the_previous_run_byte_identical(tiny_demo, tmp_path, monkeypatch, capsys):
    import pipeline.training.module

    spec = _clinical_cohort(tiny_demo, tmp_path)
    run = tmp_path / "run"
    sets = ["--folds", "2", "--set", "federated.enabled=false", "--set", "train.epochs=1"]
    sets += ["--set", "train.batch_size=4"]
    assert main(["cv", str(spec), "--out", str(run), *sets]) == 0
    before = _snapshot(run)
    assert {"config.yaml", "folds.csv", "cv_results.json", "fold_1/config.yaml"} <= set(before)
    real, calls = pipeline.training.module.fit_local, []

    def second_fold_fails(data, cfg, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(data, cfg, **k)

    monkeypatch.setattr(pipeline.training.module, "fit_local", second_fold_fails)
    rc = main(["cv", str(spec), "--out", str(run), *sets, "--set", "train.lr=0.5"])
    assert rc == 2 and len(calls) == 2 and "No space left on device" in capsys.readouterr().err
    assert _snapshot(run) == before  # config.yaml, fold_0 and the results are the previous cv's


def test_extract_refuses_procs_with_shard_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["extract", str(tmp_path / "cohort.yaml"), "--procs", "2", "--shard", "1/2", "--out", str(out)])
    assert rc == 2 and "--procs and --shard cannot be combined" in capsys.readouterr().err
    assert not out.exists()


def _csv_cohort(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A slide-free patients.csv with a genes-by-patients expression CSV and a clinical CSV beside it."""
    ids = [f"P{i}" for i in range(6)]
    rows = "".join(f"{p},{'AB'[i // 3]},{100 + 10 * i},{i % 2},\n" for i, p in enumerate(ids))
    (tmp_path / "patients.csv").write_text("patient_id,site,time,event,slides\n" + rows)
    genes = "".join(f"G{j}," + ",".join(str(j + i) for i in range(6)) + "\n" for j in range(4))
    (tmp_path / "expr.csv").write_text("gene," + ",".join(ids) + "\n" + genes)
    clin = "".join(f"{p},{50 + i},{'I' if i % 2 else 'II'}\n" for i, p in enumerate(ids))
    (tmp_path / "clin.csv").write_text("patient_id,age,stage\n" + clin)
    return tmp_path / "patients.csv", tmp_path / "expr.csv", tmp_path / "clin.csv"


def test_validate_csv_cohort_with_omics_and_clinical_flags(tmp_path, capsys):
    patients, expr, clin = _csv_cohort(tmp_path)
    argv = ["validate", str(patients), "--omics", str(expr), "--clinical", str(clin), "--time-unit", "months"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"omics: {expr} (csv), 6 of 6 patients" in out
    assert f"clinical: {clin}, 6 of 6 patients" in out
    assert "time unit: months" in out
    assert "modalities per patient: omics+clinical: 6" in out


def test_validate_bad_omics_flag_is_a_named_error(tmp_path, capsys):
    patients, _, clin = _csv_cohort(tmp_path)
    assert main(["validate", str(patients), "--omics", str(tmp_path / "missing.csv"), "--clinical", str(clin)]) == 2
    err = capsys.readouterr().err
    assert "--omics" in err and "missing.csv" in err and "omics file not found" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 2  # one problem, not one per patient


def test_omics_flag_replaces_a_yaml_cohorts_omics(tmp_path, capsys):
    patients, expr, clin = _csv_cohort(tmp_path)
    (tmp_path / "cohort.yaml").write_text("name: c\npatients: patients.csv\nclinical: {path: clin.csv}\n"
                                          "omics: {path: elsewhere.csv}\n")  # fmt: skip
    assert main(["validate", str(tmp_path / "cohort.yaml"), "--omics", str(expr)]) == 0
    out = capsys.readouterr().out
    assert f"omics: {expr} (csv)" in out and "omics+clinical: 6" in out


def test_a_shared_expression_file_needs_extra_rows_ignore(tmp_path, capsys, caplog):
    """An expression file with rows of another cohort's patients: an error naming the option, or (``extra_rows:
    ignore``) those rows dropped with a log line saying how many and from which file."""
    import logging

    from data_specs import load_cohort
    from pipeline.omics.readers import read_omics

    patients, expr, clin = _csv_cohort(tmp_path)
    lines = patients.read_text().splitlines()
    patients.write_text("\n".join(lines[:5]) + "\n")  # P0..P3 only; the expression file also has P4, P5
    spec = tmp_path / "cohort.yaml"
    spec.write_text("name: c\npatients: patients.csv\nomics: {path: expr.csv}\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "'P4'" in err and "'P5'" in err and "set omics.extra_rows: ignore" in err
    spec.write_text("name: c\npatients: patients.csv\nomics: {path: expr.csv, extra_rows: ignore}\n")
    assert main(["validate", str(spec)]) == 0
    assert "2 omics row(s) of patients not in the cohort are ignored" in capsys.readouterr().out
    cohort = load_cohort(spec)
    with caplog.at_level(logging.INFO, logger="pipeline.omics.readers"):
        adata = read_omics(cohort.omics, [p.patient_id for p in cohort.patients])
    assert list(adata.obs_names) == ["P0", "P1", "P2", "P3"]
    assert any("dropped 2 of 6 rows" in r.getMessage() and "expr.csv" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_run_with_seeds_repeats_into_seed_folders_and_reports_the_spread(tmp_path, capsys):
    """`run --seeds 2`: DIR/seed-0 (the full run, with its report) and DIR/seed-1 (train, predict, evaluate,
    baselines), train.seed 0 and 1, and seeds_summary.json holding each metric's values and mean +- sd."""
    import yaml
    from test_splits import _cohort  # tests/ is on sys.path (pytest's rootdir-relative imports)

    spec = _cohort(tmp_path, n=60)
    out = tmp_path / "o"
    argv = ["run", str(spec), "--centralised", "--seeds", "2", "--out", str(out), "--set", "train.epochs=3",
            "--set", "evaluate.bootstrap=20"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (out / "seed-0" / "report.html").is_file() and not (out / "seed-1" / "report.html").exists()
    ms = [json.loads((out / f"seed-{k}" / "metrics.json").read_text()) for k in (0, 1)]
    cfgs = [yaml.safe_load((out / f"seed-{k}" / "config.yaml").read_text()) for k in (0, 1)]
    assert [c["train"]["seed"] for c in cfgs] == [0, 1]
    tests = [
        set(pd.read_csv(out / f"seed-{k}" / "risk_scores.csv").query("split == 'test'").patient_id) for k in (0, 1)
    ]
    assert tests[0] != tests[1]  # the split seed moves with train.seed
    summary = json.loads((out / "seeds_summary.json").read_text())
    c = [m["pooled"]["cindex"] for m in ms]
    assert summary["seeds"] == [0, 1] and summary["pooled"]["cindex"]["values"] == pytest.approx(c)
    assert summary["pooled"]["cindex"]["mean"] == pytest.approx(np.mean(c))
    assert summary["pooled"]["cindex"]["sd"] == pytest.approx(np.std(c, ddof=1))
    assert set(summary["per_site_cindex"]) == {"A", "B", "C"} and "model_minus_best_baseline" in summary
    assert "2 seeds (train.seed and the split seed):" in printed
    row = next(ln for ln in printed.splitlines() if ln.startswith("cindex "))
    assert f"{c[0]:.3f}" in row and f"{np.mean(c):.3f} +- {np.std(c, ddof=1):.3f}" in row


def test_repeat_over_seeds_summarises_what_each_seed_wrote(tmp_path):
    from data_specs import resolve_config
    from pipeline.files import write_json
    from pipeline.repeats import repeat_over_seeds

    calls = []

    def run_one(cfg, full):
        calls.append((cfg.train.seed, cfg.out.name, full))
        c = 0.6 + 0.1 * cfg.train.seed
        pooled = {"cindex": c, "uno_cindex": c - 0.01, "ibs": 0.2}
        write_json(cfg.out / "metrics.json", {"split": "test", "pooled": pooled, "per_site": {"A": {"cindex": c}}})
        return cfg.out

    cfg = resolve_config(None, ["train.seed=7"], out=tmp_path / "o")
    summary, lines = repeat_over_seeds(cfg, 3, run_one)
    assert calls == [(0, "seed-0", True), (1, "seed-1", False), (2, "seed-2", False)]
    assert summary["pooled"]["cindex"]["mean"] == pytest.approx(0.7) and summary["pooled"]["cindex"][
        "sd"
    ] == pytest.approx(0.1)
    assert summary["per_site_cindex"]["A"]["values"] == pytest.approx([0.6, 0.7, 0.8])
    assert json.loads((tmp_path / "o" / "seeds_summary.json").read_text())["seeds"] == [0, 1, 2]
    assert any(ln.startswith("cindex ") and ln.endswith("0.700 +- 0.100") for ln in lines)
    with pytest.raises(ValueError, match="--seeds 0: must be >= 1"):
        repeat_over_seeds(cfg, 0, run_one)
