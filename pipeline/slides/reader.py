"""Slides: open any format, find tissue on a thumbnail, lay a tile grid at a target resolution, read tiles.

Readers:

- every format OpenSlide reads (SVS, NDPI, MRXS, SCN, VMS, BIF, DICOM, generic tiled/pyramidal TIFF, ...),
  through the ``openslide-bin`` library;
- plain images OpenSlide does not read (PNG, JPEG, BMP, a TIFF without tiles or pyramid) through
  :class:`openslide.ImageSlide`, which has the same interface (``dimensions``, ``level_count``,
  ``read_region``, ``properties``, ``get_thumbnail``). A plain image is decoded whole into memory when first
  read, so it suits crops and tissue-microarray cores; convert a large flat image to a pyramidal TIFF first.
  Plain images carry no microns per pixel: give it per slide (cohort ``slide_mpp`` column), for the cohort
  (``slide_mpp:``) or with ``--slide-mpp``.

Tiles are cut at ``target_mpp`` from the pyramid level closest to it without being coarser, and resized from
there; reading yields ``uint8`` tensors at the level's size, and the encoder resizes and normalises whole
batches (on the GPU when there is one).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.slides.tissue import TissueSettings, tile_is_background

log = logging.getLogger(__name__)


PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class SlideError(ValueError):
    """A slide cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class TileGrid:
    """Where to read tiles and how.

    Attributes:
        coords: ``[N, 2]`` int64 top-left (x, y) of each tile at level 0.
        level: pyramid level read from.
        read_px: side of the square read at ``level``.
        tile_px: side of the tile at ``target_mpp``; the encoder's batched ``preprocess`` resizes the
            ``read_px`` square straight to its own input size (equal to ``tile_px`` for the usual 224 px).
        mpp: slide's level-0 microns per pixel; ``target_mpp`` the tiles' resolution.
        size0: side of one tile in level-0 pixels.
        overlap_px: overlap of neighbouring tiles, in ``tile_px`` pixels.
    """

    coords: np.ndarray
    level: int
    read_px: int
    tile_px: int
    mpp: float
    target_mpp: float
    size0: int
    overlap_px: int = 0

    def subset(self, rows: np.ndarray | slice) -> TileGrid:
        """The same grid restricted to some tiles."""
        return TileGrid(
            self.coords[rows],
            self.level,
            self.read_px,
            self.tile_px,
            self.mpp,
            self.target_mpp,
            self.size0,
            self.overlap_px,
        )


def slide_mpp(slide: object, path: Path, override: float | None = None, fallback: float | None = None) -> float:
    """Microns per pixel at level 0.

    Policy: ``override`` (a value given for this very slide) wins over the slide's metadata, with a warning
    when they disagree by more than 10%; then the metadata (``openslide.mpp-x``, ``aperio.MPP``, TIFF
    resolution tags as OpenSlide reports them); then ``fallback`` (the cohort's or the command line's value
    for slides without metadata). Raises :class:`SlideError` when none gives a positive number.
    """
    meta = None
    props = slide.properties  # type: ignore[attr-defined]
    for key in ("openslide.mpp-x", "aperio.MPP"):
        if key in props:
            try:
                v = float(props[key])
            except ValueError:
                continue
            if v > 0:
                meta = v
                break
    for name, v in (("slide_mpp override", override), ("fallback slide_mpp", fallback)):
        if v is not None and not v > 0:
            raise SlideError(f"{path}: {name} must be a positive number of microns per pixel, got {v!r}")
    if override is not None:
        if meta is not None and abs(override - meta) > 0.1 * meta:
            log.warning("%s: slide_mpp %g given for this slide overrides %g from its metadata", path, override, meta)
        return float(override)
    if meta is not None:
        return meta
    if fallback is not None:
        return float(fallback)
    raise SlideError(
        f"{path}: no microns-per-pixel in the slide's metadata (openslide.mpp-x absent); "
        "give it with a `slide_mpp` column in the cohort manifest, `slide_mpp:` in the cohort spec, or --slide-mpp"
    )


def open_slide(path: str | Path):  # -> openslide.AbstractSlide
    """Open a slide with OpenSlide, or a plain image with the :class:`openslide.ImageSlide` fallback.

    Raises:
        SlideError: missing file, a format neither reads, or a corrupt file.
    """
    import openslide
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError as e:  # pragma: no cover - detect_format rarely raises
        raise SlideError(f"{path}: OpenSlide cannot read it ({e})") from e
    if fmt is not None:
        try:
            return openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{path}: OpenSlide cannot read it ({e}); the file may be truncated or corrupt") from e
    if path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
        raise SlideError(
            f"{path}: not a slide format OpenSlide reads, and not a plain image ({', '.join(PLAIN_IMAGE_SUFFIXES)})"
        )
    try:
        with Image.open(path) as im:
            im.verify()  # header and structure; decoding happens on first read
        return openslide.ImageSlide(str(path))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise SlideError(f"{path}: cannot read it as a plain image ({type(e).__name__}: {e})") from e


