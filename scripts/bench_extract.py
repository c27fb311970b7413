"""What users run, measured: ``histofuse extract`` end to end on a realistic slide, beside its limits and a naive loop.

    python scripts/bench_extract.py [--encoders efficientnet_lite0_imagenet resnet50] [--side 24576]
                                    [--repeats 3] [--sample 192] [--rss-scale 2] [--serial] [--openslide]
                                    [--trident] [--inductor] [--threaded] [--json FILE]

The slide: an Aperio-style pyramidal JPEG TIFF at 0.25 um/px (levels by 4, as scanners write them), glass
with seeded tissue islands of the real H&E images (large pieces, thin needle-biopsy strips and small
fragments, about a fifth of the area: a few hundred tissue tiles at the default 24,576 px, 6 x 6 mm), written
tile by tile (never whole in memory). Tiles of 224 px at 0.5 um/px are 448 level-0 px read from level 0, so
every tile is resized.

Columns, tiles per second over the tiles the extraction keeps (same grid for all):

- ``read-only``: the reader alone (``TileDataset`` -> DataLoader, background check) plus the batched resize and
  normalisation, no encoder (TRIDENT's "patching/read" column), over all the slide's tiles;
- ``encoder limit``: ``--sample`` tiles spread evenly over the slide's kept tiles, pre-decoded in memory,
  through the extraction's encoder runner (the default CPU path: preprocessing + traced/frozen fp32 model):
  what the encoder allows on this machine (a per-tile rate: the work per tile does not depend on the tile);
- ``end to end``: ``histofuse extract FOLDER`` in a fresh process on a folder of two copies of the slide,
  timed by the run report's per-slide seconds (thumbnail, tissue detection, mask and GeoJSON, grid, reading,
  encoding, writing the .h5) of the second slide: the steady state of a cohort run, where the per-process
  costs (imports, encoder build and trace, the first batches' first-touch memory) are behind. The first
  slide's rate and the process's wall time are printed beside it;
- ``end to end serial`` (with ``--serial``): the same with ``extract.read_ahead=0`` (no reader thread);
- ``end to end threaded`` (with ``--threaded``): ``extract.read_ahead=0 extract.read_threads=<cores>``: no reader
  thread beside the encoder; every core reads a batch (:func:`pipeline.slides.reader.threaded_batches`), then the
  encoder has every core;
- ``end to end openslide`` (with ``--openslide``): the same with ``extract.tile_reader=openslide`` (every tile
  through OpenSlide's ``read_region`` instead of the direct TIFF decoding), and its peak RSS at both sizes;
- ``encoder limit inductor`` / ``end to end inductor`` (with ``--inductor``): the same two with
  ``extract.optimize=inductor`` (the encoder compiled by inductor for full batches; the CLI compiles it on its
  first slide, so the timed second slide is the steady state; the compile time is printed);
- beside the rates, each CLI variant's process CPU time (user + system, ``wait4``) per tile of its two
  slides: a figure far less moved by other jobs on a shared machine than its tiles per second;
- ``naive``: a plain loop over the same ``--sample`` tiles: OpenSlide ``read_region`` -> RGB -> timm's own
  transform (PIL resize, to tensor, normalise) per tile, in batches of the CLI's size (the device's
  ``extract.batch_size``: 32 on a CPU) through the eager fp32 model (a plain
  contiguous copy, as a user loads it from timm, not the runner's channels-last one).
- ``trident read-only`` / ``trident end to end`` (with ``--trident``, when ``import trident`` works: TRIDENT,
  github.com/mahmoodlab/TRIDENT, is not on PyPI): TRIDENT's own pipeline through its public API, in this
  process, on the same slide with the same encoder object and transform: ``load_wsi`` -> ``segment_tissue``
  with its ``OtsuSegmenter`` (its deep segmenters need hub weights) -> ``extract_tissue_coords`` at the same
  um/px, tile size and minimum tissue fraction -> ``extract_patch_features`` with a ``CustomInferenceEncoder``
  (the eager fp32 model, timm's transform, the same batch size, CPU). ``read-only`` is ``extract_patch_features`` alone
  with a no-op encoder (a mean over each tile), over the coordinates of the last segmentation. Rates are over
  TRIDENT's own tiles; the tile sets of both (same level-0 lattice) are compared with each other and with the
  planted tissue islands.

Every column is run once as a warm-up, then ``--repeats`` times in rotated order (each repeat starts with
another column, so load from other jobs falls on all alike); medians are printed. Peak RSS of the CLI
process (``wait4``'s ``ru_maxrss``) on one slide at 1x and at ``--rss-scale``\\ :sup:`2` x the area for the first
encoder, ``--repeats`` alternating pairs (``scripts/rss_over_time.py``'s runs), medians and each pair's ratio.
Encoders without local weights run with random weights (speed only). Run with the Makefile's allocator
setting (``make bench``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
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
SHARED = REPO.parent / "shared" / "data" / "histology"
MPP, TARGET_MPP, TILE = 0.25, 0.5, 224


def _textures() -> list[np.ndarray]:
    """Tissue textures: the tissue part of the carcinoma H&E and, when present, the shared skin SVS region."""
    from importlib import resources

    he = Image.open(str(resources.files("pipeline.cohorts.demo_assets") / "tumor_target_he.png")).convert("RGB")
    out = [np.asarray(he)[:640, :840]]  # its right and bottom margins are background
    svs = SHARED / "cmu_small_region.svs"
    if svs.is_file():
        import openslide

        s = openslide.OpenSlide(str(svs))
        out.append(np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB")))
        s.close()
    return out


def island_mask(side: int, cell: int, seed: int = 0) -> np.ndarray:
    """``[side // cell]`` square bool mask of tissue islands: blobs, thin strips and small fragments.

    Island sizes are physical (fixed in level-0 px) and their number grows with the area, so a larger slide
    has the same tissue density, not larger islands.
    """
    rng = np.random.default_rng(seed)
    n = side // cell
    ref = 12288 / cell  # sizes are fractions of a 12,288 px (3 mm) side
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    m = np.zeros((n, n), bool)
    kinds = [(3, 0.10, 0.16, 1.0), (6, 0.012, 0.02, 8.0), (30, 0.006, 0.012, 1.5)]  # count, r_min, r_max, aspect
    for count, rmin, rmax, aspect in kinds:
        for _ in range(max(1, round(count * (side / 12288) ** 2))):
            cy, cx = rng.uniform(0.1, 0.9, 2) * n
            r = rng.uniform(rmin, rmax) * ref
            th = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
            v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
            m |= (u / (r * aspect)) ** 2 + (v / r) ** 2 <= 1
    return m


def write_slide(path: Path, side: int, seed: int = 0, quality: int = 80) -> None:
    """Aperio-style pyramidal JPEG TIFF, ``side`` px at ``MPP``, levels by 4, written tile by tile."""
    import tifffile

    tex = _textures()
    cell = 64
    mask = island_mask(side, cell, seed)
    t = 256
    with tifffile.TiffWriter(path, bigtiff=side * side * 3 > 2**31) as tif:
        lv, ds = 0, 1
        while True:
            w = side // ds
            texs = [np.asarray(Image.fromarray(a).resize((a.shape[1] // ds or 1, a.shape[0] // ds or 1))) for a in tex]

            def tiles(w=w, ds=ds, texs=texs):
                n = -(-w // t)
                for ty in range(n):
                    rows = ty * t + np.arange(t)
                    for tx in range(n):
                        cols = tx * t + np.arange(t)
                        mr = np.minimum(rows * ds // cell, mask.shape[0] - 1)
                        mc = np.minimum(cols * ds // cell, mask.shape[1] - 1)
                        isle = mask[mr[:, None], mc[None, :]] & (rows[:, None] < w) & (cols[None, :] < w)
                        a = texs[(ty // 8 + tx // 8) % len(texs)]
                        tile = a[(rows % a.shape[0])[:, None], (cols % a.shape[1])[None, :]]
                        yield np.where(isle[..., None], tile, np.uint8(238)).astype(np.uint8)

            desc = (
                f"Aperio Image Library v12.0.0\r\n{w}x{w} [0,0 {w}x{w}] ({t}x{t}) JPEG/RGB Q={quality}"
                f"|AppMag = {10 / MPP:g}|MPP = {MPP}"
                if lv == 0
                else f"Aperio Image Library v12.0.0\r\n{w}x{w} -> "
            )
            tif.write(tiles(), shape=(w, w, 3), dtype=np.uint8, tile=(t, t), compression="jpeg",
                      compressionargs={"level": quality}, photometric="rgb", description=desc,
                      subfiletype=0 if lv == 0 else 1, metadata=None)  # fmt: skip
            if w <= 4 * 1024:
                break
            lv, ds = lv + 1, ds * 4


def _grid(path: Path, cfg):
    """The tile grid ``histofuse extract`` lays on the slide (same thumbnail, tissue mask and tile rule)."""
    from pipeline.slides.features import tissue_settings
    from pipeline.slides.reader import open_slide, slide_mpp, thumbnail, tile_grid
    from pipeline.slides.tissue import tissue_mask

    s = open_slide(path)
    mpp, thumb = slide_mpp(s, path), thumbnail(s, cfg.thumbnail_px)
    mask = tissue_mask(thumb, tissue_settings(cfg), um_per_px=mpp * s.dimensions[0] / thumb.size[0])
    grid = tile_grid(s, mask, mpp, cfg.target_mpp, cfg.tile_px, cfg.min_tissue, cfg.overlap_px)
    s.close()
    return grid


def _read_only(path: Path, grid, cfg, enc) -> int:
    from pipeline.slides.features import tissue_settings
    from pipeline.slides.reader import TileDataset, collate_tiles

    n = 0
    ds = TileDataset(path, grid, tissue_settings(cfg))
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, collate_fn=collate_tiles)
    with torch.inference_mode():
        for x, idx, _ in dl:  # the batch's kept tiles
            if len(idx):
                enc.preprocess(x.permute(0, 3, 1, 2)[:, :3])
            n += len(idx)
    ds.close()
    return n


def _naive(path: Path, grid, enc, batch: int = 64, model: torch.nn.Module | None = None) -> int:
    """The naive loop on ``model``: by default a plain contiguous copy of the encoder's eager model, as a user who
    loads it from timm has it (histofuse's runner converts ``enc.model``'s weights to channels-last in place)."""
    import openslide

    if model is None:
        model = copy.deepcopy(enc.model).to(memory_format=torch.contiguous_format).eval()
    s = openslide.OpenSlide(str(path))
    n, buf = 0, []
    with torch.inference_mode():
        for i, (x, y) in enumerate(grid.coords):
            img = s.read_region((int(x), int(y)), grid.level, (grid.read_px, grid.read_px)).convert("RGB")
            buf.append(enc.transform(img))
            if len(buf) == batch or i == len(grid.coords) - 1:
                model(torch.stack(buf))
                n, buf = n + len(buf), []
    s.close()
    return n


TRIDENT_HELP = (
    "TRIDENT is not on PyPI (the PyPI 'trident' is another project): install it from its GitHub, "
    "git clone https://github.com/mahmoodlab/TRIDENT && pip install -e TRIDENT, then rerun with --trident"
)


def _trident_importable() -> bool:
    try:
        import trident  # noqa: F401
        from trident.patch_encoder_models.load import CustomInferenceEncoder  # noqa: F401
        from trident.segmentation_models import OtsuSegmenter  # noqa: F401
    except ImportError:
        return False
    return True


class _MeanPool(torch.nn.Module):
    """A no-op encoder for TRIDENT's read-only column: ``[B, 3, H, W]`` -> ``[B, 3]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class _Trident:
    """TRIDENT's pipeline through its public API on one slide, with a histofuse encoder's model and transform.

    TRIDENT gets its own copy of the model in the default (contiguous) memory format, as a TRIDENT user has it:
    histofuse's runner converts ``enc.model``'s weights to channels-last in place.
    """

    def __init__(self, slide: Path, enc, cfg, work: Path) -> None:
        from trident.patch_encoder_models.load import CustomInferenceEncoder

        self.slide, self.work, self.cfg, self.runs = slide, work, cfg, 0
        self.target_mag = round(10 / cfg.target_mpp)  # TRIDENT's magnification convention: 10x = 1 um/px
        model = copy.deepcopy(enc.model).to(memory_format=torch.contiguous_format).eval()
        self.encoder = CustomInferenceEncoder(enc.name, model, enc.transform, torch.float32)
        self.noop = CustomInferenceEncoder("noop", _MeanPool(), enc.transform, torch.float32)
        self.coords_path = self._coords(self.work / "trident_coords")[1]

    def _coords(self, job: Path):
        """Segment the tissue (Otsu) and lay the tile coordinates: the slide object and the coords file."""
        from trident import load_wsi
        from trident.segmentation_models import OtsuSegmenter

        wsi = load_wsi(str(self.slide), lazy_init=False)
        seg = OtsuSegmenter()
        wsi.segment_tissue(seg, target_mag=seg.target_mag, job_dir=str(job), device="cpu", holes_are_tissue=True)
        path = wsi.extract_tissue_coords(
            target_mag=self.target_mag,
            patch_size=self.cfg.tile_px,
            save_coords=str(job),
            min_tissue_proportion=self.cfg.min_tissue,
        )
        return wsi, path

    def end_to_end(self) -> int:
        """Segment, lay the coordinates, extract the features: TRIDENT's per-slide workflow."""
        job = self.work / f"trident_{self.runs}"
        self.runs += 1
        wsi, path = self._coords(job)
        batch = int(self.cfg.batch_size)
        wsi.extract_patch_features(self.encoder, path, str(job / "features"), device="cpu", batch_limit=batch)
        wsi.release()
        return len(self.coords(path))

    def read_only(self) -> int:
        """``extract_patch_features`` with a no-op encoder: TRIDENT's reading, resizing and transforms alone."""
        from trident import load_wsi

        wsi = load_wsi(str(self.slide), lazy_init=False)
        batch = int(self.cfg.batch_size)
        wsi.extract_patch_features(self.noop, self.coords_path, str(self.work / "trident_ro"), device="cpu",
                                   batch_limit=batch)  # fmt: skip
        wsi.release()
        return len(self.coords(self.coords_path))

    @staticmethod
    def coords(path: str) -> np.ndarray:
        """``[N, 2]`` level-0 top-left corners of TRIDENT's tiles."""
        import h5py

        with h5py.File(path, "r") as f:
            return f["coords"][:]


def _tile_sets(slide: Path, grid, kept: int, trident_xy: np.ndarray) -> dict:
    """Compare histofuse's grid tiles and TRIDENT's tiles (the same level-0 lattice) with the planted islands."""
    import openslide

    with openslide.OpenSlide(str(slide)) as s:
        side = int(s.dimensions[0])
    size0, cell = grid.size0, 64
    truth_mask = island_mask(side, cell)
    n = side // size0
    per = size0 // cell  # mask cells per tile side (448 / 64 = 7)
    frac = truth_mask[: n * per, : n * per].reshape(n, per, n, per).mean((1, 3))  # [row, col]
    truth = {(int(c) * size0, int(r) * size0) for r, c in zip(*np.nonzero(frac >= 0.5), strict=True)}
    hf = {(int(x), int(y)) for x, y in grid.coords}
    tr = {(int(x), int(y)) for x, y in trident_xy}
    return {
        "histofuse_grid": len(hf), "histofuse_kept": kept, "trident": len(tr), "both": len(hf & tr),
        "only_histofuse": len(hf - tr), "only_trident": len(tr - hf), "planted": len(truth),
        "histofuse_recall": len(hf & truth) / max(len(truth), 1),
        "trident_recall": len(tr & truth) / max(len(truth), 1),
        "histofuse_outside": len(hf - truth), "trident_outside": len(tr - truth),
    }  # fmt: skip


def _cli(
    folder: Path,
    out: Path,
    encoder: str,
    random_weights: bool,
    read_ahead: int | None = None,
    tile_reader: str = "",
    read_threads: int | None = None,
    optimize: str = "",
) -> dict:
    """``histofuse extract folder`` in a fresh process: wall seconds, peak RSS, and per slide (in order) its
    seconds and tiles (``seconds`` / ``tiles``: the last slide's)."""
    import pandas as pd

    cmd = [str(Path(sys.executable).parent / "histofuse"), "extract", str(folder), "--out", str(out)]
    cmd += ["--encoder", encoder, "--mpp", str(TARGET_MPP), "--tile-px", str(TILE)]
    cmd += ["--set", "extract.random_weights=true"] if random_weights else []
    cmd += ["--set", f"extract.read_ahead={read_ahead}"] if read_ahead is not None else []
    cmd += ["--set", f"extract.read_threads={read_threads}"] if read_threads is not None else []
    cmd += ["--set", f"extract.tile_reader={tile_reader}"] if tile_reader else []
    cmd += ["--set", f"extract.optimize={optimize}"] if optimize else []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"histofuse extract failed ({proc.returncode}):\n{log.decode()[-3000:]}")
    (rep,) = list(out.glob("features/*/extract_report.csv"))
    rows = pd.read_csv(rep)
    for _, row in rows.iterrows():
        if row["status"] != "done":
            raise SystemExit(f"{folder}: extraction of {row['slide_id']} {row['status']}: {row['error']}")
    return {
        "wall": wall,
        "slide_seconds": [float(v) for v in rows["seconds"]],
        "slide_tiles": [int(v) for v in rows["tiles"]],
        "seconds": float(rows["seconds"].iloc[-1]),
        "tiles": int(rows["tiles"].iloc[-1]),
        "rss_mib": usage.ru_maxrss / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the whole process: imports, encoder build, both slides
    }


