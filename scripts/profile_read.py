"""Where reading time goes, per tile: each step of the extraction's read path timed on its own, on one thread.

    python scripts/profile_read.py [SLIDE] [--side 24576] [--tiles 0] [--repeats 3]

Without ``SLIDE`` it writes the bench's islands slide (``scripts/bench_extract.py``: 0.25 um/px, tiles of
224 px at 0.5 um/px read as 448 px from level 0 and resized) into a temporary folder. Every figure is CPU
milliseconds per kept tile (``time.process_time``, torch and OpenSlide on one thread), the median of
``--repeats`` passes over the same tiles after a warm-up pass:

- ``read_region``: OpenSlide's decode plus openslide-python's ARGB -> RGBA conversion into a PIL image, one
  call per tile, in grid order (how tiles were read before the direct TIFF reader);
- ``read_region, row runs``: one ``read_region`` per run of horizontally adjacent tiles (a strip), cut into tiles;
- ``read_region, cached``: the same 448 px region again and again (its JPEG tiles in OpenSlide's cache): what
  OpenSlide's painting costs without any decoding;
- ``direct TIFF``: :class:`pipeline.slides.tiff_tiles.TiffLevel` regions (tifffile + imagecodecs decoding, a
  bounded cache of decoded tiles, numpy cuts), RGB;
- ``asarray``: the PIL image to a numpy array (a copy);
- ``background``: :func:`pipeline.slides.tissue.tile_is_background` on the strided view;
- ``collate``: the batch stack of RGB tiles (:func:`pipeline.slides.reader.collate_tiles`, batches of 64);
- ``drop alpha``: RGBA -> 3-channel channels-last copy (the encoder's first step when tiles came as RGBA);
- ``resize``: 448 -> 224 px, uint8, bicubic antialiased (the encoder's ``preprocess``);
- ``normalise``: to float, minus mean, over std;
- ``TileDataset``: the extraction's reader per tile as it runs now (direct TIFF where it applies, background
  check), and with ``tile_reader="openslide"``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def _grid(path: Path, cfg):
    from pipeline.slides.features import tissue_settings
    from pipeline.slides.reader import open_slide, slide_mpp, thumbnail, tile_grid
    from pipeline.slides.tissue import tissue_mask

    s = open_slide(path)
    mpp, thumb = slide_mpp(s, path), thumbnail(s, cfg.thumbnail_px)
    mask = tissue_mask(thumb, tissue_settings(cfg), um_per_px=mpp * s.dimensions[0] / thumb.size[0])
    grid = tile_grid(s, mask, mpp, cfg.target_mpp, cfg.tile_px, cfg.min_tissue, cfg.overlap_px)
    s.close()
    return grid


def _cpu_ms(fn: Callable[[], int], repeats: int) -> float:
    """Median CPU ms per item of ``fn()`` (which returns its item count) over ``repeats`` after a warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        n = fn()
        out.append((time.process_time() - t0) * 1e3 / max(n, 1))
    return statistics.median(out)


