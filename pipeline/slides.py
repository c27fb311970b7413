"""Slides: open with OpenSlide, find tissue on a thumbnail, lay a tile grid at a target resolution."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class SlideError(ValueError):
    """A slide cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class TileGrid:
    """Where to read tiles and how.

    Attributes:
        coords: ``[N, 2]`` int64 top-left (x, y) of each tile at level 0.
        level: pyramid level read from.
        read_px: side of the square read at ``level`` (then resized to ``tile_px``).
        tile_px: side of the tile given to the encoder.
        mpp: slide's level-0 microns per pixel; ``target_mpp`` the tiles' resolution.
        size0: side of one tile in level-0 pixels.
    """

    coords: np.ndarray
    level: int
    read_px: int
    tile_px: int
    mpp: float
    target_mpp: float
    size0: int


def slide_mpp(slide: object, path: Path, override: float | None = None) -> float:
    """Microns per pixel at level 0 from the slide's metadata, or the override. Raises SlideError."""
    if override is not None:
        return float(override)
    props = slide.properties  # type: ignore[attr-defined]
    for key in ("openslide.mpp-x", "aperio.MPP"):
        if key in props:
            try:
                v = float(props[key])
            except ValueError:
                continue
            if v > 0:
                return v
    raise SlideError(
        f"{path}: no microns-per-pixel in the slide's metadata (openslide.mpp-x absent); "
        "give it with `slide_mpp:` in the cohort spec or --slide-mpp"
    )


def open_slide(path: str | Path):  # -> openslide.OpenSlide
    import openslide

    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as e:
        raise SlideError(f"{path}: OpenSlide cannot read it ({e})") from e
    except openslide.OpenSlideUnsupportedFormatError as e:
        raise SlideError(f"{path}: not a slide format OpenSlide reads ({e})") from e


def tissue_mask(thumb: Image.Image, min_object_frac: float = 1e-3) -> np.ndarray:
    """Tissue on an RGB thumbnail: Otsu on HSV saturation, closed and cleaned of specks.

    Returns:
        ``[h, w]`` bool mask (True = tissue). All False when the slide is background only.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    rgb = np.asarray(thumb.convert("RGB"))
    sat = np.asarray(thumb.convert("RGB").convert("HSV"))[..., 1].astype(np.float32)
    if sat.max() - sat.min() < 8:  # flat image: no tissue contrast at all
        return np.zeros(sat.shape, dtype=bool)
    thr = max(float(threshold_otsu(sat)), 20.0)  # never call faint background tissue
    mask = (sat > thr) & (rgb.mean(axis=-1) < 235)
    disk = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2
    mask = ndimage.binary_closing(mask, structure=disk, border_value=0)
    min_size = max(16, int(min_object_frac * mask.size))
    mask = _drop_small(mask, min_size)  # specks of debris
    return ~_drop_small(~mask, min_size)  # fill small holes


def _drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def thumbnail(slide: object, max_px: int) -> Image.Image:
    return slide.get_thumbnail((max_px, max_px)).convert("RGB")  # type: ignore[attr-defined]


def tile_grid(
    slide: object,
    mask: np.ndarray,
    mpp: float,
    target_mpp: float,
    tile_px: int,
    min_tissue: float,
) -> TileGrid:
    """Non-overlapping grid from the level-0 origin at ``target_mpp``, kept where tissue covers ``min_tissue``.

    The level read from is the deepest one whose downsample does not exceed the wanted one, so tiles are
    only ever shrunk, never enlarged, to ``tile_px``.
    """
    w0, h0 = slide.dimensions  # type: ignore[attr-defined]
    ds = target_mpp / mpp  # level-0 pixels per output pixel
    size0 = int(round(tile_px * ds))
    if size0 < 1:
        raise SlideError(f"target_mpp {target_mpp} is finer than the slide's {mpp} um/px by too much")
    level = int(slide.get_best_level_for_downsample(ds + 1e-6))  # type: ignore[attr-defined]
    level_ds = float(slide.level_downsamples[level])  # type: ignore[attr-defined]
    read_px = int(round(size0 / level_ds))
    xs = np.arange(0, w0 - size0 + 1, size0)
    ys = np.arange(0, h0 - size0 + 1, size0)
    if len(xs) == 0 or len(ys) == 0:
        return TileGrid(np.zeros((0, 2), np.int64), level, read_px, tile_px, mpp, target_mpp, size0)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y then x
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    # Tissue fraction of each tile from the mask (mask pixels map to level-0 by the thumbnail scale).
    mh, mw = mask.shape
    sx, sy = mw / w0, mh / h0
    integral = np.pad(mask.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(int), 0, mw)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(int), 0, mh)
    x1 = np.clip(np.ceil((coords[:, 0] + size0) * sx).astype(int), 0, mw)
    y1 = np.clip(np.ceil((coords[:, 1] + size0) * sy).astype(int), 0, mh)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    keep = tissue / area >= max(min_tissue, 1e-9)
    return TileGrid(coords[keep], level, read_px, tile_px, mpp, target_mpp, size0)


class TileDataset:
    """Reads tiles of one slide; each DataLoader worker opens its own slide handle.

    Items are ``(image [3, H, W] float, index)``.
    """

    def __init__(self, path: Path, grid: TileGrid, transform):
        self.path = Path(path)
        self.grid = grid
        self.transform = transform
        self._slide = None

    def __len__(self) -> int:
        return len(self.grid.coords)

    def read(self, i: int) -> Image.Image:
        if self._slide is None:
            self._slide = open_slide(self.path)
        x, y = (int(v) for v in self.grid.coords[i])
        g = self.grid
        img = self._slide.read_region((x, y), g.level, (g.read_px, g.read_px)).convert("RGB")
        if g.read_px != g.tile_px:
            img = img.resize((g.tile_px, g.tile_px), Image.Resampling.BILINEAR)
        return img

    def __getitem__(self, i: int):
        return self.transform(self.read(i)), i
