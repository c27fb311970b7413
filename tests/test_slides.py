"""Slide reading, resolution, tissue and tiling, on slides built from the real H&E images."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from pipeline.cohorts.demo import write_pyramid_tiff
from pipeline.slides.reader import SlideError, TileDataset, open_slide, slide_mpp, thumbnail, tile_grid
from pipeline.slides.tissue import (
    TissueSettings,
    background_fraction,
    mask_to_geojson,
    pen_mask,
    polygon_area,
    tissue_mask,
)

ASSETS = Path(str(resources.files("pipeline.cohorts.demo_assets")))
SHARED_SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "histology" / "cmu_small_region.svs"


def _generic_tiff(path: Path, rgb: np.ndarray, mpp: float | None) -> None:
    """Pyramidal tiled TIFF with no vendor description; mpp (if any) only in the resolution tags."""
    import tifffile

    img = Image.fromarray(rgb)
    with tifffile.TiffWriter(path) as tif:
        for lv in range(2):
            res = {} if mpp is None else {"resolution": (1e4 / (mpp * 2**lv),) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(
                np.asarray(img),
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0 if lv == 0 else 1,
                metadata=None,
                **res,
            )
            img = img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)


def test_aperio_style_tiff_opens_with_mpp_and_levels(tmp_path, he_rgb):
    p = tmp_path / "aperio.tif"
    write_pyramid_tiff(p, he_rgb, mpp=0.5)
    s = open_slide(p)
    assert isinstance(s, openslide.OpenSlide) and s.properties["openslide.vendor"] == "aperio"
    assert slide_mpp(s, p) == pytest.approx(0.5) and s.level_count == 3
    assert s.properties["openslide.objective-power"] == "20"


def test_generic_tiff_mpp_from_resolution_tags(tmp_path, he_rgb):
    p, q = tmp_path / "generic.tif", tmp_path / "generic_nompp.tif"
    _generic_tiff(p, he_rgb, mpp=0.25)
    _generic_tiff(q, he_rgb, mpp=None)
    s = open_slide(p)
    assert s.properties["openslide.vendor"] == "generic-tiff" and s.level_count == 2
    assert slide_mpp(s, p) == pytest.approx(0.25, rel=1e-3)
    with pytest.raises(SlideError, match="generic_nompp.tif: no microns-per-pixel"):
        slide_mpp(open_slide(q), q)


def _slide_mask(slide, thumb_px: int, mpp: float) -> np.ndarray:
    th = thumbnail(slide, thumb_px)
    return tissue_mask(th, um_per_px=mpp * slide.dimensions[0] / th.size[0])


def test_real_aperio_svs_reads():
    path = ASSETS / "cmu_small_region.svs"
    s = open_slide(path)
    assert s.properties["openslide.vendor"] == "aperio"
    assert slide_mpp(s, path) == pytest.approx(0.499, abs=1e-3)
    g = tile_grid(s, _slide_mask(s, 512, 0.499), 0.499, 0.5, 224, 0.5)
    assert 20 < len(g.coords) < (2220 // 224) * (2967 // 224)  # tissue, not the whole slide


@pytest.mark.skipif(not SHARED_SVS.is_file(), reason=f"shared data folder absent ({SHARED_SVS})")
def test_shared_svs_is_the_shipped_copy():
    assert SHARED_SVS.read_bytes() == (ASSETS / "cmu_small_region.svs").read_bytes()
    assert open_slide(SHARED_SVS).dimensions == (2220, 2967)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_plain_image_fallback_reader(tmp_path, he_rgb, suffix):
    p = tmp_path / f"plain{suffix}"
    Image.fromarray(he_rgb).save(p, **({"quality": 95} if suffix == ".jpg" else {}))  # PIL's TIFF: flat, stripped
    s = open_slide(p)
    assert isinstance(s, openslide.ImageSlide) and s.dimensions == (1120, 896) and s.level_count == 1
    with pytest.raises(SlideError, match=rf"plain{suffix}: no microns-per-pixel"):
        slide_mpp(s, p)
    assert slide_mpp(s, p, fallback=0.5) == 0.5
    region = np.asarray(s.read_region((100, 50), 0, (64, 64)).convert("RGB"), float)
    assert np.abs(region - he_rgb[50:114, 100:164]).mean() < (4 if suffix == ".jpg" else 1e-9)


def test_unreadable_files_are_slide_errors(tmp_path, he_rgb):
    with pytest.raises(SlideError, match="missing.svs: slide file not found"):
        open_slide(tmp_path / "missing.svs")
    txt = tmp_path / "notes.txt"
    txt.write_text("not a slide")
    with pytest.raises(SlideError, match="notes.txt: not a slide format"):
        open_slide(txt)
    bad_png = tmp_path / "bad.png"
    Image.fromarray(he_rgb).save(bad_png)
    bad_png.write_bytes(bad_png.read_bytes()[:100])
    with pytest.raises(SlideError, match="bad.png"):
        s = open_slide(bad_png)
        s.read_region((0, 0), 0, (8, 8))


def test_mpp_policy_override_metadata_fallback(tmp_path, he_rgb, caplog):
    p = tmp_path / "s.tif"
    write_pyramid_tiff(p, he_rgb, mpp=0.5)
    s = open_slide(p)
    assert slide_mpp(s, p, fallback=0.25) == 0.5  # metadata wins over a fallback
    assert slide_mpp(s, p, override=0.25) == 0.25  # a per-slide value wins over metadata, with a warning
    assert "overrides 0.5" in caplog.text
    with pytest.raises(SlideError, match="must be a positive number"):
        slide_mpp(s, p, override=-1.0)


def test_tiles_map_back_to_level0_pixels(tmp_path, he_rgb):
    p = tmp_path / "s.tif"
    write_pyramid_tiff(p, he_rgb, mpp=0.25)  # 40x: 0.5 um/px tiles come from level 1
    s = open_slide(p)
    g = tile_grid(s, _slide_mask(s, 512, 0.25), 0.25, 0.5, 112, 0.5)
    assert g.level == 1 and g.read_px == 112 and g.size0 == 224
    assert len(g.coords) == 9  # the 672 px tissue square holds 3 x 3 tiles of 224 level-0 px
    assert g.coords[:, 0].max() + g.size0 <= 672 and g.coords[:, 1].max() + g.size0 <= 672
    ds = TileDataset(p, g)
    assert ds.reader_kind == "tiff"
    for i in (0, 4, 8):
        x, y = g.coords[i]
        tile, idx, keep = ds[i]
        assert tile.dtype == np.uint8 and tile.shape == (112, 112, 3) and idx == i and keep
        assert (ds.read_rgba(i)[..., 3] == 255).all()  # opaque: inside the slide
        assert np.array_equal(tile, ds.read_rgba(i)[..., :3])  # the direct TIFF read is OpenSlide's pixels
        ref = np.asarray(Image.fromarray(he_rgb[y : y + 224, x : x + 224]).resize((112, 112), Image.BILINEAR), float)
        assert np.abs(tile[..., :3] - ref).mean() < 12, "tile does not show the source pixels"
        wrong = np.asarray(Image.fromarray(he_rgb[y + 112 : y + 336, x : x + 224]).resize((112, 112)), float)
        assert np.abs(tile[..., :3] - wrong).mean() > 20  # the check can tell a shifted tile


def _slide_file(kind: str, tmp_path: Path, he_rgb: np.ndarray) -> Path:
    if kind == "svs":  # a real scanner's file: YCbCr JPEG tiles with shared tables
        return ASSETS / "cmu_small_region.svs"
    p = tmp_path / f"{kind}.tif"
    big = np.concatenate([he_rgb, he_rgb[::-1]], axis=0)[:, :1000]  # 1,200 x 1,000: edge tiles are partial
    write_pyramid_tiff(p, big, mpp=0.25) if kind == "aperio" else _generic_tiff(p, big, 0.25)
    return p


@pytest.mark.parametrize("kind", ["aperio", "generic", "svs"])
def test_direct_tiff_regions_are_openslides_pixels(tmp_path, he_rgb, kind):
    """Regions decoded straight from the TIFF equal OpenSlide's exactly: across JPEG tile borders, at level 0
    and 1, and past the level's right and bottom edge (OpenSlide's transparent pixels are black)."""
    from pipeline.slides.tiff_tiles import tiff_level

    p = _slide_file(kind, tmp_path, he_rgb)
    s = openslide.OpenSlide(str(p))
    rng = np.random.default_rng(0)
    assert s.level_count >= (1 if kind == "svs" else 2)
    for level in range(min(2, s.level_count)):
        ds = float(s.level_downsamples[level])
        lw, lh = s.level_dimensions[level]
        lv = tiff_level(p, s, level, [(0, 0, 300, 300)])
        assert lv is not None, f"{kind} level {level}: no direct reader"
        regions = [(250, 250, 20, 20), (lw - 100, lh - 50, 300, 120), (0, 0, lw + 7, 9)]
        regions += [(int(rng.integers(0, lw - 1)), int(rng.integers(0, lh - 1)), 448, 448) for _ in range(6)]
        for x, y, w, h in regions:
            ref = np.asarray(s.read_region((int(x * ds), int(y * ds)), level, (w, h)))
            got = lv.region(x, y, w, h)
            assert got.shape == (h, w, 3)
            np.testing.assert_array_equal(got, ref[..., :3], err_msg=f"{kind} level {level} region {(x, y, w, h)}")
        lv.close()


def test_tile_reader_falls_back_to_openslide(tmp_path, he_rgb, monkeypatch, caplog):
    """OpenSlide reads the tiles of a plain image, of a grid off its level's pixels, when asked, and when the
    direct decoding disagrees with it on the check tiles; the tiles are the same either way."""
    from pipeline.slides import tiff_tiles

    p = _slide_file("aperio", tmp_path, he_rgb)
    s = open_slide(p)
    mask = np.ones((10, 10), bool)
    g = tile_grid(s, mask, 0.25, 0.5, 112, 0.0)  # level 1, tiles at even level-0 pixels
    auto, forced = TileDataset(p, g), TileDataset(p, g, tile_reader="openslide")
    assert auto.reader_kind == "tiff" and forced.reader_kind == "openslide"
    for i in (0, len(g.coords) // 2, len(g.coords) - 1):
        np.testing.assert_array_equal(auto[i][0], forced[i][0])
    shifted = g.subset(slice(None))
    object.__setattr__(shifted, "coords", g.coords + 1)  # odd level-0 pixels: half a pixel at level 1
    assert TileDataset(p, shifted).reader_kind == "openslide"
    png = tmp_path / "plain.png"
    Image.fromarray(he_rgb).save(png)
    assert TileDataset(png, tile_grid(open_slide(png), mask, 0.5, 0.5, 112, 0.0)).reader_kind == "openslide"
    real = tiff_tiles.TiffLevel.region

    def off_by_one(self, *a):
        return real(self, *a) ^ np.uint8(1)

    monkeypatch.setattr(tiff_tiles.TiffLevel, "region", off_by_one)
    with caplog.at_level(logging.INFO, logger="pipeline.slides.tiff_tiles"):
        assert TileDataset(p, g).reader_kind == "openslide"
    assert "differs by up to 1" in caplog.text
    with pytest.raises(ValueError, match="tile_reader"):
        TileDataset(p, g, tile_reader="pil")


def test_overlap_grid_and_level_choice(tmp_path, he_rgb):
    p = tmp_path / "s.tif"
    write_pyramid_tiff(p, he_rgb, mpp=0.25)
    s = open_slide(p)
    mask = np.ones((10, 10), bool)
    g0 = tile_grid(s, mask, 0.25, 1.0, 224, 0.5)  # 4x coarser than level 0 -> level 2 exactly, no resize
    assert g0.level == 2 and g0.read_px == 224 and g0.size0 == 896
    g = tile_grid(s, mask, 0.25, 0.5, 112, 0.0, overlap_px=56)
    assert np.diff(np.unique(g.coords[:, 0]))[0] == 112  # stride (112 - 56) px at 0.5 um/px = 112 level-0 px
    with pytest.raises(SlideError, match="overlap_px"):
        tile_grid(s, mask, 0.25, 0.5, 112, 0.0, overlap_px=112)


def test_tissue_mask_finds_the_tissue_and_nothing_else(he_rgb):
    m = tissue_mask(Image.fromarray(he_rgb).resize((280, 224)), um_per_px=2.0)  # he_rgb is 0.5 um/px
    assert m[:168, :168].mean() > 0.9 and m[175:, :].mean() == 0 and m[:, 175:].mean() == 0
    assert not tissue_mask(Image.new("RGB", (200, 100), (243, 243, 243)), um_per_px=2.0).any()


def test_pen_marks_are_removed(he_rgb):
    img = he_rgb.copy()
    img[100:130, 40:600] = (30, 60, 190)  # a blue marker stroke across the tissue
    img[300:330, 40:600] = (40, 160, 60)  # a green one
    thumb = Image.fromarray(img).resize((560, 448))
    ink = pen_mask(np.asarray(thumb))
    assert ink[55:60, 50:280].mean() > 0.9 and ink[100:140, 50:280].mean() < 0.02
    keep = tissue_mask(thumb, TissueSettings(remove_pen=True), um_per_px=1.0)
    plain = tissue_mask(thumb, TissueSettings(remove_pen=False), um_per_px=1.0)
    assert plain[55:60, 50:280].mean() > 0.9  # without removal, ink over tissue counts as tissue
    assert keep[55:60, 50:280].mean() < 0.05 and keep[155:160, 50:280].mean() < 0.05
    assert (keep[75:140, 20:300] == plain[75:140, 20:300]).mean() > 0.98  # the tissue between the strokes stays
    assert not pen_mask(np.asarray(Image.fromarray(he_rgb).resize((280, 224)))).mean() > 0.01  # H&E is not ink


def test_background_tiles_are_rejected():
    s = TissueSettings(max_background=0.9)
    white = np.full((64, 64, 3), 240, np.uint8)
    assert background_fraction(white, s) == 1.0
    half = white.copy()
    half[:, :32] = (180, 100, 160)
    assert background_fraction(half, s) == pytest.approx(0.5)
    assert background_fraction(np.moveaxis(half, -1, 0), s) == pytest.approx(0.5)  # channel-first too


def test_geojson_contours_in_level0_coordinates(he_rgb):
    mask = np.zeros((100, 120), bool)
    mask[10:60, 20:80] = True
    mask[30:40, 40:50] = False  # a hole
    mask[80:90, 100:110] = True  # a second piece
    gj = mask_to_geojson(mask, (1200, 1000))  # level 0 is 10x the mask
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    json.dumps(gj)  # serialisable as is
    big = max(gj["features"], key=lambda f: polygon_area(f["geometry"]["coordinates"][0]))
    outer, *holes = big["geometry"]["coordinates"]
    assert big["properties"]["classification"]["name"] == "Tissue" and len(holes) == 1
    assert polygon_area(outer) == pytest.approx(50 * 60 * 100, rel=0.1)
    assert polygon_area(holes[0]) == pytest.approx(10 * 10 * 100, rel=0.3)
    xs = [p[0] for p in outer]
    ys = [p[1] for p in outer]
    assert min(xs) == pytest.approx(200, abs=10) and max(xs) == pytest.approx(800, abs=10)
    assert min(ys) == pytest.approx(100, abs=10) and max(ys) == pytest.approx(600, abs=10)


def test_collate_stacks_only_kept_tiles():
    """A batch's background tiles are counted, never copied into the stacked batch."""
    from pipeline.slides.reader import collate_tiles

    tiles = [np.full((4, 4, 3), v, np.uint8) for v in range(5)]
    x, idx, rejected = collate_tiles([(t, 10 + i, i % 2 == 0) for i, t in enumerate(tiles)])
    assert x.shape == (3, 4, 4, 3) and idx.tolist() == [10, 12, 14] and rejected == 2
    assert x[:, 0, 0, 0].tolist() == [0, 2, 4]
    x, idx, rejected = collate_tiles([(t, i, False) for i, t in enumerate(tiles)])
    assert x.shape == (0, 4, 4, 3) and len(idx) == 0 and rejected == 5