def thumbnail(slide: object, max_px: int) -> Image.Image:
    return slide.get_thumbnail((max_px, max_px)).convert("RGB")  # type: ignore[attr-defined]


def tile_grid(
    slide: object,
    mask: np.ndarray,
    mpp: float,
    target_mpp: float,
    tile_px: int,
    min_tissue: float,
    overlap_px: int = 0,
) -> TileGrid:
    """Grid from the level-0 origin at ``target_mpp``, kept where tissue covers ``min_tissue`` of a tile.

    Neighbouring tiles overlap by ``overlap_px`` output pixels (stride ``tile_px - overlap_px``). The level
    read from is the deepest one whose downsample does not exceed the wanted one, so tiles are only ever
    shrunk, never enlarged, to ``tile_px``.
    """
    if not 0 <= overlap_px < tile_px:
        raise SlideError(f"overlap_px must be in [0, tile_px={tile_px}), got {overlap_px}")
    w0, h0 = slide.dimensions  # type: ignore[attr-defined]
    ds = target_mpp / mpp  # level-0 pixels per output pixel
    size0 = int(round(tile_px * ds))
    if size0 < 1:
        raise SlideError(f"target_mpp {target_mpp} is finer than the slide's {mpp} um/px by too much")
    stride0 = max(1, int(round((tile_px - overlap_px) * ds)))
    level = int(slide.get_best_level_for_downsample(ds + 1e-6))  # type: ignore[attr-defined]
    level_ds = float(slide.level_downsamples[level])  # type: ignore[attr-defined]
    read_px = int(round(size0 / level_ds))
    xs = np.arange(0, w0 - size0 + 1, stride0)
    ys = np.arange(0, h0 - size0 + 1, stride0)
    if len(xs) == 0 or len(ys) == 0:
        return TileGrid(np.zeros((0, 2), np.int64), level, read_px, tile_px, mpp, target_mpp, size0, overlap_px)
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
    return TileGrid(coords[keep], level, read_px, tile_px, mpp, target_mpp, size0, overlap_px)


class TileDataset(torch.utils.data.Dataset):
    """Reads tiles of one slide as uint8 RGB; each DataLoader worker opens its own slide handle, lazily.

    Items are ``(tile [read_px, read_px, 3] uint8 RGB numpy, index, keep)``, as read from the grid's level: no
    transpose and no copy beyond the read. :func:`collate_tiles` stacks a batch's kept tiles into
    ``[K, H, W, 3]``, which becomes the ``[K, 3, H, W]`` channels-last view the encoder wants on the device
    (:meth:`pipeline.slides.encode.EncoderRunner.submit`). ``keep`` is False for a tile that turned out to be mostly
    near-white/near-black pixels (:func:`pipeline.slides.tissue.tile_is_background`). Resizing to ``tile_px`` and
    normalising happen batched, in the encoder's ``preprocess``.

    With ``tile_reader="auto"`` the level's JPEG tiles of an Aperio or generic tiled TIFF are decoded directly
    (:mod:`pipeline.slides.tiff_tiles`: OpenSlide's exact pixels, checked on three of the grid's tiles when the
    handle opens, ~4x less CPU per tile); every other slide, and a grid whose tiles do not sit on whole pixels
    of its level, is read through OpenSlide's ``read_region``. ``tile_reader="openslide"`` always uses OpenSlide.
    """

    def __init__(self, path: Path, grid: TileGrid, tissue: TissueSettings | None = None, tile_reader: str = "auto"):
        if tile_reader not in ("auto", "openslide"):
            raise ValueError(f"tile_reader must be 'auto' or 'openslide', got {tile_reader!r}")
        self.path = Path(path)
        self.grid = grid
        self.tissue = tissue or TissueSettings(max_background=1.0)
        self.tile_reader = tile_reader
        self._slide = None
        self._fast = None  # TiffLevel when the level is decoded directly
        self._pid = -1

    def __len__(self) -> int:
        return len(self.grid.coords)

    def _handle(self):
        if self._slide is None or self._pid != os.getpid():  # a forked worker never shares its parent's handle
            if self._fast is not None:
                self._fast.close()  # this process's copy of the parent's file descriptor
            self._slide = open_slide(self.path)
            self._pid = os.getpid()
            self._fast = self._direct_level(self._slide)
        return self._slide

    def _direct_level(self, slide: object):  # -> TiffLevel | None
        """The direct TIFF decoder for the grid's level, when allowed, possible and equal to OpenSlide."""
        from pipeline.slides.tiff_tiles import tiff_level

        g = self.grid
        if self.tile_reader != "auto" or not len(g.coords):
            return None
        ds = float(slide.level_downsamples[g.level])  # type: ignore[attr-defined]
        lv = g.coords / ds
        if not np.array_equal(lv, np.round(lv)):  # OpenSlide would shift these tiles by a fraction of a pixel
            return None
        picks = sorted({0, len(g.coords) // 2, len(g.coords) - 1})
        checks = [(int(g.coords[i, 0]), int(g.coords[i, 1]), g.read_px, g.read_px) for i in picks]
        return tiff_level(self.path, slide, g.level, checks)

    @property
    def reader_kind(self) -> str:
        """How tiles are read: ``tiff`` (decoded directly) or ``openslide`` (opens the slide to decide)."""
        self._handle()
        return "tiff" if self._fast is not None else "openslide"

    def read_rgba(self, i: int) -> np.ndarray:
        """Tile ``i`` through OpenSlide: ``[read_px, read_px, 4]`` uint8 RGBA (read-only, no copy made)."""
        x, y = (int(v) for v in self.grid.coords[i])
        g = self.grid
        return np.asarray(self._handle().read_region((x, y), g.level, (g.read_px, g.read_px)))

    def read_rgb(self, i: int) -> np.ndarray:
        """Tile ``i`` as read from its level: ``[read_px, read_px, 3]`` uint8 (possibly a view of an RGBA read)."""
        self._handle()
        if self._fast is None:
            return self.read_rgba(i)[..., :3]
        g = self.grid
        ds = float(self._slide.level_downsamples[g.level])  # type: ignore[union-attr]
        x, y = (int(round(float(v) / ds)) for v in g.coords[i])
        return self._fast.region(x, y, g.read_px, g.read_px)

    def read(self, i: int) -> Image.Image:
        """Tile ``i`` at ``tile_px`` as a PIL image (for inspection; extraction resizes batched)."""
        img = Image.fromarray(np.ascontiguousarray(self.read_rgb(i)))
        if self.grid.read_px != self.grid.tile_px:
            img = img.resize((self.grid.tile_px, self.grid.tile_px), Image.Resampling.BILINEAR)
        return img

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, bool]:
        rgb = self.read_rgb(i)  # [H, W, 3]
        return rgb, i, not tile_is_background(rgb[::4, ::4], self.tissue)

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def tile_batches(
    ds: TileDataset, batch_size: int, workers: int, read_threads: int, pin: bool, prefetch_factor: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor, int]]:
    """The grid's tiles in batches (:func:`collate_tiles`): a DataLoader with ``workers`` processes (each its own
    handle) or, without workers and with ``read_threads`` > 1, :func:`threaded_batches`."""
    if workers or read_threads == 1:
        return torch.utils.data.DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate_tiles,
            pin_memory=pin,
            prefetch_factor=prefetch_factor if workers else None,
            persistent_workers=False,
        )
    return threaded_batches(ds, batch_size, read_threads)


