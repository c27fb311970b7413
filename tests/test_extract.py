"""Slides -> features files: contents, coordinates, resume, crash safety, failures, shards, workers, precision."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data_specs.config import ExtractConfig
from pipeline.cohorts.demo import write_pyramid_tiff
from pipeline.slides.encode import EncoderRunner, choose_batch_size, device_batch_size
from pipeline.slides.extract import extract_slides, parse_shard, shard_of
from pipeline.slides.features import load_features, read_attrs
from pipeline.slides.reader import open_slide

ASSETS = Path(str(resources.files("pipeline.cohorts.demo_assets")))
REPO = Path(__file__).resolve().parents[1]
CFG = ExtractConfig(encoder="test_efficientnet", random_weights=True, batch_size=4)


@pytest.fixture(scope="module")
def enc():
    from models import build_encoder

    return build_encoder("test_efficientnet", random_weights=True)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, he_rgb) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    out = {
        "good": d / "good.tif",
        "blank": d / "blank.tif",
        "corrupt": d / "corrupt.tif",
        "nompp": d / "nompp.tif",
        "plain": d / "plain.png",
    }
    write_pyramid_tiff(out["good"], he_rgb, mpp=0.5)
    write_pyramid_tiff(out["blank"], np.full((600, 800, 3), 244, np.uint8), mpp=0.5)
    write_pyramid_tiff(out["corrupt"], he_rgb, mpp=0.5)
    out["corrupt"].write_bytes(out["corrupt"].read_bytes()[:5000])  # a truncated download
    write_pyramid_tiff(out["nompp"], he_rgb, mpp=None)
    Image.fromarray(he_rgb).save(out["plain"])
    return out


def _direct(enc, path: Path, xy, size0: int, level: int, read_px: int) -> np.ndarray:
    """Encode the tile at a level-0 coordinate, read straight from OpenSlide."""
    s = open_slide(path)
    rgb = np.asarray(s.read_region((int(xy[0]), int(xy[1])), level, (read_px, read_px)).convert("RGB"))
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return enc.model(enc.preprocess(x)).numpy()[0]


def test_features_files_report_and_failures(tmp_path, slides, enc, caplog):
    out = tmp_path / "feat"
    order = ["good", "blank", "corrupt", "nompp", "plain"]
    res = {r.slide_id: r for r in extract_slides([slides[k] for k in order], out, enc, CFG, progress=False)}
    assert res["good"].status == "done" and res["good"].tiles == 9
    assert res["blank"].status == "empty" and res["blank"].tiles == 0
    assert "no tissue tiles" in caplog.text and "blank.tif" in caplog.text
    assert res["corrupt"].status == "failed" and "corrupt.tif" in res["corrupt"].error
    assert "decoder error" in res["corrupt"].error and "microns" not in res["corrupt"].error
    assert res["nompp"].status == "failed" and "no microns-per-pixel" in res["nompp"].error
    assert res["plain"].status == "failed" and "plain.png" in res["plain"].error

    f, c, attrs = load_features(out / "good.h5")
    assert f.shape == (9, enc.dim) and f.dtype == np.float32 and np.isfinite(f).all()
    assert c.shape == (9, 2) and c.dtype == np.int64
    assert attrs["encoder"] == "test_efficientnet" and attrs["tile_px"] == 224 and attrs["slide_mpp"] == 0.5
    assert attrs["target_mpp"] == 0.5 and attrs["weights"] == "random" and attrs["n_tiles"] == 9
    assert attrs["optimize"] == "trace" and attrs["precision"] == "fp32"  # the CPU default, recorded
    with h5py.File(out / "good.h5") as h:  # grown in chunks, never allocated whole
        assert h["features"].maxshape == (None, enc.dim) and h["features"].chunks[0] == 256
    # every stored coordinate maps back to the pixels that were encoded
    for i in (0, 4, 8):
        np.testing.assert_allclose(f[i], _direct(enc, slides["good"], c[i], 224, 0, 224), rtol=1e-4, atol=1e-4)
    fe, ce, ae = load_features(out / "blank.h5")  # empty but well formed
    assert fe.shape == (0, enc.dim) and ce.shape == (0, 2) and ae["complete"] and ae["n_tiles"] == 0
    for suffix in (".thumb.jpg", ".mask.png", ".tissue.geojson"):
        assert (out / f"good{suffix}").is_file()
    gj = json.loads((out / "good.tissue.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]

    rep = pd.read_csv(out / "extract_report.csv")
    cols = ["slide_id", "slide_path", "status", "tiles", "rejected", "seconds", "error", "fingerprint", "reason"]
    assert list(rep.columns) == cols
    assert dict(zip(rep.slide_id, rep.status, strict=True)) == {k: res[k].status for k in order}
    js = json.loads((out / "extract_report.json").read_text())
    assert js["summary"] == {"done": 1, "empty": 1, "failed": 3}

    # rerun: finished slides skipped (files untouched); earlier failures not retried...
    mtime = os.stat(out / "good.h5").st_mtime_ns
    res2 = {r.slide_id: r for r in extract_slides([slides[k] for k in order], out, enc, CFG, progress=False)}
    assert res2["good"].status == "skipped" and res2["blank"].status == "skipped"
    assert os.stat(out / "good.h5").st_mtime_ns == mtime
    assert res2["corrupt"].status == "failed" and "earlier run" in res2["corrupt"].error
    # ... unless asked, and mpp given for slides without it (per slide, or for all): those now succeed
    cfg = CFG.model_copy(update={"retry_failed": True, "slide_mpp": 0.5})
    res3 = {
        r.slide_id: r
        for r in extract_slides(
            [slides[k] for k in order], out, enc, cfg, progress=False, slide_mpps={str(slides["plain"]): 0.25}
        )
    }
    assert res3["corrupt"].status == "failed" and "earlier run" not in res3["corrupt"].error
    assert res3["nompp"].status == "done" and res3["nompp"].tiles == 9
    assert res3["plain"].status == "done" and load_features(out / "plain.h5")[2]["slide_mpp"] == 0.25
    assert res3["plain"].tiles == 1  # at 0.25 um/px, 0.5 um/px tiles are 448 level-0 px: one fits the tissue
    # another tile size -> different attributes -> recomputed, not reused
    (r4,) = extract_slides([slides["good"]], out, enc, CFG.model_copy(update={"tile_px": 112}), progress=False)
    assert r4.status == "done" and r4.tiles == 36


def test_a_slide_without_mpp_is_retried_when_a_rerun_gives_one(tmp_path, slides, enc):
    out = tmp_path / "feat"
    (r,) = extract_slides([slides["nompp"]], out, enc, CFG, progress=False)
    assert r.status == "failed" and r.reason == "no_mpp" and "no microns-per-pixel" in r.error
    for _ in range(2):  # a rerun without an mpp does not retry it, and the message never nests
        (r,) = extract_slides([slides["nompp"]], out, enc, CFG, progress=False)
        assert r.status == "failed" and r.reason == "no_mpp"
        assert r.error.count("failed in an earlier run") == 1 and "no microns-per-pixel" in r.error
    rep = json.loads((out / "extract_report.json").read_text())["slides"]
    assert rep[0]["error"].count("earlier run") == 1 and rep[0]["reason"] == "no_mpp"
    # --slide-mpp (cfg.slide_mpp) retries it without --retry-failed...
    (r,) = extract_slides([slides["nompp"]], out, enc, CFG.model_copy(update={"slide_mpp": 0.5}), progress=False)
    assert r.status == "done" and r.tiles == 9 and r.reason == "" and r.error == ""
    # ... and so does an mpp given for the slide in the manifest (or the cohort's slide_mpp)
    out2 = tmp_path / "feat2"
    assert extract_slides([slides["nompp"]], out2, enc, CFG, progress=False)[0].reason == "no_mpp"
    (r,) = extract_slides([slides["nompp"]], out2, enc, CFG, progress=False, slide_mpps={str(slides["nompp"]): 0.5})
    assert r.status == "done" and load_features(out2 / "nompp.h5")[2]["slide_mpp"] == 0.5


def test_truncated_tiff_reports_the_decoder_error_not_missing_mpp(tmp_path, slides, enc):
    full = slides["good"].read_bytes()
    for cut in (5000, len(full) // 2):  # OpenSlide does not take it; PIL reads the header, then cannot decode
        p = tmp_path / f"trunc{cut}.tif"
        p.write_bytes(full[:cut])
        for cfg in (CFG, CFG.model_copy(update={"slide_mpp": 0.5})):
            (r,) = extract_slides([p], tmp_path / f"f{cut}{cfg.slide_mpp}", enc, cfg, progress=False)
            assert r.status == "failed" and r.reason == "", r
            assert str(p) in r.error and "decoder error" in r.error and "truncated or corrupt" in r.error, r.error
            assert "microns" not in r.error


def test_earlier_failures_follow_the_latest_report_and_strip_nested_prefixes(tmp_path):
    from pipeline.slides.report import earlier_failures

    nested = "failed in an earlier run (rerun with --retry-failed): " * 2 + "x.tif: no microns-per-pixel in ..."
    old = {"slides": [{"slide_id": "x", "status": "failed", "fingerprint": "f1", "error": nested}]}
    old["slides"].append({"slide_id": "y", "status": "failed", "fingerprint": "f2", "error": "y.tif: bad"})
    new = {"slides": [{"slide_id": "y", "status": "done", "fingerprint": "f2", "error": ""}]}
    (tmp_path / "extract_report.shard-1-of-2.json").write_text(json.dumps(old))
    (tmp_path / "extract_report.json").write_text(json.dumps(new))
    t = time.time()
    os.utime(tmp_path / "extract_report.shard-1-of-2.json", (t - 60, t - 60))  # written by an earlier run
    got = earlier_failures(tmp_path)
    assert list(got) == ["x"]  # y was extracted since
    assert got["x"].error == "x.tif: no microns-per-pixel in ..." and got["x"].reason == "no_mpp"  # old report


def test_cli_extract_exit_status_and_summary(tmp_path, slides, capsys):
    from pipeline.cli import main

    folder = tmp_path / "slides"
    folder.mkdir()
    for k in ("corrupt", "nompp"):
        (folder / slides[k].name).write_bytes(slides[k].read_bytes())
    args = ["--set", "extract.encoder=test_efficientnet", "--set", "extract.random_weights=true"]
    args += ["--set", "extract.batch_size=4"]
    assert main(["extract", str(folder), "--out", str(tmp_path / "a"), *args]) == 1  # every slide failed
    assert "2 slides: 2 failed; every slide failed, errors in" in capsys.readouterr().out
    (folder / "good.tif").write_bytes(slides["good"].read_bytes())
    assert main(["extract", str(folder), "--out", str(tmp_path / "b"), *args]) == 0
    out = capsys.readouterr().out
    assert "3 slides: 1 done, 2 failed; 2 of 3 slides failed, errors in" in out and "extract_report.csv" in out
    assert main(["extract", str(folder), "--out", str(tmp_path / "b"), "--slide-mpp", "0.5", *args]) == 0
    assert "3 slides: 1 done, 1 skipped, 1 failed; 1 of 3" in capsys.readouterr().out  # nompp retried


def test_incomplete_file_is_never_read_as_complete(tmp_path, slides, enc):
    out = tmp_path / "feat"
    out.mkdir()
    with h5py.File(out / "good.h5", "w") as f:  # what a killed writer without atomic rename would leave
        f.create_dataset("features", data=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="incomplete"):
        load_features(out / "good.h5")
    (r,) = extract_slides([slides["good"]], out, enc, CFG, progress=False)
    assert r.status == "done" and load_features(out / "good.h5")[0].shape == (9, enc.dim)


_KILL_SCRIPT = """
import sys
from pathlib import Path
from data_specs.config import ExtractConfig
from models import build_encoder
from pipeline.slides.extract import extract_slides
from pipeline.slides.features import FeaturesWriter
import time
append = FeaturesWriter.append
def slow_append(self, features, coords):  # >= 1.6 s for the 81-tile slide: the kill lands mid-slide on any machine
    time.sleep(0.02)
    append(self, features, coords)
