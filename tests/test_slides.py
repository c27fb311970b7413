from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image

from data_specs.config import ExtractConfig
from pipeline.demo import write_pyramid_tiff
from pipeline.extract import extract_slides, load_features
from pipeline.slides import SlideError, TileDataset, open_slide, slide_mpp, thumbnail, tile_grid, tissue_mask

ASSETS = Path(str(resources.files("pipeline.demo_assets")))


@pytest.fixture(scope="module")
def tiny_encoder():
    from models import build_encoder

    return build_encoder("test_efficientnet", random_weights=True)


@pytest.fixture(scope="module")
def he_rgb() -> np.ndarray:
    """Real carcinoma H&E on a near-white canvas (background on the right and bottom)."""
    he = np.asarray(Image.open(ASSETS / "tumor_target_he.png").convert("RGB"))[:672, :672]
    canvas = np.full((896, 1120, 3), 243, np.uint8)
    canvas[:672, :672] = he
    return canvas


def test_demo_slide_opens_with_mpp_and_levels(tiny_demo):
    s = openslide.OpenSlide(str(next((tiny_demo.parent / "slides").glob("*.tif"))))
    assert s.properties["openslide.vendor"] == "aperio"
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert s.level_count == 3 and s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
    assert s.properties["openslide.objective-power"] == "20"


def test_real_aperio_svs_reads():
    s = open_slide(ASSETS / "cmu_small_region.svs")
    assert slide_mpp(s, ASSETS / "cmu_small_region.svs") == pytest.approx(0.499, abs=1e-3)
    mask = tissue_mask(thumbnail(s, 512))
    g = tile_grid(s, mask, 0.499, 0.5, 224, 0.5)
    assert 20 < len(g.coords) < (2220 // 224) * (2967 // 224)  # tissue, not the whole slide


def test_missing_mpp_error_and_override(tmp_path, he_rgb):
    p = tmp_path / "nompp.tif"
    write_pyramid_tiff(p, he_rgb, mpp=None)
    s = open_slide(p)
    with pytest.raises(SlideError, match=r"nompp.tif: no microns-per-pixel.*slide_mpp"):
        slide_mpp(s, p)
    assert slide_mpp(s, p, override=0.25) == 0.25


def test_tiles_map_back_to_level0_pixels(tmp_path, he_rgb):
    p = tmp_path / "s.tif"
    write_pyramid_tiff(p, he_rgb, mpp=0.25)  # 40x: 0.5 um/px tiles come from level 1
    s = open_slide(p)
    mask = tissue_mask(thumbnail(s, 512))
    g = tile_grid(s, mask, 0.25, 0.5, 112, 0.5)
    assert g.level == 1 and g.read_px == 112 and g.size0 == 224
    assert len(g.coords) == 9  # the 672 px tissue square holds 3 x 3 tiles of 224 level-0 px
    assert g.coords[:, 0].max() + g.size0 <= 672 and g.coords[:, 1].max() + g.size0 <= 672
    ds = TileDataset(p, g, lambda im: im)
    for i in (0, 4, 8):
        x, y = g.coords[i]
        tile = np.asarray(ds.read(i), float)
        ref = np.asarray(Image.fromarray(he_rgb[y : y + 224, x : x + 224]).resize((112, 112), Image.BILINEAR), float)
        assert np.abs(tile - ref).mean() < 12, "tile does not show the source pixels at its coordinate"


def test_extract_file_contents_resume_and_failures(tmp_path, he_rgb, tiny_encoder, caplog):
    good, blank, corrupt = tmp_path / "good.tif", tmp_path / "blank.tif", tmp_path / "corrupt.tif"
    write_pyramid_tiff(good, he_rgb, mpp=0.5)
    write_pyramid_tiff(blank, np.full((600, 800, 3), 244, np.uint8), mpp=0.5)
    write_pyramid_tiff(corrupt, he_rgb, mpp=0.5)
    corrupt.write_bytes(corrupt.read_bytes()[:5000])  # truncated download
    cfg = ExtractConfig(encoder="test_efficientnet", random_weights=True, batch_size=4)
    out = tmp_path / "feat"
    res = {r.slide_id: r for r in extract_slides([good, blank, corrupt], out, tiny_encoder, cfg, progress=False)}
    assert res["good"].status == "done" and res["good"].tiles == 9
    assert res["blank"].status == "empty" and res["blank"].tiles == 0
    assert res["corrupt"].status == "failed" and "corrupt.tif" in res["corrupt"].error
    f, c, attrs = load_features(out / "good.h5")
    assert f.shape == (9, tiny_encoder.dim) and f.dtype == np.float32 and np.isfinite(f).all()
    assert c.shape == (9, 2) and c.dtype == np.int64
    assert attrs["encoder"] == "test_efficientnet" and attrs["tile_px"] == 224 and attrs["slide_mpp"] == 0.5
    assert attrs["target_mpp"] == 0.5 and attrs["weights"] == "random"
    fe, ce, _ = load_features(out / "blank.h5")
    assert fe.shape == (0, tiny_encoder.dim) and ce.shape == (0, 2)
    rep = pd.read_csv(out / "extract_report.csv")
    assert set(rep.status) == {"done", "empty", "failed"}
    # features equal a direct encoding of the tile at the stored coordinate
    import torch

    ds = TileDataset(
        good,
        tile_grid(open_slide(good), tissue_mask(thumbnail(open_slide(good), 1024)), 0.5, 0.5, 224, 0.5),
        tiny_encoder.transform,
    )
    with torch.inference_mode():
        direct = tiny_encoder.model(ds[3][0][None]).numpy()[0]
    np.testing.assert_allclose(f[3], direct, rtol=1e-4, atol=1e-5)
    # resume: nothing re-encoded, files untouched
    mtime = os.stat(out / "good.h5").st_mtime_ns
    res2 = {r.slide_id: r for r in extract_slides([good, blank, corrupt], out, tiny_encoder, cfg, progress=False)}
    assert res2["good"].status == "skipped" and res2["blank"].status == "skipped"
    assert os.stat(out / "good.h5").st_mtime_ns == mtime


def test_incomplete_file_is_recomputed(tmp_path, he_rgb, tiny_encoder):
    good = tmp_path / "good.tif"
    write_pyramid_tiff(good, he_rgb, mpp=0.5)
    cfg = ExtractConfig(encoder="test_efficientnet", random_weights=True, batch_size=4)
    out = tmp_path / "feat"
    out.mkdir()
    with h5py.File(out / "good.h5", "w") as f:  # what a killed writer without atomic rename would leave
        f.create_dataset("features", data=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="incomplete"):
        load_features(out / "good.h5")
    (r,) = extract_slides([good], out, tiny_encoder, cfg, progress=False)
    assert r.status == "done" and load_features(out / "good.h5")[0].shape == (9, tiny_encoder.dim)
    # other settings (a different tile size) -> recomputed, not reused
    (r2,) = extract_slides([good], out, tiny_encoder, cfg.model_copy(update={"tile_px": 112}), progress=False)
    assert r2.status == "done"