def profile(path: Path, n_tiles: int, repeats: int) -> dict[str, float]:
    """CPU ms per tile of each step (see the module docstring)."""
    from data_specs.config import ExtractConfig
    from models import build_encoder
    from pipeline.slides.features import tissue_settings
    from pipeline.slides.reader import TileDataset, collate_tiles, open_slide
    from pipeline.slides.tiff_tiles import tiff_level
    from pipeline.slides.tissue import tile_is_background

    cfg = ExtractConfig(target_mpp=0.5, tile_px=224)
    enc = build_encoder(cfg.encoder)
    grid = _grid(path, cfg)
    if n_tiles:
        grid = grid.subset(slice(0, n_tiles))
    tissue = tissue_settings(cfg)
    slide = open_slide(path)
    g = grid
    r = g.read_px
    print(f"{len(g.coords)} tiles, level {g.level}, read {r} px -> {g.tile_px} px", flush=True)

    def per_tile_pil() -> list:
        return [slide.read_region((int(x), int(y)), g.level, (r, r)) for x, y in g.coords]

    def row_runs() -> int:
        c, n, start = g.coords, 0, 0
        for i in range(1, len(c) + 1):
            if i == len(c) or c[i, 1] != c[i - 1, 1] or c[i, 0] - c[i - 1, 0] != g.size0:
                strip = np.asarray(
                    slide.read_region((int(c[start, 0]), int(c[start, 1])), g.level, ((i - start) * r, r))
                )
                n += len([strip[:, k * r : (k + 1) * r, :3] for k in range(i - start)])
                start = i
        return n

    def cached() -> int:
        x, y = (int(v) for v in g.coords[len(g.coords) // 2])
        for _ in range(64):
            slide.read_region((x, y), g.level, (r, r))
        return 64

    direct_ds = float(slide.level_downsamples[g.level])

    def direct() -> int:
        lv = tiff_level(path, slide, g.level, [])
        if lv is None:
            return 0
        n = len([lv.region(int(x / direct_ds), int(y / direct_ds), r, r) for x, y in g.coords])
        lv.close()
        return n

    n = len(g.coords)
    pil = per_tile_pil()
    rgba = [np.asarray(p) for p in pil]
    rgb = [a[..., :3] for a in rgba]
    batches = [
        collate_tiles([(a, i, True) for i, a in enumerate(rgba[j : j + 64])])[0] for j in range(0, len(rgba), 64)
    ]
    chw = [b.permute(0, 3, 1, 2)[:, :3] for b in batches]
    cl = [c.contiguous(memory_format=torch.channels_last) for c in chw]
    size = tuple(enc.input_size[1:])
    mode = enc.interpolation if enc.interpolation in ("bilinear", "bicubic") else "bicubic"
    small = [torch.nn.functional.interpolate(c, size=size, mode=mode, antialias=True) for c in cl]
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(enc.std).view(1, 3, 1, 1) * 255.0

    def dataset(kind: str) -> Callable[[], int]:
        def go() -> int:
            ds = TileDataset(path, g, tissue, kind)
            k = len([ds[i] for i in range(len(ds))])
            print(f"    ({kind}: {ds.reader_kind})", flush=True)
            ds.close()
            return k

        return go

    steps: dict[str, Callable[[], int]] = {
        "read_region (PIL RGBA)": lambda: len(per_tile_pil()),
        "read_region, row runs": row_runs,
        "read_region, cached (painting only)": cached,
        "direct TIFF (TiffLevel.region)": direct,
        "asarray (copy)": lambda: len([np.asarray(p) for p in pil]),
        "background check": lambda: len([tile_is_background(a[::4, ::4], tissue) for a in rgba]),
        "collate RGB (stack)": lambda: sum(
            len(collate_tiles([(a, i, True) for i, a in enumerate(rgb[j : j + 64])])[0]) for j in range(0, n, 64)
        ),
        "drop alpha (channels-last copy)": lambda: sum(
            len(c.contiguous(memory_format=torch.channels_last)) for c in chw
        ),
        "resize 448 -> 224 (uint8)": lambda: sum(
            len(torch.nn.functional.interpolate(c, size=size, mode=mode, antialias=True)) for c in cl
        ),
        "normalise (float, in place)": lambda: sum(len(s.float().sub_(mean).div_(std)) for s in small),
        "TileDataset, tile_reader=auto": dataset("auto"),
        "TileDataset, tile_reader=openslide": dataset("openslide"),
    }
    torch.set_num_threads(1)
    out = {}
    for name, fn in steps.items():
        with torch.inference_mode():
            out[name] = _cpu_ms(fn, repeats)
        print(f"  {name:36s} {out[name]:7.3f} ms/tile", flush=True)
    slide.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", nargs="?", type=Path, default=None)
    ap.add_argument("--side", type=int, default=24576, help="side of the written slide when none is given")
    ap.add_argument("--tiles", type=int, default=0, help="profile only the first N kept tiles (0: all)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.slide is not None:
        profile(args.slide, args.tiles, args.repeats)
        return
    from bench_extract import write_slide

    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "islands.svs"
        write_slide(p, args.side)
        profile(p, args.tiles, args.repeats)


if __name__ == "__main__":
    main()
