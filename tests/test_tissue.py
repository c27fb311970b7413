"""Tissue detection keeps small tissue on large slides whatever the thumbnail size; GeoJSON per piece."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.cohorts.demo import write_pyramid_tiff
from pipeline.slides.reader import open_slide, thumbnail, tile_grid
from pipeline.slides.tissue import mask_to_geojson, polygon_area, tissue_mask

CELL = 224  # level-0 px of one 0.5 um/px tile at 0.5 um/px


@pytest.fixture(scope="module")
def island_slide(tmp_path_factory, he_rgb):
    """8192 px slide (0.5 um/px) of glass with 81 one-tile islands of real H&E: (path, planted tile coords)."""
    side, step = 8192, 4
    canvas = np.full((side, side, 3), 243, np.uint8)
    he = np.asarray(Image.fromarray(np.ascontiguousarray(he_rgb[:448, :448])).resize((CELL, CELL)))
    truth = set()
    for by in range(1, side // CELL - 1, step):
        for bx in range(1, side // CELL - 1, step):
            canvas[by * CELL : (by + 1) * CELL, bx * CELL : (bx + 1) * CELL] = he
            truth.add((bx * CELL, by * CELL))
    path = tmp_path_factory.mktemp("islands") / "islands.tif"
    write_pyramid_tiff(path, canvas, 0.5, levels=4)
    return path, truth


@pytest.mark.parametrize("thumb_px", [512, 1024, 2048])
def test_small_islands_are_kept_at_any_thumbnail_size(island_slide, thumb_px):
    path, truth = island_slide
    s = open_slide(path)
    th = thumbnail(s, thumb_px)
    mask = tissue_mask(th, um_per_px=0.5 * s.dimensions[0] / th.size[0])
    g = tile_grid(s, mask, 0.5, 0.5, 224, 0.5)
    kept = {(int(x), int(y)) for x, y in g.coords}
    assert len(kept & truth) >= 0.95 * len(truth), (thumb_px, len(kept & truth), len(truth))
    assert len(kept - truth) <= 0.05 * len(truth)  # and glass stays glass


def _whole_mask_geojson(mask: np.ndarray, level0_size: tuple[int, int]) -> list[list[list[list[float]]]]:
    """The earlier implementation: every piece labelled and traced on the whole mask (the reference)."""
    from scipy import ndimage
    from skimage.measure import approximate_polygon, find_contours

    h, w = mask.shape
    sx, sy = level0_size[0] / w, level0_size[1] / h

    def ring(region):
        cs = find_contours(np.pad(region, 1).astype(np.uint8), 0.5)
        if not cs:
            return None
        c = approximate_polygon(max(cs, key=len), tolerance=0.5) - 1
        if len(c) < 4:
            return None
        pts = [[round((col + 0.5) * sx, 1), round((row + 0.5) * sy, 1)] for row, col in c]
        return pts + [pts[0]] if pts[0] != pts[-1] else pts

    labels, n = ndimage.label(mask)
    out = []
    for i in range(1, n + 1):
        piece = labels == i
        filled = ndimage.binary_fill_holes(piece)
        outer = ring(filled)
        if outer is None:
            continue
        holes, nh = ndimage.label(filled & ~piece)
        out.append([outer] + [r for j in range(1, nh + 1) if (r := ring(holes == j)) is not None])
    return out


def _extent(ring: list[list[float]]) -> list[float]:
    a = np.asarray(ring)
    return [*a.min(axis=0), *a.max(axis=0)]


def test_geojson_per_piece_matches_the_whole_mask_tracing(he_rgb):
    mask = tissue_mask(Image.fromarray(he_rgb).resize((560, 448)), um_per_px=1.0)
    mask[400:420, 500:530] = True  # a separate piece
    mask[50:60, 50:60] = False  # a hole
    ref = _whole_mask_geojson(mask, (1120, 896))
    got = [f["geometry"]["coordinates"] for f in mask_to_geojson(mask, (1120, 896))["features"]]
    assert len(got) == len(ref) >= 2
    for a, b in zip(got, ref, strict=True):
        assert len(a) == len(b)
        for ra, rb in zip(a, b, strict=True):
            assert polygon_area(ra) == pytest.approx(polygon_area(rb), rel=1e-3)
            # and in the same place: an area is blind to a lost bounding-box offset. Vertices may differ where
            # the simplification meets a tie, by at most its tolerance (0.5 mask px = 1 level-0 px here).
            assert _extent(ra) == pytest.approx(_extent(rb), abs=1.0)


def test_simplify_polyline_keeps_the_points_scikit_image_keeps():
    """The vectorised Douglas-Peucker keeps exactly approximate_polygon's points: mask contours (the
    half-pixel lattice, many ties and distances exactly at the tolerance) and random float polylines."""
    from scipy import ndimage
    from skimage.measure import approximate_polygon, find_contours

    from pipeline.slides.tissue import simplify_polyline

    rng = np.random.default_rng(0)
    lines = []
    for _ in range(6):
        blobs = ndimage.gaussian_filter(rng.random((120, 160)), 4) > 0.5
        lines += find_contours(np.pad(blobs, 1).astype(np.uint8), 0.5)
    lines += [np.cumsum(rng.normal(size=(n, 2)), axis=0) for n in (2, 3, 50, 400)]
    assert sum(len(c) for c in lines) > 2000
    for c in lines:
        for tol in (0.5, 1.0, 2.5):
            want = approximate_polygon(c, tolerance=tol)
            got = simplify_polyline(c, tolerance=tol)
            assert np.array_equal(got, want), (len(c), tol)
    assert np.array_equal(simplify_polyline(lines[0], 0), lines[0])
