"""Slide -> feature components, one by one (reader, workers, encoder). Prints numbers; compare ratios within one run.

``make bench`` runs ``scripts/bench_extract.py`` (the CLI end to end on a realistic slide beside its limits);
this script breaks the reader and encoder down further. Every figure is the median of 3 runs after a warm-up.

    python scripts/bench_features.py [--side 8960] [--encoder efficientnet_lite0_imagenet] [--tiles 384]
                                     [--rss-sides 20480 40960] [--skip-rss]

Measures, on a pyramidal JPEG TIFF built from the demo's real H&E image:

1. raw OpenSlide ``read_region`` of 224 px tiles in a loop, grid order, one process (the baseline), and the
   same loop split over two processes (what two workers could reach on this machine);
2. histofuse's reader alone (``TileDataset`` -> DataLoader, uint8 tiles, background check) at 0, 1 and 2
   workers, as a ratio to the baseline;
3. reader + encoder through the extraction code path (``encode_tiles`` into a ``features_writer``: batched
   preprocessing, encoder, chunked h5 writes) at 0, 1 and 2 workers, and the encoder alone on pre-decoded
   tiles (the ceiling),
   with channels-last on and off;
4. peak RSS of a full ``extract_slides`` run in a fresh process, for slides of ``--rss-sides`` px
   (tissue islands of the real image over a third of the area, written tile by tile: the slide is never
   in memory), to show that memory does not grow with slide size beyond the features themselves.

On a GPU the same script measures the GPU path (autocast, pinned memory, on-device preprocessing), e.g.
``--encoder vit_base_patch16_224 --random-weights --batch-size 512 --skip-rss``.
The allocator setting in effect is printed (``make bench`` sets MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=100000000000).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _he() -> np.ndarray:
    from importlib import resources

    asset = resources.files("pipeline.cohorts.demo_assets") / "tumor_target_he.png"
    return np.asarray(Image.open(str(asset)).convert("RGB"))


def _small_slide(path: Path, side: int) -> None:
    from pipeline.cohorts.demo import write_pyramid_tiff

    he = _he()
    reps = -(-side // he.shape[0])
    write_pyramid_tiff(path, np.ascontiguousarray(np.tile(he, (reps, reps, 1))[:side, :side]), mpp=0.5)


def write_island_slide(path: Path, side: int, block: int = 2048, mpp: float = 0.5, quality: int = 80) -> None:
    """A ``side`` x ``side`` pyramidal JPEG TIFF, Aperio-style, written tile by tile from a generator.

    Blocks of ``block`` px with ``(bx + by) % 3 == 0`` hold the real H&E image (tiled), the rest is glass.
    Every level is computed from the pattern, so no level is ever held in memory whole.
    """
    import tifffile

    he = _he()
    reps = -(-block // he.shape[0])
    tissue0 = np.tile(he, (reps, reps, 1))[:block, :block]
    t = 256
    with tifffile.TiffWriter(path, bigtiff=side * side * 3 > 2**31) as tif:
        lv, ds = 0, 1
        while True:
            w = side // ds
            b = block // ds  # block side at this level
            tb = np.asarray(Image.fromarray(tissue0).resize((max(1, b), max(1, b)), Image.Resampling.LANCZOS))

            def tiles(w=w, b=b, tb=tb):
                n = -(-w // t)
                for ty in range(n):
                    rows = ty * t + np.arange(t)
                    for tx in range(n):
                        cols = tx * t + np.arange(t)
                        isle = ((rows[:, None] // b + cols[None, :] // b) % 3 == 0) & (rows[:, None] < w) & (cols < w)
                        tile = tb[(rows % b)[:, None], (cols % b)[None, :]]
                        yield np.where(isle[..., None], tile, np.uint8(243)).astype(np.uint8)

            desc = (
                f"Aperio Image Library v12.0.0\r\n{w}x{w} [0,0 {w}x{w}] ({t}x{t}) JPEG/RGB Q={quality}"
                f"|AppMag = {10 / mpp:g}|MPP = {mpp}"
                if lv == 0
                else f"Aperio Image Library v12.0.0\r\n{w}x{w} -> "
            )
            tif.write(
                tiles(),
                shape=(w, w, 3),
                dtype=np.uint8,
                tile=(t, t),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                description=desc,
                subfiletype=0 if lv == 0 else 1,
                metadata=None,
            )
            if w <= 2048:
                break
            lv, ds = lv + 1, ds * 2


def _raw_part(path: str, coords: np.ndarray) -> None:
    import openslide

    sl = openslide.OpenSlide(path)
    for x, y in coords:
        sl.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB")
    sl.close()


def _rate(fn, n_items: int, repeats: int = 3) -> float:
    """Median of ``repeats`` timed runs after one untimed warm-up run (the machine is shared), items per second."""
    fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n_items / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def _rss_child(path: str, out: str, encoder: str, random_weights: bool, target_mpp: float) -> None:
    """Run in a fresh process: extract one slide, print peak RSS as JSON."""

    from data_specs.config import ExtractConfig
    from models import build_encoder
    from pipeline.slides.extract import extract_slides

    cfg = ExtractConfig(encoder=encoder, random_weights=random_weights, target_mpp=target_mpp, batch_size=64)
    enc = build_encoder(encoder, random_weights=random_weights)
    with open("/proc/self/status") as fh:  # ru_maxrss survives exec (the parent's peak): read VmRSS
        rss_before = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS"))
    t0 = time.perf_counter()
    (r,) = extract_slides([Path(path)], Path(out), enc, cfg, progress=False)
    secs = time.perf_counter() - t0
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM"))
    feat_mb = os.path.getsize(Path(out) / f"{r.slide_id}.h5") / 2**20
    print(
        json.dumps(
            {
                "status": r.status,
                "tiles": r.tiles,
                "seconds": secs,
                "rss_after_imports_mib": rss_before,
                "peak_rss_mib": hwm,
                "features_file_mib": feat_mb,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=8960, help="reader-benchmark slide side in px (0.5 um/px)")
    ap.add_argument("--encoder", default="efficientnet_lite0_imagenet")
    ap.add_argument("--random-weights", action="store_true", help="random weights (speed only)")
    ap.add_argument("--tiles", type=int, default=384, help="tiles to encode in the end-to-end measurement")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rss-sides", type=int, nargs="*", default=[20480, 40960])
    ap.add_argument("--rss-mpp", type=float, default=2.0, help="tile resolution of the RSS runs (um/px)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="where the big slides are written (then deleted)")
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        _rss_child(*args.rss_child, encoder=args.encoder, random_weights=args.random_weights, target_mpp=args.rss_mpp)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    from data_specs.config import ExtractConfig
    from models import build_encoder
    from pipeline.slides.encode import EncoderRunner
    from pipeline.slides.extract import encode_tiles
    from pipeline.slides.features import features_writer, tissue_settings
    from pipeline.slides.reader import TileDataset, collate_tiles, open_slide, slide_mpp, thumbnail, tile_grid
    from pipeline.slides.tissue import tissue_mask

    alloc = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, GPU {dev}; allocator {alloc}")
    cfg = ExtractConfig(encoder=args.encoder, random_weights=args.random_weights, batch_size=args.batch_size)
    tissue = tissue_settings(cfg)
    with tempfile.TemporaryDirectory(dir=args.workdir) as td:
        path = Path(td) / "bench.tif"
        _small_slide(path, args.side)
        s = open_slide(path)
        mpp, thumb = slide_mpp(s, path), thumbnail(s, 1024)
        mask = tissue_mask(thumb, tissue, um_per_px=mpp * s.dimensions[0] / thumb.size[0])
        grid = tile_grid(s, mask, mpp, 0.5, 224, 0.5)
        s.close()
        coords = grid.coords
        print(f"slide {args.side}x{args.side} px, {len(coords)} tissue tiles of 224 px at 0.5 um/px")

        def raw() -> None:
            sl = open_slide(path)
            for x, y in coords:
                sl.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB")
            sl.close()

        raw_rate = _rate(raw, len(coords))
        print(f"raw read_region loop (1 process)        : {raw_rate:8.1f} tiles/s  (1.00x)")

        def raw2() -> None:  # the same loop split over 2 processes: what 2 workers could reach on this machine
            import multiprocessing as mp

            with mp.get_context("fork").Pool(2) as pool:
                pool.starmap(_raw_part, [(str(path), coords[0::2]), (str(path), coords[1::2])])

        raw2_rate = _rate(raw2, len(coords))
        print(f"raw read_region loop (2 processes)      : {raw2_rate:8.1f} tiles/s  ({raw2_rate / raw_rate:.2f}x)")
        for workers in (0, 1, 2):

            def read(workers=workers) -> None:
                dl = torch.utils.data.DataLoader(
                    TileDataset(path, grid, tissue),
                    batch_size=64,
                    num_workers=workers,
                    collate_fn=collate_tiles,
                    prefetch_factor=4 if workers else None,
                )
                for _ in dl:
                    pass

            rate = _rate(read, len(coords))
            per = f", {rate / raw_rate / max(workers, 1):.2f}x per worker" if workers > 1 else ""
            print(
                f"reader (uint8 tiles), {workers} workers          : {rate:8.1f} tiles/s  "
                f"({rate / raw_rate:.2f}x raw{per})"
            )

        enc = build_encoder(args.encoder, random_weights=args.random_weights)
        sub = grid.subset(slice(0, args.tiles))
        n_sub = len(sub.coords)
        runner = EncoderRunner(enc, cfg)
        print(
            f"encoder {args.encoder}: device {runner.device}, precision {runner.precision}, batch {runner.batch_size}"
        )
        for workers in (0, 1, 2):
            c = cfg.model_copy(update={"num_workers": workers})

            def e2e(c=c) -> None:
                with features_writer(Path(td) / "e2e.h5", enc.dim, {}) as w:
                    w.finish(encode_tiles(path, sub, runner, c, tissue, w))

            rate = _rate(e2e, n_sub)
            print(f"reader + encoder + h5, {workers} workers        : {rate:8.1f} tiles/s")
        ds = TileDataset(path, sub, tissue)
        batches = [
            collate_tiles([ds[i] for i in range(j, min(j + runner.batch_size, n_sub))])[0]
            for j in range(0, n_sub, runner.batch_size)
        ]
        for cl in (True, False):
            r = EncoderRunner(enc, cfg.model_copy(update={"channels_last": cl}))

            def enc_only(r=r) -> None:
                for b in batches:
                    r(b)

            rate = _rate(enc_only, n_sub)
            print(f"encoder alone on decoded tiles, channels_last={cl!s:5}: {rate:8.1f} tiles/s  (encoder-only limit)")
        if args.skip_rss:
            return
        for side in args.rss_sides:
            big = Path(td) / f"big_{side}.tif"
            t0 = time.perf_counter()
            write_island_slide(big, side)
            mb = big.stat().st_size / 2**20
            print(f"built {side}x{side} px slide ({mb:.0f} MiB on disk) in {time.perf_counter() - t0:.0f} s")
            cmd = [sys.executable, __file__, "--encoder", args.encoder, "--rss-mpp", str(args.rss_mpp)]
            cmd += ["--random-weights"] if args.random_weights else []
            cmd += ["--rss-child", str(big), str(Path(td) / f"out_{side}")]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if res.returncode:
                print(res.stderr[-3000:])
                raise SystemExit(f"RSS run failed for {side} px")
            d = json.loads(res.stdout.strip().splitlines()[-1])
            print(
                f"peak RSS, {side}x{side} px slide: {d['peak_rss_mib']:.0f} MiB "
                f"(after imports {d['rss_after_imports_mib']:.0f} MiB); {d['tiles']} tiles at {args.rss_mpp} um/px, "
                f"features file {d['features_file_mib']:.1f} MiB, {d['seconds']:.1f} s"
            )
            big.unlink()


if __name__ == "__main__":
    main()