def threaded_batches(
    ds: TileDataset, batch_size: int, threads: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The grid's tiles in batches of ``batch_size`` (as a DataLoader with :func:`collate_tiles` yields them), each
    batch read by ``threads`` threads at once: the batch is cut into ``threads`` contiguous runs (neighbouring tiles
    share JPEG tiles in a reader's cache), each run read through its own :class:`TileDataset` copy (own slide
    handle and cache; ``ds`` is the first and is closed by its owner). A read error is raised here, in order."""
    from concurrent.futures import ThreadPoolExecutor

    copies = [ds] + [TileDataset(ds.path, ds.grid, ds.tissue, ds.tile_reader) for _ in range(threads - 1)]

    def read(job: tuple[TileDataset, np.ndarray]) -> list[tuple[np.ndarray, int, bool]]:
        src, part = job
        return [src[int(i)] for i in part]

    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="tile-reader") as pool:
            for start in range(0, len(ds), batch_size):
                parts = np.array_split(np.arange(start, min(len(ds), start + batch_size)), threads)
                runs = pool.map(read, [(c, p) for c, p in zip(copies, parts, strict=True) if len(p)])
                yield collate_tiles([item for run in runs for item in run])
    finally:
        for c in copies[1:]:
            c.close()


def slide_fingerprint(path: Path) -> str:
    """Cheap identity of a slide file (size + hash of its first and last MiB): a replaced slide is re-encoded."""
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def collate_tiles(batch: list[tuple[np.ndarray, int, bool]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the batch's kept tiles into ``([K, H, W, C] uint8, index [K], rejected)`` with one single-threaded copy.

    Only tiles whose ``keep`` is True are stacked (``rejected``: how many were not), so a background tile
    costs its read and never a copy: masking the stacked batch afterwards copied every kept tile a second
    time, ~30 ms of the encoder's thread per batch of 64 (measured). In a DataLoader worker the batch is built
    straight in shared memory, so handing it to the main process copies nothing. (torch's default collate
    stacks with intra-op threads, which stalls badly when the encoder already keeps every core busy.)
    """
    kept = [(a, i) for a, i, k in batch if k]
    shape = batch[0][0].shape
    out = torch.empty((len(kept), *shape), dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        out = out.share_memory_()
    if kept:
        np.stack([a for a, _ in kept], out=out.numpy())
    return out, torch.tensor([i for _, i in kept], dtype=torch.int64), len(batch) - len(kept)
