"""Tissue on a slide thumbnail: a mask, pen-mark removal, per-tile pixel checks, and QuPath GeoJSON contours.

The mask is computed once per slide on an RGB thumbnail (``thumbnail_px`` on its longest side):

1. Otsu threshold on HSV saturation (stained tissue is saturated, glass is not), never below 20/255 so
   faint background is not called tissue, and pixels that are near white excluded;
2. optionally, pen marks removed: pixels whose colour no H&E stain produces (blue-dominant, green-dominant
   or near-black ink), grown by a few pixels to take the stroke's halo;
3. morphology: closing with a disk, then pieces of tissue smaller than ``min_piece_um2`` removed (debris)
   and holes smaller than ``fill_holes_um2`` filled. Both are physical areas (square microns, from the
   slide's microns per pixel and the thumbnail's downsample), so the same tissue is kept whatever the
   slide's size and the thumbnail's. The default 500 um^2 (a 22 um square, a few cells) keeps every
   biopsy fragment (a needle-core fragment of 0.1 x 0.1 mm is 10,000 um^2) and drops only specks; a piece
   that small cannot hold a tile by itself anyway (a default tile, 224 px at 0.5 um/px, is 12,544 um^2 and
   needs ``min_tissue`` = half of it covered).

Tiles keep or drop on the mask's coverage (``min_tissue``) in :func:`pipeline.slides.reader.tile_grid`; then,
when read at full resolution, a tile that is mostly near-white or near-black pixels is rejected
(:func:`tile_is_background`) before it reaches the encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.files import atomic_path, write_text


@dataclass(frozen=True)
class TissueSettings:
    """How tissue is found. Stored in every features file (a change re-encodes the slide).

    Attributes:
        remove_pen: drop blue, green and black ink from the mask.
        min_piece_um2: connected pieces of tissue smaller than this area (square microns) are removed.
        fill_holes_um2: holes in the tissue smaller than this area (square microns) are filled.
        white_level: a pixel whose R, G and B are all at least this is background (glass).
        black_level: a pixel whose R, G and B are all at most this is background (ink, folds, scanner edge).
        max_background: a tile whose fraction of white or black pixels exceeds this is rejected at read time
            (1.0 turns the check off).
    """

    remove_pen: bool = True
    min_piece_um2: float = 500.0
    fill_holes_um2: float = 500.0
    white_level: int = 220
    black_level: int = 35
    max_background: float = 0.9


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pen ink on an RGB image: colours that haematoxylin and eosin do not produce.

    Args:
        rgb: ``[h, w, 3]`` uint8.

    Returns:
        ``[h, w]`` bool, True where ink is. Blue ink: blue exceeds red by 40 and green by 15 (H&E purple keeps
        red close to blue). Green ink: green exceeds both red and blue by 15. Black ink: every channel <= 60.
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    blue = (b - r > 40) & (b - g > 15)
    green = (g - r > 15) & (g - b > 15)
    black = (r <= 60) & (g <= 60) & (b <= 60)
    return blue | green | black


def tissue_mask(thumb: Image.Image, settings: TissueSettings | None = None, *, um_per_px: float) -> np.ndarray:
    """Tissue on an RGB thumbnail.

    Args:
        um_per_px: microns per thumbnail pixel (the slide's level-0 mpp x the thumbnail's downsample).

    Returns:
        ``[h, w]`` bool mask (True = tissue). All False when the slide is background only.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    s = settings or TissueSettings()
    rgb = np.asarray(thumb.convert("RGB"))
    sat = np.asarray(thumb.convert("RGB").convert("HSV"))[..., 1].astype(np.float32)
    ink = pen_mask(rgb) if s.remove_pen else np.zeros(sat.shape, bool)
    if ink.any():
        # strokes, not the odd dark nucleus: keep ink pieces of some size, then take the stroke's halo
        ink = _drop_small(ink, max(16, int(5e-4 * ink.size)))
        ink = ndimage.binary_dilation(ink, iterations=3) if ink.any() else ink
    valid = ~ink
    if not valid.any() or sat[valid].max() - sat[valid].min() < 8:  # flat image: no tissue contrast at all
        return np.zeros(sat.shape, dtype=bool)
    thr = max(float(threshold_otsu(sat[valid])), 20.0)  # never call faint background tissue
    mask = (sat > thr) & (rgb.mean(axis=-1) < 235) & valid
    disk = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2
    mask = ndimage.binary_closing(mask, structure=disk, border_value=0) & valid
    if not um_per_px > 0:
        raise ValueError(f"tissue_mask: um_per_px must be > 0, got {um_per_px}")
    px_um2 = um_per_px**2
    mask = _drop_small(mask, max(1, int(np.ceil(s.min_piece_um2 / px_um2))))  # specks of debris
    return ~_drop_small(~mask, max(1, int(np.ceil(s.fill_holes_um2 / px_um2)))) & valid  # small holes (never ink)


def _drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def background_fraction(tile: np.ndarray, settings: TissueSettings) -> float:
    """Fraction of a tile's pixels that are near white or near black.

    Args:
        tile: ``[H, W, 3|4]`` or ``[3, H, W]`` uint8 (RGB, or RGBA with alpha ignored).
    """
    if tile.shape[0] == 3 and tile.shape[-1] not in (3, 4):
        r, g, b = tile[0], tile[1], tile[2]
    else:
        r, g, b = tile[..., 0], tile[..., 1], tile[..., 2]
    # channel-wise min/max on 2-D views: ~20x faster than reducing over a 3-long strided axis
    lo, hi = np.minimum(np.minimum(r, g), b), np.maximum(np.maximum(r, g), b)
    return float(np.count_nonzero((lo >= settings.white_level) | (hi <= settings.black_level)) / lo.size)


