"""A tiled TIFF level's tiles decoded straight from the file: OpenSlide's pixels at a quarter of the CPU.

OpenSlide paints every region through cairo, which on this machine costs ~15 ns per output pixel: 3 ms for a
448 px region even when its JPEG tiles are in OpenSlide's cache, against ~0.2 ms to decode one 256 px JPEG
tile with libjpeg-turbo (``scripts/profile_read.py``). For the formats whose pyramid levels are plain TIFF
pages (OpenSlide vendors ``aperio`` and ``generic-tiff``), :class:`TiffLevel` reads a level's compressed tiles
with ``os.pread``, decodes them with tifffile (JPEG through imagecodecs' libjpeg-turbo, the decoder and
settings OpenSlide uses), keeps the last decoded tiles in a bounded cache (regions in grid order share the
JPEG tiles on their borders) and cuts regions out with numpy.

:func:`tiff_level` returns one only when every condition holds (tifffile and imagecodecs installed, the
vendor, a tiled 8-bit RGB page of the level's size) and its pixels equal OpenSlide's exactly on check regions
of the slide; otherwise None, and the caller reads through OpenSlide. Regions are given in the level's own
pixel coordinates; the caller uses this only where level-0 positions map to whole level pixels (OpenSlide
would otherwise interpolate a sub-pixel shift).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# OpenSlide vendors whose levels are TIFF pages read as they are (no overlaps, offsets or stitching).
TIFF_VENDORS = ("aperio", "generic-tiff")
# Decoded tiles kept per level (bytes): ~340 tiles of 256 px RGB, a row band of a 60k px slide; fixed, whatever
# the slide's size.
CACHE_BYTES = 64 << 20


class TileDecodeError(OSError):
    """A tile of the file cannot be decoded (truncated or corrupt data); the message names the file and tile."""


class TiffLevel:
    """One tiled TIFF page: regions ``[h, w, 3]`` uint8 RGB, zero (OpenSlide's transparent black) outside the image.

    Not thread-safe (the tile cache): one per reading thread or process.
    """

    def __init__(self, path: Path, page: object, cache_bytes: int = CACHE_BYTES):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)  # type: ignore[attr-defined]
        self.tw, self.th = int(page.tilewidth), int(page.tilelength)  # type: ignore[attr-defined]
        self._nx = -(-self.width // self.tw)
        self._offsets = np.asarray(page.dataoffsets, np.int64)  # type: ignore[attr-defined]
        self._counts = np.asarray(page.databytecounts, np.int64)  # type: ignore[attr-defined]
        self._tables = getattr(page, "jpegtables", None)
        self._decode = page.decode  # type: ignore[attr-defined]  # (data, index, jpegtables=) -> (segment, ...)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cap = max(1, cache_bytes // (self.tw * self.th * 3))

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        """Decoded tile ``[th, tw, 3]`` (padded edge tiles as stored); zeros for a tile the file does not hold."""
        k = ty * self._nx + tx
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        n = int(self._counts[k])
        if n == 0:
            tile = np.zeros((self.th, self.tw, 3), np.uint8)
        else:
            data = os.pread(self._fd, n, int(self._offsets[k]))
            try:
                seg = self._decode(data, k, jpegtables=self._tables)[0]
                tile = np.asarray(seg).reshape(self.th, self.tw, 3)
            except Exception as e:  # imagecodecs' and tifffile's errors have no common base class
                raise TileDecodeError(f"{self.path}: TIFF tile {k} cannot be decoded ({type(e).__name__}: {e})") from e
        self._cache[k] = tile
        if len(self._cache) > self._cap:
            self._cache.popitem(last=False)
        return tile

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels ``[y, y + h) x [x, x + w)`` of the level as ``[h, w, 3]`` uint8 (a new array)."""
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        inside = (x0, y0, x1, y1) == (x, y, x + w, y + h)
        out = np.empty((h, w, 3), np.uint8) if inside else np.zeros((h, w, 3), np.uint8)
        for ty in range(y0 // self.th, (y1 - 1) // self.th + 1) if y1 > y0 else ():
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1) if x1 > x0 else ():
                a = self._tile(ty, tx)
                ty0, tx0 = ty * self.th, tx * self.tw
                r0, r1 = max(y0, ty0), min(y1, ty0 + self.th)
                c0, c1 = max(x0, tx0), min(x1, tx0 + self.tw)
                out[r0 - y : r1 - y, c0 - x : c1 - x] = a[r0 - ty0 : r1 - ty0, c0 - tx0 : c1 - tx0]
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cache.clear()


def _level_page(path: Path, slide: object, level: int) -> tuple[object, object] | str:
    """``(TiffFile, page)`` of ``level``, or why there is none."""
    import openslide

    vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR)  # type: ignore[attr-defined]
    if vendor not in TIFF_VENDORS:
        return f"vendor {vendor!r} is not one of {TIFF_VENDORS}"
    try:
        import imagecodecs  # noqa: F401  (tifffile's JPEG decoder)
        import tifffile
    except ImportError as e:
        return f"{e.name} is not installed"
    w, h = slide.level_dimensions[level]  # type: ignore[attr-defined]
    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:  # a TIFF variant tifffile does not parse
        return f"tifffile cannot parse it ({type(e).__name__}: {e})"
    pages = [p for p in tf.pages if (int(p.imagewidth), int(p.imagelength)) == (w, h) and p.is_tiled]
    if len(pages) != 1:
        tf.close()
        return f"{len(pages)} tiled TIFF pages of the level's size {w} x {h}"
    p = pages[0]
    if p.samplesperpixel != 3 or p.bitspersample != 8 or p.planarconfig != 1 or getattr(p, "tiledepth", 1) != 1:
        tf.close()
        return f"the page is not 8-bit chunky RGB (samples {p.samplesperpixel}, bits {p.bitspersample})"
    return tf, p


def tiff_level(path: Path, slide: object, level: int, checks: Sequence[tuple[int, int, int, int]]) -> TiffLevel | None:
    """A :class:`TiffLevel` for ``level`` of the OpenSlide ``slide`` when it reproduces OpenSlide's pixels, else None.

    Args:
        checks: level-0 ``(x, y)`` and level ``(w, h)`` regions compared with ``slide.read_region`` (RGB of an
            opaque region; transparent pixels as black), exactly.
    """
    path = Path(path)
    found = _level_page(path, slide, level)
    if isinstance(found, str):
        log.debug("%s: tiles read through OpenSlide (%s)", path, found)
        return None
    tf, page = found
    ds = float(slide.level_downsamples[level])  # type: ignore[attr-defined]
    lv = None
    try:
        lv = TiffLevel(path, page)
        for x, y, w, h in checks:
            ref = np.asarray(slide.read_region((x, y), level, (w, h)))  # type: ignore[attr-defined]
            got = lv.region(int(round(x / ds)), int(round(y / ds)), w, h)
            if not np.array_equal(got, ref[..., :3]):
                diff = int(np.abs(got.astype(np.int16) - ref[..., :3]).max())
                log.info("%s: tiles read through OpenSlide (direct TIFF decoding differs by up to %d)", path, diff)
                lv.close()
                return None
    except Exception as e:  # tifffile cannot decode this page's compression, a truncated tile, ...
        log.info("%s: tiles read through OpenSlide (direct TIFF decoding failed: %s: %s)", path, type(e).__name__, e)
        if lv is not None:
            lv.close()
        return None
    finally:
        tf.close()  # the page's offsets, counts and tables are already read; tiles are read with os.pread
    return lv