FeaturesWriter.append = slow_append
cfg = ExtractConfig(encoder="test_efficientnet", random_weights=True, batch_size=1, max_background=1.0)
enc = build_encoder("test_efficientnet", random_weights=True)
extract_slides([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]), enc, cfg, progress=False)
"""


@pytest.mark.slow  # a fresh interpreter imports torch and timm: ~10-30 s
def test_resume_after_kill_9(tmp_path, slides, enc, he_rgb):
    big = tmp_path / "big.tif"
    write_pyramid_tiff(big, np.tile(he_rgb[:672, :672], (3, 3, 1)), mpp=0.5)  # 81 tiles, one per batch
    order = [slides["good"], big, slides["blank"]]
    out = tmp_path / "feat"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out), *map(str, order)], env=env, cwd=REPO)
    deadline = time.monotonic() + 60
    while not list(out.glob(".big.h5.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)  # let it write a few batches
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-slide"
    tmps = list(out.glob(".big.h5.*.tmp"))
    assert tmps and not (out / "big.h5").exists(), "a half-written slide must stay under its temporary name"
    assert read_attrs(tmps[0]) is None  # not complete, whatever state h5 left it in
    assert (out / "good.h5").is_file()
    mtime = os.stat(out / "good.h5").st_mtime_ns
    cfg = CFG.model_copy(update={"max_background": 1.0})
    res = {r.slide_id: r for r in extract_slides(order, out, enc, cfg, progress=False)}
    assert res["good"].status == "skipped" and os.stat(out / "good.h5").st_mtime_ns == mtime
    assert res["big"].status == "done" and res["big"].tiles == 81 and res["blank"].status == "empty"
    assert not list(out.glob(".*.tmp")), "stale temporary files of the killed run are cleaned up"


def test_two_workers_equal_one(tmp_path, slides, enc):
    a = extract_slides([slides["good"]], tmp_path / "w0", enc, CFG, progress=False)
    two = CFG.model_copy(update={"num_workers": 2})
    b = extract_slides([slides["good"]], tmp_path / "w2", enc, two, progress=False)
    assert a[0].status == b[0].status == "done"
    fa, ca, _ = load_features(tmp_path / "w0" / "good.h5")
    fb, cb, _ = load_features(tmp_path / "w2" / "good.h5")
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-6)


def test_shards_partition_the_cohort(tmp_path, slides, enc):
    ids = [f"slide-{i:03d}" for i in range(300)]
    parts = [{i for i in ids if shard_of(i, 3) == k} for k in (1, 2, 3)]
    assert set().union(*parts) == set(ids) and sum(map(len, parts)) == 300
    assert all(60 < len(p) < 140 for p in parts)  # roughly even
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("0/3", "4/3", "x", "1/2/3"):
        with pytest.raises(ValueError, match=f"shard '{bad}'"):
            parse_shard(bad)
    order = [slides["good"], slides["blank"], slides["nompp"]]
    seen = []
    for k in (1, 2):
        res = extract_slides(order, tmp_path, enc, CFG.model_copy(update={"shard": f"{k}/2"}), progress=False)
        seen += [r.slide_id for r in res]
        assert (tmp_path / f"extract_report.shard-{k}-of-2.csv").is_file()
    assert sorted(seen) == ["blank", "good", "nompp"]


def test_background_tiles_rejected_at_read_time(tmp_path, he_rgb, enc):
    img = he_rgb.copy()
    img[224:448, 224:448] = 250  # one 224 px tile of glass inside the tissue square: the thumbnail mask fills it
    p = tmp_path / "hole.tif"
    write_pyramid_tiff(p, img, mpp=0.5)
    (r,) = extract_slides([p], tmp_path / "f", enc, CFG.model_copy(update={"min_tissue": 0.0}), progress=False)
    _, c, attrs = load_features(tmp_path / "f" / "hole.h5")
    assert r.rejected >= 1 and attrs["n_rejected"] == r.rejected and [224, 224] not in c.tolist()


def test_precision_and_memory_format_on_cpu(slides, enc):
    x = torch.from_numpy(np.asarray(Image.open(ASSETS / "tumor_target_he.png").convert("RGB"))[:448, :448].copy())
    tiles = x.unflatten(0, (2, 224)).unflatten(2, (2, 224)).permute(0, 2, 4, 1, 3).reshape(4, 3, 224, 224)
    ref = EncoderRunner(enc, CFG.model_copy(update={"channels_last": False}))
    fp32 = ref(tiles.contiguous())
    cl = EncoderRunner(enc, CFG)(tiles.contiguous())
    np.testing.assert_allclose(cl, fp32, rtol=1e-4, atol=1e-4)
    bf = EncoderRunner(enc, CFG.model_copy(update={"precision": "bf16"}))
    assert bf.precision == "bf16" and ref.precision == "fp32"
    b16 = bf(tiles.contiguous())
    cos = (b16 * fp32).sum(1) / np.linalg.norm(b16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() > 0.98, cos


SHARED_HISTOLOGY = REPO.parent / "shared" / "data" / "histology"


def _real_tiles(n: int = 6, side: int = 358) -> torch.Tensor:
    """``[n, 3, side, side]`` uint8 tiles of the real H&E images (a side that forces the encoder's resize)."""
    imgs = [Image.open(ASSETS / "tumor_target_he.png").convert("RGB")]
    svs = SHARED_HISTOLOGY / "cmu_small_region.svs"
    if svs.is_file():
        s = open_slide(svs)
        imgs.append(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
        s.close()
    out = []
    for i in range(n):
        a = np.asarray(imgs[i % len(imgs)])
        y, x = (i * 97) % (a.shape[0] - side), (i * 151) % (a.shape[1] - side)
        out.append(torch.from_numpy(a[y : y + side, x : x + side].copy()).permute(2, 0, 1))
    return torch.stack(out)


def test_traced_encoder_equals_eager_on_real_tiles():
    """The CPU default (optimize=auto: jit trace + freeze in fp32, batch norm folded) gives eager fp32's features
    on real H&E tiles: relative L2 error per tile <= RTOL = 1e-4 (measured ~1e-6)."""
    from models import build_encoder
    from pipeline.slides.encode import RTOL, relative_error

    enc = build_encoder("efficientnet_lite0_imagenet")  # real ImageNet weights: real activations, real BN stats
    tiles = _real_tiles()
    cfg = ExtractConfig(batch_size=8)
    eager = EncoderRunner(enc, cfg.model_copy(update={"optimize": "none"}))
    traced = EncoderRunner(enc, cfg)
    assert eager.optimize == "none" and traced.optimize == "trace" and traced.precision == "fp32"
    assert isinstance(traced.model, torch.jit.ScriptModule) and not isinstance(eager.model, torch.jit.ScriptModule)
    ref, got = eager(tiles), traced(tiles)
    assert RTOL == 1e-4
    assert relative_error(torch.from_numpy(got), torch.from_numpy(ref)) <= RTOL
    assert float(np.abs(got - ref).max()) < 1e-3 * float(np.abs(ref).max())


class _DictOut(torch.nn.Module):  # not traceable: a dict at the output
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"f": x.mean((2, 3))}


class _ShapeBranch(torch.nn.Module):  # traces, but the trace bakes in the example's batch size
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.mean((2, 3))
        return f if x.shape[0] == 2 else -f


def _tiny(model: torch.nn.Module):
    from models.encoders import TileEncoder

    return TileEncoder(model.eval(), lambda im: im, 3, "tiny", "random", "random", (3, 32, 32))


def test_optimize_auto_choice_and_fallback(caplog):
    from pydantic import ValidationError

    from models import build_encoder

    enc = build_encoder("test_efficientnet", random_weights=True)
    assert EncoderRunner(enc, CFG).optimize == "trace"  # auto on CPU
    assert EncoderRunner(enc, CFG.model_copy(update={"optimize": "none"})).optimize == "none"
    assert EncoderRunner(enc, CFG.model_copy(update={"compile": True})).optimize == "none"  # compile instead
    with pytest.raises(ValidationError, match="optimize=trace and extract.compile"):
        ExtractConfig(optimize="trace", compile=True)
    with pytest.raises(ValidationError, match="optimize=inductor and extract.compile"):
        ExtractConfig(optimize="inductor", compile=True)
    with pytest.raises(ValidationError, match="optimize=inductor is fp32 only"):
        ExtractConfig(optimize="inductor", precision="bf16")
    with pytest.raises(ValidationError, match="fp32 only"):
        ExtractConfig(optimize="trace", precision="bf16")
    bf = EncoderRunner(enc, CFG.model_copy(update={"precision": "bf16"}))
    assert bf.precision == "bf16" and bf.optimize == "none"  # reduced precision runs eager
    for bad, why in ((_DictOut(), "could not be traced"), (_ShapeBranch(), "differ from eager fp32")):
        caplog.clear()
        r = EncoderRunner(_tiny(bad), CFG)  # auto: falls back to eager, with a warning
        assert r.optimize == "none" and why in caplog.text
        x = torch.randint(0, 255, (5, 3, 32, 32), dtype=torch.uint8)
        if isinstance(bad, _ShapeBranch):
            assert np.allclose(r(x), -r.enc.preprocess(x).mean((2, 3)).numpy(), atol=1e-6)  # the eager branch
        with pytest.raises(ValueError, match="tiny"):  # asked for explicitly: an error, not a silent fallback
            EncoderRunner(_tiny(bad), CFG.model_copy(update={"optimize": "trace"}))


def test_full_batches_regroups_kept_tiles_in_grid_order():
    """For a graph compiled for one batch size: every batch but the last has exactly that many tiles, in grid
    order, with the rejected counts carried; a batch that is already full passes through without a copy."""
    from pipeline.slides.encode import full_batches

    def batch(ids, rejected):
        x = torch.tensor(ids, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 2, 2, 3).contiguous()
        return x, torch.tensor(ids, dtype=torch.int64), rejected

    src = [batch([0, 1, 2, 3], 0), batch([4, 6], 1), batch([], 4), batch([8, 9, 10], 1), batch([12], 3)]
    out = list(full_batches(iter(src), 4))
    assert [o[1].tolist() for o in out] == [[0, 1, 2, 3], [4, 6, 8, 9], [10, 12]]
    assert all(o[0][:, 0, 0, 0].tolist() == o[1].tolist() for o in out)  # tiles stay with their index
    assert [o[2] for o in out] == [0, 6, 3] and sum(o[2] for o in out) == sum(b[2] for b in src)
    assert out[0][0].data_ptr() == src[0][0].data_ptr()  # full already: not copied
    tail = list(full_batches(iter([batch([0, 1, 2, 3], 0), batch([], 5)]), 4))
    assert [len(o[1]) for o in tail] == [4, 0] and tail[1][2] == 5 and tail[1][0].shape == (0, 2, 2, 3)
    assert list(full_batches(iter([]), 4)) == []


@pytest.fixture(scope="module")
def inductor_works() -> None:
    """Skip unless inductor can build CPU kernels here (a C++ compiler and its headers), probed on a tiny graph."""
    from pipeline.slides import encode as en

    if en.cxx_compiler() is None:
        pytest.skip("no C++ compiler for inductor")
    try:
        torch.compile(lambda x: torch.relu(x) * 2 + 1, dynamic=False)(torch.randn(8))
    except Exception as e:  # a broken toolchain is this machine's, not the code's
        pytest.skip(f"inductor cannot compile here: {type(e).__name__}: {e}")


def test_inductor_graph_runs_full_batches_and_equals_eager(tmp_path, slides, enc, inductor_works):
    """extract.optimize=inductor: a graph compiled (inductor, freezing) for batches of exactly batch_size, within
    RTOL of eager fp32; a slide's kept tiles regrouped into full batches, the last shorter one traced. The
    features file equals the traced run's."""
    from pipeline.slides.encode import RTOL, relative_error

    cfg = CFG.model_copy(update={"optimize": "inductor"})
    runner = EncoderRunner(enc, cfg)
    assert runner.optimize == "inductor" and runner.fixed is not None and runner.batch_size == 4
    calls = []
    fixed = runner.fixed
    runner.fixed = lambda x: (calls.append(len(x)), fixed(x))[1]
    eager = EncoderRunner(enc, cfg.model_copy(update={"optimize": "none"}))
    x = torch.randint(0, 255, (4, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for tiles in (x, x[:3]):
        assert relative_error(torch.from_numpy(runner(tiles)), torch.from_numpy(eager(tiles))) <= RTOL
    assert calls == [4]  # the full batch ran the compiled graph, the short one the traced graph

    res = extract_slides([slides["good"]], tmp_path / "ind", enc, cfg, progress=False)
    ref = extract_slides([slides["good"]], tmp_path / "trace", enc, CFG, progress=False)
    assert res[0].status == ref[0].status == "done" and res[0].tiles == ref[0].tiles == 9  # 4 + 4 + 1
    f, c, attrs = load_features(tmp_path / "ind" / "good.h5")
    f0, c0, attrs0 = load_features(tmp_path / "trace" / "good.h5")
    assert attrs["optimize"] == "inductor" and attrs0["optimize"] == "trace"
    np.testing.assert_array_equal(c, c0)
    assert relative_error(torch.from_numpy(f), torch.from_numpy(f0)) <= RTOL


def test_optimize_auto_tries_inductor_only_for_large_runs_and_keeps_the_faster(enc, monkeypatch, request):
    from pipeline.slides import encode as en

    assert en.AUTO_INDUCTOR_TILES == 20_000
    big = en.AUTO_INDUCTOR_TILES
    small = EncoderRunner(enc, CFG, expected_tiles=big - 1)  # a small run: the compile would not pay
    assert small.optimize == "trace" and small.fixed is None
    monkeypatch.setattr(en, "cxx_compiler", lambda: None)
    nocxx = EncoderRunner(enc, CFG, expected_tiles=big)
    assert nocxx.optimize == "trace" and nocxx.fixed is None  # no compiler: auto stays traced
    with pytest.raises(ValueError, match="optimize=inductor needs a C\\+\\+ compiler"):
        EncoderRunner(enc, CFG.model_copy(update={"optimize": "inductor"}))
    monkeypatch.undo()
    request.getfixturevalue("inductor_works")
    monkeypatch.setattr(en, "_INDUCTOR_GAIN", 0.0)  # the compiled graph always "faster": kept
    assert EncoderRunner(enc, CFG, expected_tiles=big).optimize == "inductor"
    monkeypatch.setattr(en, "_INDUCTOR_GAIN", 1e9)  # always slower: the traced graph alone
    slower = EncoderRunner(enc, CFG, expected_tiles=big)
    assert slower.optimize == "trace" and slower.fixed is None


def test_extract_expects_the_first_grid_times_the_run_s_slides(tmp_path, slides, enc, monkeypatch):
    from pipeline.slides import extract as ex

    seen = []

    class Recording(EncoderRunner):
        def __init__(self, *a, expected_tiles=0, **k):
            seen.append(expected_tiles)
            super().__init__(*a, expected_tiles=expected_tiles, **k)

    monkeypatch.setattr(ex, "EncoderRunner", Recording)
    res = extract_slides([slides["plain"], slides["good"], slides["blank"]], tmp_path, enc, CFG, progress=False)
    assert [r.status for r in res] == ["failed", "done", "empty"]
    assert seen == [9 * 2]  # built once, on the first slide that encodes: its 9 grid tiles x 2 slides from it on


def test_native_bf16_query_agrees_with_the_cpu_flags():
    from pipeline.slides.encode import cpu_has_native_bf16

    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(info.read_text().split())
    if not flags & {"avx512_bf16", "amx_bf16"}:
        assert not cpu_has_native_bf16()
    elif "amx_bf16" in flags:
        assert cpu_has_native_bf16()


def test_batch_size_default_depends_on_the_device_and_a_number_is_kept():
    """extract.batch_size unset (the default) or auto: 32 tiles on a CPU, 64 on a GPU before probing; a number as
    given."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ExtractConfig().batch_size is None
    assert [device_batch_size(None, cpu), device_batch_size("auto", cpu)] == [32, 32]
    assert [device_batch_size(None, gpu), device_batch_size("auto", gpu)] == [64, 64]
    assert [device_batch_size(64, cpu), device_batch_size(8, gpu)] == [64, 8]


def test_choose_batch_size_stops_before_running_out_of_memory():
    def fits(b: int) -> None:
        if b > 300:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert choose_batch_size(fits) == 256
    assert choose_batch_size(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), start=32) == 16


@pytest.mark.slow
def test_torch_compile_gives_the_same_features(slides, enc):
    tiles = torch.randint(0, 255, (4, 3, 224, 224), dtype=torch.uint8)
    eager = EncoderRunner(enc, CFG)(tiles)
    compiled = EncoderRunner(enc, CFG.model_copy(update={"compile": True}))(tiles)
    np.testing.assert_allclose(compiled, eager, rtol=1e-3, atol=1e-3)


def test_cli_extract_with_shard_and_per_slide_mpp(tmp_path, slides, capsys):
    from data_specs.cohort import CohortError, load_cohort
    from pipeline.cli import main

    manifest = tmp_path / "patients.csv"
    manifest.write_text(
        "patient_id,site,time,event,slides,slide_mpp\n"
        f"P1,a,10,1,{slides['good']},\n"
        f"P2,a,20,0,{slides['plain']},0.5\n"
        f"P3,b,30,1,{slides['nompp']},\n"
    )
    assert load_cohort(manifest).slide_mpp_overrides() == {str(slides["plain"]): 0.5}
    out = tmp_path / "run"
    args = ["extract", str(manifest), "--out", str(out), "--shard", "1/1", "--workers", "1", "--slide-mpp", "0.25"]
    args += ["--set", "extract.encoder=test_efficientnet", "--set", "extract.random_weights=true"]
    assert main(args + ["--set", "extract.batch_size=4"]) == 0
    fdir = next((out / "features").iterdir())
    rep = pd.read_csv(fdir / "extract_report.shard-1-of-1.csv").set_index("slide_id")
    assert (rep.status == "done").all()
    assert load_features(fdir / "plain.h5")[2]["slide_mpp"] == 0.5  # per slide
    assert load_features(fdir / "nompp.h5")[2]["slide_mpp"] == 0.25  # --slide-mpp for slides without it
    assert load_features(fdir / "good.h5")[2]["slide_mpp"] == 0.5  # metadata wins over --slide-mpp
    bad = tmp_path / "bad.csv"
    bad.write_text(f"patient_id,site,time,event,slides,slide_mpp\nP1,a,10,1,{slides['good']},-2\n")
    with pytest.raises(CohortError, match=r"row 1: field 'slide_mpp' = '-2': slide_mpp must be a positive"):
        load_cohort(bad)


def test_cli_extract_a_folder_of_slides(tmp_path, slides):
    import shutil

    from pipeline.cli import main
    from pipeline.slides.extract import discover_slides

    folder = tmp_path / "slides"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(slides["good"], folder / "good.svs")
    shutil.copy(slides["blank"], folder / "sub" / "blank.tif")
    (folder / ".partial.tif").write_bytes(b"x")
    (folder / "notes.txt").write_text("not a slide")
    out = folder / "out"  # an output folder inside the slide folder is never searched
    args = ["extract", str(folder), "--out", str(out), "--set", "extract.encoder=test_efficientnet"]
    assert main(args + ["--set", "extract.random_weights=true", "--set", "extract.batch_size=4"]) == 0
    fdir = next((out / "features").iterdir())
    assert discover_slides(folder, exclude=out) == [folder / "good.svs", folder / "sub" / "blank.tif"]
    rep = pd.read_csv(fdir / "extract_report.csv").set_index("slide_id")
    assert rep.status.to_dict() == {"good": "done", "blank": "empty"}
    assert main(["extract", str(tmp_path / "nothing_here"), "--out", str(out)]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_path_matches_cpu(tmp_path, slides, enc):
    """bf16 autocast, pinned memory, on-device preprocessing, automatic batch size: same features as CPU fp32."""
    cpu = extract_slides([slides["good"]], tmp_path / "cpu", enc, CFG.model_copy(update={"device": "cpu"}))
    gpu_cfg = CFG.model_copy(update={"device": "cuda", "batch_size": "auto", "num_workers": 2})
    gpu = extract_slides([slides["good"]], tmp_path / "gpu", enc, gpu_cfg)
    assert cpu[0].tiles == gpu[0].tiles == 9
    a, b = load_features(tmp_path / "cpu" / "good.h5")[0], load_features(tmp_path / "gpu" / "good.h5")
    assert b[2]["precision"] in ("bf16", "fp16")
    cos = (a * b[0]).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b[0], axis=1)
    assert cos.min() > 0.98
    enc.model.to("cpu")


@pytest.mark.slow  # two fresh interpreters
def test_cli_extract_in_two_processes_merges_the_shard_reports(tmp_path, slides):
    from pipeline.cli import main

    folder = tmp_path / "slides"
    folder.mkdir()
    for k in ("good", "blank", "corrupt", "nompp"):
        (folder / slides[k].name).write_bytes(slides[k].read_bytes())
    out = tmp_path / "out"
    args = ["extract", str(folder), "--out", str(out), "--procs", "2", "--set", "extract.encoder=test_efficientnet"]
    assert main(args + ["--set", "extract.random_weights=true", "--set", "extract.batch_size=4"]) == 0
    fdir = next((out / "features").iterdir())
    assert (fdir / "extract_report.shard-1-of-2.csv").is_file() and (fdir / "extract_report.shard-2-of-2.csv").is_file()
    rep = pd.read_csv(fdir / "extract_report.csv").set_index("slide_id").status.to_dict()
    assert rep == {"blank": "empty", "corrupt": "failed", "good": "done", "nompp": "failed"}
    assert (out / "config.yaml").is_file()  # resolved once; the workers are given it, never re-parse argv
    assert not list(out.glob("config.shard-*.yaml"))
    feats, _, attrs = load_features(fdir / "good.h5")
    assert feats.shape[0] == 9 and attrs["encoder"] == "test_efficientnet"  # the --set config reached the workers


def test_slide_ids():
    from pipeline.slides.features import slide_id_of

    assert slide_id_of(Path("a/TCGA-01.svs")) == "TCGA-01"
    assert slide_id_of(Path("a/case-7.ome.tiff")) == "case-7"
    assert slide_id_of(Path("dicom/case-9/1.2.840.1234.dcm")) == "case-9"  # DICOM: one folder per slide


def test_read_ahead_thread_gives_the_same_features_file(tmp_path, slides, enc):
    big = tmp_path / "big.tif"
    rgb = np.asarray(Image.open(ASSETS / "tumor_target_he.png").convert("RGB"))
    write_pyramid_tiff(big, np.tile(rgb[:672, :672], (2, 2, 1)), mpp=0.5)  # 36 tiles, 9 batches of 4
    runs = {}
    for ahead, threads in ((0, 1), (1, 1), (3, 1), (0, 2), (0, 3), (2, 2)):
        cfg = CFG.model_copy(update={"read_ahead": ahead, "read_threads": threads, "max_background": 1.0})
        (r,) = extract_slides([big], tmp_path / f"a{ahead}_{threads}", enc, cfg, progress=False)
        assert r.status == "done" and r.tiles == 36
        runs[ahead, threads] = load_features(tmp_path / f"a{ahead}_{threads}" / "big.h5")
    for key in runs:
        np.testing.assert_array_equal(runs[key][1], runs[0, 1][1])  # same tiles in the same order
        np.testing.assert_array_equal(runs[key][0], runs[0, 1][0])  # same encoder, same batches: identical


def test_threaded_batches_equal_the_data_loaders_and_close_their_handles(tmp_path, he_rgb):
    import threading

    from pipeline.slides.features import tissue_settings
    from pipeline.slides.reader import TileDataset, collate_tiles, open_slide, threaded_batches, tile_grid

    p = tmp_path / "s.tif"
    rgb = np.asarray(Image.open(ASSETS / "tumor_target_he.png").convert("RGB"))
    img = np.tile(rgb[:672, :672], (2, 2, 1))
    img[:224, :448] = 255  # two background tiles: the batches' rejected counts
    write_pyramid_tiff(p, img, mpp=0.5)
    slide = open_slide(p)
    grid = tile_grid(slide, np.ones((8, 8), bool), 0.5, 0.5, 224, 0.0)
    slide.close()
    tissue = tissue_settings(CFG)
    ds = TileDataset(p, grid, tissue)
    want = list(torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_tiles))
    assert sum(b[2] for b in want) == 2

    def readers() -> int:  # the pools' threads (ThreadPoolExecutor names them tile-reader_<k>)
        return sum(t.name.startswith("tile-reader_") for t in threading.enumerate())

    for threads in (2, 3, 7):
        got = list(threaded_batches(ds, 5, threads))
        assert len(got) == len(want) == 8
        for (x, i, r), (x0, i0, r0) in zip(got, want, strict=True):
            torch.testing.assert_close(x, x0, rtol=0, atol=0)
            assert i.tolist() == i0.tolist() and r == r0
        assert readers() == 0  # the pool's threads are joined
    gen = threaded_batches(ds, 5, 2)
    next(gen)
    assert readers() >= 1  # the pool is running
    gen.close()  # a consumer that stops early (the encoder failed) closes the copies and the pool
    assert readers() == 0
    ds.close()


def test_direct_tiff_reader_gives_the_same_features_file_as_openslide(tmp_path, slides, enc):
    runs = {}
    for reader in ("auto", "openslide"):
        cfg = CFG.model_copy(update={"tile_reader": reader})
        (r,) = extract_slides([slides["good"]], tmp_path / reader, enc, cfg, progress=False)
        assert r.status == "done" and r.tiles == 9
        runs[reader] = load_features(tmp_path / reader / "good.h5")
    assert runs["auto"][2]["tile_reader"] == "tiff" and runs["openslide"][2]["tile_reader"] == "openslide"
    np.testing.assert_array_equal(runs["auto"][1], runs["openslide"][1])
    np.testing.assert_array_equal(runs["auto"][0], runs["openslide"][0])  # the same pixels, the same features


@pytest.mark.parametrize(("reader", "threads"), [("auto", 1), ("openslide", 1), ("auto", 2)])
def test_a_corrupt_tile_mid_slide_fails_that_slide_with_either_tile_reader(tmp_path, enc, reader, threads):
    import tifffile

    p = tmp_path / "s.tif"
    rgb = np.asarray(Image.open(ASSETS / "tumor_target_he.png").convert("RGB"))
    write_pyramid_tiff(p, np.tile(rgb[:672, :672], (2, 2, 1)), mpp=0.5)  # 6 x 6 JPEG tiles of 256 px at level 0
    with tifffile.TiffFile(p) as tf:
        off = int(tf.pages[0].dataoffsets[1 * 6 + 2])  # under grid tiles the reader's check does not read
    data = bytearray(p.read_bytes())
    data[off : off + 2] = b"\0\0"  # no JPEG start marker
    p.write_bytes(bytes(data))
    cfg = CFG.model_copy(update={"tile_reader": reader, "max_background": 1.0, "thumbnail_px": 300,
                                 "read_threads": threads, "read_ahead": 2 if threads == 1 else 0})  # fmt: skip
    (r,) = extract_slides([p], tmp_path / reader, enc, cfg, progress=False)
    assert r.status == "failed" and "reading tiles failed" in r.error and str(p) in r.error
    assert not (tmp_path / reader / "s.h5").exists()


def test_prefetcher_keeps_order_bounds_memory_and_hands_errors_over():
    from pipeline.slides.prefetch import Prefetcher

    made = []

    def source():
        for i in range(50):
            made.append(i)
            yield i

    got = []
    with Prefetcher(source, depth=2) as items:
        for i in items:
            time.sleep(0.002)
            assert len(made) - len(got) <= 4  # queue (2) + the one being put + the one handed out
            got.append(i)
    assert got == list(range(50))

    def failing():
        yield 1
        raise OSError("tile 2 is truncated")

    with pytest.raises(OSError, match="tile 2 is truncated"), Prefetcher(failing, depth=1) as items:
        assert list(items) == [1]

    import threading

    def endless():
        while True:
            yield 0

    pre = Prefetcher(endless, depth=2, name="endless-reader")
    with pytest.raises(RuntimeError, match="encoder"), pre as items:
        next(items)
        raise RuntimeError("the encoder failed")
    assert not any(t.name == "endless-reader" for t in threading.enumerate()), "the thread is stopped and joined"
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(endless, depth=0)


def test_unreadable_tiles_mid_slide_fail_that_slide_only_with_read_ahead(tmp_path, slides, enc, monkeypatch):
    import openslide

    from pipeline.slides import reader

    real = reader.TileDataset.read_rgb

    def broken(self, i):
        if i == 5:
            raise openslide.OpenSlideError("Not a JPEG file")
        return real(self, i)

    monkeypatch.setattr(reader.TileDataset, "read_rgb", broken)
    cfg = CFG.model_copy(update={"read_ahead": 2, "max_background": 1.0})
    res = extract_slides([slides["good"], slides["blank"]], tmp_path, enc, cfg, progress=False)
    assert [r.status for r in res] == ["failed", "empty"]
    assert "reading tiles failed (Not a JPEG file)" in res[0].error and str(slides["good"]) in res[0].error
    assert not (tmp_path / "good.h5").exists() and not list(tmp_path.glob(".good.h5.*.tmp"))


def test_the_encoder_is_placed_and_traced_once_per_run_not_per_slide(tmp_path, slides, enc, monkeypatch):
    from pipeline.slides import extract as ex

    built = []

    class Counting(EncoderRunner):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(ex, "EncoderRunner", Counting)
    cfg = CFG.model_copy(update={"optimize": "trace"})
    res = extract_slides([slides["good"], slides["plain"], slides["blank"]], tmp_path, enc, cfg, progress=False)
    assert [r.status for r in res] == ["done", "failed", "empty"] and len(built) == 1