def tile_is_background(tile: np.ndarray, settings: TissueSettings) -> bool:
    return settings.max_background < 1.0 and background_fraction(tile, settings) > settings.max_background


def save_mask_png(mask: np.ndarray, path: Path) -> None:
    """The mask as an 8-bit PNG (255 = tissue), the thumbnail's size."""
    with atomic_path(path) as tmp:
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")


def mask_to_geojson(mask: np.ndarray, level0_size: tuple[int, int], name: str = "Tissue") -> dict:
    """Tissue contours as a GeoJSON FeatureCollection in level-0 pixel coordinates, as QuPath imports it.

    One Polygon feature per connected piece of tissue: its outer ring, then one ring per hole. A mask pixel
    ``(row, col)`` covers level-0 ``[col * sx, (col + 1) * sx)`` with ``sx = width0 / mask_width``.

    Args:
        mask: ``[h, w]`` bool thumbnail mask.
        level0_size: ``(width0, height0)`` of the slide.
    """
    from scipy import ndimage
    from skimage.measure import find_contours

    h, w = mask.shape
    sx, sy = level0_size[0] / w, level0_size[1] / h

    def ring(region: np.ndarray, r0: int, c0: int) -> list[list[float]] | None:
        cs = find_contours(np.pad(region, 1).astype(np.uint8), 0.5)
        if not cs:
            return None
        c = simplify_polyline(max(cs, key=len), tolerance=0.5) - 1  # back from the padded frame
        if len(c) < 4:
            return None
        pts = [[round((c0 + col + 0.5) * sx, 1), round((r0 + row + 0.5) * sy, 1)] for row, col in c]
        if pts[0] != pts[-1]:
            pts.append(pts[0])
        return pts

    labels, _ = ndimage.label(mask)
    features = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):  # each piece on its bounding box only
        if box is None:
            continue
        r0, c0 = box[0].start, box[1].start
        piece = labels[box] == i
        filled = ndimage.binary_fill_holes(piece)
        outer = ring(filled, r0, c0)
        if outer is None:
            continue
        rings = [outer]
        holes, nh = ndimage.label(filled & ~piece)
        for j in range(1, nh + 1):
            r = ring(holes == j, r0, c0)
            if r is not None:
                rings.append(r)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {"objectType": "annotation", "classification": {"name": name}},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def simplify_polyline(coords: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a ``[n, 2]`` polyline: the points of ``skimage.measure.approximate_polygon``.

    The same rule, distances and first-maximum split as scikit-image's (so the same points are kept, which a test
    checks), but every segment of one depth is split at once with numpy: scikit-image's loop costs one Python
    step of a dozen numpy calls per kept vertex, ~0.5 s for the ~80 tissue pieces of a 1,024 px thumbnail
    (a quarter of a light encoder's per-slide time, measured), this a few milliseconds. Which segments are split
    does not depend on the order they are visited in, only on their ends, so the kept set is the same.
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if tolerance <= 0 or n < 3:
        return coords
    keep = np.zeros(n, dtype=bool)
    keep[[0, -1]] = True
    starts, ends = np.array([0]), np.array([n - 1])
    while len(starts):
        inner = ends - starts - 1
        starts, ends, inner = starts[inner > 0], ends[inner > 0], inner[inner > 0]
        if not len(starts):
            break
        seg = np.repeat(np.arange(len(starts)), inner)
        offsets = np.concatenate([[0], np.cumsum(inner)[:-1]])
        idx = np.arange(len(seg)) - offsets[seg] + starts[seg] + 1
        r0, c0 = coords[starts, 0], coords[starts, 1]
        r1, c1 = coords[ends, 0], coords[ends, 1]
        dr, dc = r1 - r0, c1 - c0
        angle = -np.arctan2(dr, dc)
        cos, sin = np.cos(angle), np.sin(angle)
        dist = c0 * sin + r0 * cos
        pr, pc = coords[idx, 0], coords[idx, 1]
        dr0, dc0 = pr - r0[seg], pc - c0[seg]
        dr1, dc1 = pr - r1[seg], pc - c1[seg]
        perp = (dr0 * dr[seg] + dc0 * dc[seg] > 0) & (-dr1 * dr[seg] - dc1 * dc[seg] > 0)
        d = np.where(
            perp,
            np.abs(pr * cos[seg] + pc * sin[seg] - dist[seg]),
            np.minimum(np.sqrt(dc0**2 + dr0**2), np.sqrt(dc1**2 + dr1**2)),
        )
        top = np.maximum.reduceat(d, offsets)
        first = np.minimum.reduceat(np.where(d == top[seg], idx, n), offsets)  # the first maximum, as argmax
        split = top > tolerance
        mid = first[split]
        keep[mid] = True
        starts, ends = np.concatenate([starts[split], mid]), np.concatenate([mid, ends[split]])
    return coords[keep]


def save_geojson(mask: np.ndarray, level0_size: tuple[int, int], path: Path) -> None:
    write_text(path, json.dumps(mask_to_geojson(mask, level0_size)))


def polygon_area(ring: list[list[float]]) -> float:
    """Area of a closed ring by the shoelace formula (level-0 px^2)."""
    a = np.asarray(ring, float)
    x, y = a[:, 0], a[:, 1]
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2)
