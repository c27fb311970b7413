"""Slide -> feature throughput on this machine. Prints numbers; compare ratios within one run.

    python scripts/bench_features.py [--side 4480] [--encoder efficientnet_lite0_imagenet] [--tiles 600]

Measures, on one pyramidal JPEG TIFF built from the demo's real H&E image:
  1. raw OpenSlide ``read_region`` of 224 px tiles in a loop, grid order (the baseline);
  2. histofuse's tile reader (``TileDataset`` through a DataLoader) at 0, 1 and 2 workers;
  3. reader + encoder (the full extraction of one slide), tiles/s.
Peak RSS of the process is printed at the end. The allocator setting in effect is printed too
(``make bench`` sets MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _slide(path: Path, side: int) -> None:
    from importlib import resources

    from pipeline.demo import write_pyramid_tiff

    he = np.asarray(Image.open(str(resources.files("pipeline.demo_assets") / "tumor_target_he.png")).convert("RGB"))
    reps = -(-side // he.shape[0])
    big = np.tile(he, (reps, reps, 1))[:side, :side]
    write_pyramid_tiff(path, np.ascontiguousarray(big), mpp=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=4480, help="slide side in px at level 0 (0.5 um/px)")
    ap.add_argument("--encoder", default="efficientnet_lite0_imagenet")
    ap.add_argument("--tiles", type=int, default=600, help="tiles to encode in the end-to-end measurement")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from models import build_encoder
    from pipeline.slides import TileDataset, open_slide, slide_mpp, thumbnail, tile_grid, tissue_mask

    alloc = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    print(
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"cuda={'yes' if torch.cuda.is_available() else 'no'}; allocator {alloc}"
    )
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "bench.tif"
        _slide(path, args.side)
        s = open_slide(path)
        grid = tile_grid(s, tissue_mask(thumbnail(s, 1024)), slide_mpp(s, path), 0.5, 224, 0.5)
        coords = grid.coords
        print(f"slide {args.side}x{args.side} px, {len(coords)} tissue tiles of 224 px at 0.5 um/px")

        t0 = time.perf_counter()
        for x, y in coords:
            s.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB")
        raw = len(coords) / (time.perf_counter() - t0)
        print(f"raw read_region loop            : {raw:8.1f} tiles/s  (1.00x)")

        enc = build_encoder(args.encoder)
        for workers in (0, 1, 2):
            ds = TileDataset(path, grid, enc.transform)
            dl = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers)
            t0 = time.perf_counter()
            n = sum(len(b[1]) for b in dl)
            rate = n / (time.perf_counter() - t0)
            print(f"reader + transform, {workers} workers   : {rate:8.1f} tiles/s  ({rate / raw:.2f}x raw)")

        sub = grid.__class__(
            coords[: args.tiles], grid.level, grid.read_px, grid.tile_px, grid.mpp, grid.target_mpp, grid.size0
        )
        for workers in (0, 1):
            dl = torch.utils.data.DataLoader(TileDataset(path, sub, enc.transform), batch_size=64, num_workers=workers)
            t0 = time.perf_counter()
            with torch.inference_mode():
                n = sum(enc.model(x).shape[0] for x, _ in dl)
            rate = n / (time.perf_counter() - t0)
            print(f"reader + {args.encoder}, {workers} workers: {rate:8.1f} tiles/s")
        dl = torch.utils.data.DataLoader(TileDataset(path, sub, enc.transform), batch_size=64)
        batches = [x for x, _ in dl]
        t0 = time.perf_counter()
        with torch.inference_mode():
            n = sum(enc.model(x).shape[0] for x in batches)
        print(f"encoder alone on decoded tiles   : {n / (time.perf_counter() - t0):8.1f} tiles/s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