def bench_encoder(
    name: str,
    folder: Path,
    slide: Path,
    work: Path,
    repeats: int,
    sample: int,
    serial: bool = False,
    openslide: bool = False,
    trident: bool = False,
    inductor: bool = False,
    threaded: bool = False,
) -> dict:
    """Warm-up plus ``repeats`` rotated rounds of the columns for one encoder; medians and the CLI runs."""
    from data_specs.config import ExtractConfig
    from models import build_encoder
    from pipeline.slides.encode import EncoderRunner
    from pipeline.slides.features import tissue_settings
    from pipeline.slides.reader import TileDataset, collate_tiles

    rw = name != "efficientnet_lite0_imagenet"
    cfg = ExtractConfig(encoder=name, random_weights=rw, target_mpp=TARGET_MPP, tile_px=TILE)
    enc = build_encoder(name, random_weights=rw)
    plain = copy.deepcopy(enc.model).eval()  # the naive loop's model, before the runner makes enc.model channels-last
    runner = EncoderRunner(enc, cfg)
    cfg = cfg.model_copy(update={"batch_size": runner.batch_size})  # the device's batch, for every column
    t0 = time.perf_counter()
    ind = EncoderRunner(enc, cfg.model_copy(update={"optimize": "inductor"})) if inductor else None
    ind_build = time.perf_counter() - t0
    grid = _grid(slide, cfg)
    sub = grid.subset(np.unique(np.linspace(0, len(grid.coords) - 1, min(sample, len(grid.coords))).astype(int)))
    ds = TileDataset(slide, sub, tissue_settings(cfg))
    items = [ds[i] for i in range(len(sub.coords))]
    ds.close()
    kept = [it for it in items if it[2]]
    batches = [collate_tiles(kept[j : j + cfg.batch_size])[0] for j in range(0, len(kept), cfg.batch_size)]
    del items, kept
    runs: list[dict] = []
    serial_runs: list[dict] = []
    os_runs: list[dict] = []
    ind_runs: list[dict] = []
    burst_runs: list[dict] = []
    tri = _Trident(slide, enc, cfg, work) if trident else None

    def e2e() -> tuple[int, float]:
        r = _cli(folder, work / f"out_{name}_{len(runs)}", name, rw)
        runs.append(r)
        return r["tiles"], r["seconds"]

    def e2e_serial() -> tuple[int, float]:
        r = _cli(folder, work / f"out_{name}_serial_{len(serial_runs)}", name, rw, read_ahead=0)
        serial_runs.append(r)
        return r["tiles"], r["seconds"]

    def e2e_threaded() -> tuple[int, float]:  # no read-ahead: every core reads a batch, then every core encodes it
        r = _cli(folder, work / f"out_{name}_threaded_{len(burst_runs)}", name, rw, read_ahead=0,
                 read_threads=os.cpu_count() or 1)  # fmt: skip
        burst_runs.append(r)
        return r["tiles"], r["seconds"]

    def e2e_openslide() -> tuple[int, float]:
        r = _cli(folder, work / f"out_{name}_openslide_{len(os_runs)}", name, rw, tile_reader="openslide")
        os_runs.append(r)
        return r["tiles"], r["seconds"]

    def e2e_inductor() -> tuple[int, float]:
        r = _cli(folder, work / f"out_{name}_inductor_{len(ind_runs)}", name, rw, optimize="inductor")
        ind_runs.append(r)
        return r["tiles"], r["seconds"]

    def timed(fn):
        def go() -> tuple[int, float]:
            t0 = time.perf_counter()
            n = fn()
            return n, time.perf_counter() - t0

        return go

    tri_cpu: list[float] = []

    def tri_e2e() -> tuple[int, float]:
        """TRIDENT end to end, and its CPU time (this process + its reaped DataLoader workers) per tile."""
        import resource

        def cpu() -> float:
            me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

        c0, t0 = cpu(), time.perf_counter()
        n = tri.end_to_end()
        secs = time.perf_counter() - t0
        tri_cpu.append(1e3 * (cpu() - c0) / n)
        return n, secs

    cols = {
        "read-only": timed(lambda: _read_only(slide, grid, cfg, enc)),
        "encoder limit": timed(lambda: sum(len(runner(b)) for b in batches)),
        "end to end": e2e,
        **({"end to end serial": e2e_serial} if serial else {}),
        **({"end to end threaded": e2e_threaded} if threaded else {}),
        **({"end to end openslide": e2e_openslide} if openslide else {}),
        **(
            {
                "encoder limit inductor": timed(lambda: sum(len(ind(b)) for b in batches)),
                "end to end inductor": e2e_inductor,
            }
            if ind
            else {}
        ),
        "naive": timed(lambda: _naive(slide, sub, enc, batch=cfg.batch_size, model=plain)),
        **({"trident read-only": timed(tri.read_only), "trident end to end": tri_e2e} if tri else {}),
    }
    names = list(cols)
    rates: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(repeats + 1):  # round 0 is the warm-up
        for k in names[rep % len(names) :] + names[: rep % len(names)]:
            n, secs = cols[k]()
            if rep:
                rates[k].append(n / secs)
            print(f"  {name} round {rep}{' (warm-up)' if not rep else ''} {k}: {n / secs:.1f} tiles/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    first = [c["slide_tiles"][0] / c["slide_seconds"][0] for c in runs[1:]]
    return {"encoder": name, "weights": enc.weights, "optimize": runner.optimize, "tiles": len(grid.coords),
            "kept": runs[-1]["tiles"], "sampled": sum(len(b) for b in batches), "median": med, "all": rates,
            "first_slide_median": statistics.median(first), "cli": runs[1:], "cli_serial": serial_runs[1:],
            "cli_openslide": os_runs[1:], "cli_inductor": ind_runs[1:], "cli_threaded": burst_runs[1:],
            "inductor_build_s": ind_build if ind else None,
            "load": _load(),
            "trident_cpu_ms_per_tile": tri_cpu[1:],
            "tile_sets": _tile_sets(slide, grid, runs[-1]["tiles"], tri.coords(tri.coords_path)) if tri else None,
            }  # fmt: skip


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", default=["efficientnet_lite0_imagenet", "resnet50"])
    ap.add_argument("--side", type=int, default=24576, help="slide side in level-0 px (0.25 um/px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", type=int, default=192, help="tiles the encoder-limit and naive columns run on")
    ap.add_argument("--serial", action="store_true", help="also run the CLI with extract.read_ahead=0")
    ap.add_argument("--openslide", action="store_true", help="also run the CLI with extract.tile_reader=openslide")
    ap.add_argument("--threaded", action="store_true",
                    help="also run the CLI with extract.read_ahead=0 and extract.read_threads=<cores>")  # fmt: skip
    ap.add_argument("--trident", action="store_true", help="also run TRIDENT's pipeline (when TRIDENT is installed)")
    ap.add_argument(
        "--inductor", action="store_true", help="also the encoder limit and the CLI with extract.optimize=inductor"
    )
    ap.add_argument("--rss-scale", type=int, default=2, help="side factor of the peak-RSS slide (2: 4x area)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.trident and not _trident_importable():
        print(f"--trident: TRIDENT columns skipped: {TRIDENT_HELP}", flush=True)
        args.trident = False
    torch.set_num_threads(os.cpu_count() or 1)
    alloc = {k: os.environ.get(k, "unset") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; allocator {alloc}; load {_load()}")
    res: dict = {"side": args.side, "load_start": _load(), "encoders": []}
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as td:
        work = Path(td)
        folder = work / "slides"
        folder.mkdir()
        slide = folder / "a_islands.svs"
        t0 = time.perf_counter()
        write_slide(slide, args.side)
        os.link(slide, folder / "b_islands.svs")  # the second slide of the CLI runs: the steady state
        print(
            f"slide {args.side} px at {MPP} um/px ({slide.stat().st_size / 2**20:.0f} MiB) "
            f"in {time.perf_counter() - t0:.0f} s"
        )
        for name in args.encoders:
            r = bench_encoder(
                name,
                folder,
                slide,
                work,
                args.repeats,
                args.sample,
                args.serial,
                args.openslide,
                args.trident,
                args.inductor,
                args.threaded,
            )
            res["encoders"].append(r)
            m = r["median"]
            cli = statistics.median(c["wall"] for c in r["cli"])
            print(f"{name} ({r['optimize']}, {r['weights']}): {r['kept']} of {r['tiles']} grid tiles kept "
                  f"({r['sampled']} sampled); medians tiles/s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in m.items())
                  + f"; first slide {r['first_slide_median']:.1f}; CLI wall {cli:.1f} s for two slides; "
                  f"e2e/naive {m['end to end'] / m['naive']:.2f}x, e2e/limit {m['end to end'] / m['encoder limit']:.2f}"
                  + (f", serial e2e/limit {m['end to end serial'] / m['encoder limit']:.2f}" if args.serial else "")
                  + (f", threaded e2e/limit {m['end to end threaded'] / m['encoder limit']:.2f}, threaded/e2e "
                     f"{m['end to end threaded'] / m['end to end']:.2f}x" if args.threaded else "")
                  + (f", openslide e2e/limit {m['end to end openslide'] / m['encoder limit']:.2f}"
                     if args.openslide else "")
                  + (f", e2e/TRIDENT e2e {m['end to end'] / m['trident end to end']:.2f}x, read-only/TRIDENT "
                     f"read-only {m['read-only'] / m['trident read-only']:.2f}x" if args.trident else "")
                  + (f"; inductor (built in {r['inductor_build_s']:.0f} s): e2e/limit "
                     f"{m['end to end inductor'] / m['encoder limit inductor']:.2f}, e2e/naive "
                     f"{m['end to end inductor'] / m['naive']:.2f}x, limit/traced limit "
                     f"{m['encoder limit inductor'] / m['encoder limit']:.2f}x" if args.inductor else "")
                  + (f", e2e/TRIDENT e2e {m['end to end inductor'] / m['trident end to end']:.2f}x"
                     if args.inductor and args.trident else "")
                  + f"; load {r['load']}", flush=True)  # fmt: skip
            if r["tile_sets"]:
                t = r["tile_sets"]
                print(f"  tiles: histofuse grid {t['histofuse_grid']} ({t['histofuse_kept']} kept after the "
                      f"background check), TRIDENT {t['trident']}; in both {t['both']}, only histofuse "
                      f"{t['only_histofuse']}, only TRIDENT {t['only_trident']}; planted (>= 50% island) "
                      f"{t['planted']}: recall histofuse "
                      f"{t['histofuse_recall']:.3f}, TRIDENT {t['trident_recall']:.3f}; tiles under 50% island: "
                      f"histofuse {t['histofuse_outside']}, TRIDENT {t['trident_outside']}", flush=True)  # fmt: skip
            if r["trident_cpu_ms_per_tile"]:
                per = r["trident_cpu_ms_per_tile"]
                print(f"  trident end to end: CPU {statistics.median(per):.1f} ms per tile, this process and its "
                      "DataLoader workers, the timed call only (rounds " + ", ".join(f"{v:.1f}" for v in per) + ")",
                      flush=True)  # fmt: skip
            for key in ("cli", "cli_serial", "cli_openslide", "cli_inductor", "cli_threaded"):
                if r[key]:  # CPU per tile is far less sensitive to other jobs' load than tiles per second
                    per = [1e3 * c["cpu_s"] / sum(c["slide_tiles"]) for c in r[key]]
                    print(f"  {key}: process CPU {statistics.median(per):.1f} ms per tile (rounds "
                          + ", ".join(f"{v:.1f}" for v in per) + ")", flush=True)  # fmt: skip
        if not args.skip_rss:
            res["rss"] = _rss(args, folder, work, res["encoders"][0])
    res["load_end"] = _load()
    print(f"load average at the end: {res['load_end']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


def _rss(args, folder: Path, work: Path, first: dict) -> dict:
    """Peak RSS of the CLI on one slide at 1x and at ``rss_scale**2`` x the area, ``--repeats`` alternating pairs
    (:func:`rss_over_time.run_once`: single-slide folders at both sizes, so the ratio compares like with like;
    the two-slide runs above hold twice the 1x tiles). With ``--inductor`` / ``--openslide`` the same pairs with
    ``extract.optimize=inductor`` / ``extract.tile_reader=openslide``."""
    from rss_over_time import run_once

    side = args.side * args.rss_scale
    dirs = {"1x": work / "rss_1x", "big": work / "rss_big"}
    for d in dirs.values():
        d.mkdir()
    os.link(folder / "a_islands.svs", dirs["1x"] / "islands.svs")
    write_slide(dirs["big"] / "islands_big.svs", side, seed=1)
    name, env = first["encoder"], dict(os.environ)
    variants = {"": ()}
    variants.update({"inductor": ("extract.optimize=inductor",)} if args.inductor else {})
    variants.update({"openslide": ("extract.tile_reader=openslide",)} if args.openslide else {})
    out: dict = {"big_side": side}
    for label, overrides in variants.items():
        runs: dict[str, list[dict]] = {"1x": [], "big": []}
        for rep in range(args.repeats):
            for key, d in dirs.items():
                runs[key].append(run_once(d, work / f"out_rss_{label}_{key}_{rep}", name, env, 0.2, overrides))
        small = statistics.median(r["maxrss_mib"] for r in runs["1x"])
        big = statistics.median(r["maxrss_mib"] for r in runs["big"])
        ratios = [b["maxrss_mib"] / a["maxrss_mib"] for a, b in zip(runs["1x"], runs["big"], strict=True)]
        pairs = ", ".join(f"{r:.2f}" for r in ratios)
        tag = f" ({', '.join(overrides)})" if overrides else ""
        print(f"peak RSS {name}{tag}, one slide, medians of {args.repeats}: {small:.0f} MiB at {args.side} px "
              f"({runs['1x'][0]['tiles']} tiles), {big:.0f} MiB at {side} px ({runs['big'][0]['tiles']} tiles, "
              f"{args.rss_scale**2}x area): {big / small:.2f}x (pairs {pairs})", flush=True)  # fmt: skip
        key = f"_{label}" if label else ""
        out.update({f"small{key}_mib": small, f"big{key}_mib": big, f"big{key}_tiles": runs["big"][0]["tiles"]})
    return out


if __name__ == "__main__":
    main()
