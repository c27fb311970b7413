"""Slides -> tiles -> features: one self-describing ``<slide_id>.h5`` per slide, written atomically.

File layout (TRIDENT-like)::

    features  [N, D] float32     tile embeddings (chunked, grown batch by batch)
    coords    [N, 2] int64       top-left (x, y) of each tile at level 0
    attrs     encoder, weights, feature_kind, dim, tile_px, target_mpp, overlap_px, slide_mpp, level,
              read_px, size0, min_tissue, thumbnail_px, remove_pen, max_background, slide_id, slide_path,
              slide_fingerprint, n_tiles, n_rejected, precision, optimize, tile_reader, format_version, complete

Beside it: ``<slide_id>.thumb.jpg`` (the thumbnail), ``<slide_id>.mask.png`` (tissue mask, 255 = tissue) and
``<slide_id>.tissue.geojson`` (tissue contours in level-0 pixels, a FeatureCollection QuPath imports).

Scale and safety:

- memory is bounded by a few batches of tiles and a chunk of features, whatever the slide's size: tiles stream
  from DataLoader workers (each with its own slide handle) or, without workers, from one reader thread
  ``extract.read_ahead`` batches ahead of the encoder, and features are appended to resizable datasets;
- a features file is written under a temporary name, flushed to disk and renamed when complete, so a
  killed run never leaves a file that reads as complete (:func:`load_features` refuses one without
  ``complete``); leftover temporary files of dead processes are removed on the next run;
- a rerun skips slides whose file exists with matching attributes (encoder, weights, tile size, target and
  slide mpp, overlap, tissue settings, slide fingerprint);
- one unreadable or corrupt slide is recorded in the run report (the file and the decoder's error) and the
  rest go on; slides that failed in an earlier run are not retried unless ``retry_failed``, except a replaced
  file (a new fingerprint) and a slide that failed for lack of microns per pixel when this run gives one;
- ``shard="K/N"`` takes the K-th of N disjoint parts of the cohort (by a hash of the slide id, stable when
  slides are added), so several machines or GPUs split one cohort; each shard writes its own report.

The run report (``extract_report[.shard-K-of-N].csv`` and ``.json``, see :mod:`pipeline.slides.report`) is
rewritten after every slide. ``--procs N`` runs N shards in N worker processes
(:func:`pipeline.slides.parallel.extract_in_processes`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from data_specs.config import ExtractConfig
from models.encoders import TileEncoder
from pipeline.files import atomic_path
from pipeline.progress import Progress
from pipeline.slides.encode import EncoderRunner, full_batches
from pipeline.slides.features import (
    FeaturesWriter,
    done_attrs,
    expected_attrs,
    features_dir,
    features_writer,
    slide_id_of,
    tissue_settings,
)
from pipeline.slides.prefetch import Prefetcher
from pipeline.slides.reader import (
    SlideError,
    TileDataset,
    TileGrid,
    open_slide,
    slide_fingerprint,
    slide_mpp,
    thumbnail,
    tile_batches,
    tile_grid,
)
from pipeline.slides.report import (
    EARLIER,
    NO_MPP,
    EarlierFailure,
    SlideResult,
    earlier_failures,
    parse_shard,
    report_stem,
    shard_of,
    write_report,
)
from pipeline.slides.tiff_tiles import TileDecodeError
from pipeline.slides.tissue import TissueSettings, save_geojson, save_mask_png, tissue_mask

log = logging.getLogger(__name__)


class MissingMppError(SlideError):
    """The slide's metadata has no microns per pixel and none was given for it (reported as ``NO_MPP``)."""


def _slide_attrs(
    sid: str, path: Path, want: dict, dims: tuple[int, int], thumb, grid: TileGrid, enc, runner, tile_reader: str
):
    return {
        **want,
        "slide_id": sid,
        "slide_path": str(path),
        "width0": dims[0],
        "height0": dims[1],
        "thumb_width": thumb.size[0],
        "thumb_height": thumb.size[1],
        "dim": enc.dim,
        "feature_kind": enc.feature_kind,
        "level": grid.level,
        "read_px": grid.read_px,
        "size0": grid.size0,
        "precision": runner.precision,
        # how the encoder graph ran: trace (jit traced + frozen), inductor (compiled, full batches) or none (eager)
        "optimize": runner.optimize,
        "tile_reader": tile_reader,  # tiff (the level's tiles decoded directly, OpenSlide's pixels) or openslide
    }


def _write_tissue_files(out_dir: Path, sid: str, thumb, mask: np.ndarray, dims: tuple[int, int]) -> None:
    """``<sid>.thumb.jpg``, ``<sid>.mask.png`` and ``<sid>.tissue.geojson`` beside the features file."""
    with atomic_path(out_dir / f"{sid}.thumb.jpg") as tmp:
        thumb.save(tmp, format="JPEG", quality=90)
    save_mask_png(mask, out_dir / f"{sid}.mask.png")
    save_geojson(mask, dims, out_dir / f"{sid}.tissue.geojson")


def extract_slide(
    path: Path,
    out_dir: Path,
    enc: TileEncoder,
    cfg: ExtractConfig,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
    runners: list[EncoderRunner] | None = None,
    fingerprint: str | None = None,
    progress: bool = False,
    slides_left: int = 1,
) -> SlideResult:
    """Encode every tissue tile of one slide into ``out_dir/<slide_id>.h5`` (atomic; skipped if done).

    Args:
        mpp_override: microns per pixel given for this slide (wins over its metadata).
        mpp_fallback: microns per pixel for a slide whose metadata has none.
        runners: the run's encoder runner, or [] (built here for this grid x ``slides_left`` tiles), or None.
        progress: report the tiles read (a bar on a terminal, plain lines otherwise: :mod:`pipeline.progress`).
    """
    import openslide

    t0 = time.perf_counter()
    path = Path(path)
    sid = slide_id_of(path)
    out = out_dir / f"{sid}.h5"
    fp = fingerprint or slide_fingerprint(path)
    slide = open_slide(path)
    try:
        plain = isinstance(slide, openslide.ImageSlide)  # decoded first: a truncated image fails as one
        thumb = _thumbnail(slide, path, cfg.thumbnail_px) if plain else None
        mpp = _mpp(slide, path, mpp_override, mpp_fallback)
        want = {**expected_attrs(enc, cfg), "slide_fingerprint": fp, "slide_mpp": float(mpp)}
        done = done_attrs(out, want)
        if done is not None:
            return SlideResult(sid, str(path), "skipped", int(done["n_tiles"]), 0.0, fingerprint=fp)  # type: ignore[call-overload]
        if thumb is None:
            thumb = _thumbnail(slide, path, cfg.thumbnail_px)
        dims = (int(slide.dimensions[0]), int(slide.dimensions[1]))
        tissue = tissue_settings(cfg)
        mask = tissue_mask(thumb, tissue, um_per_px=mpp * dims[0] / thumb.size[0])
        grid = tile_grid(slide, mask, mpp, cfg.target_mpp, cfg.tile_px, cfg.min_tissue, cfg.overlap_px)
    finally:
        slide.close()
    _write_tissue_files(out_dir, sid, thumb, mask, dims)
    runner = _shared_runner([] if runners is None else runners, enc, cfg, len(grid.coords) * slides_left)
    ds = TileDataset(path, grid, tissue, cfg.tile_reader)
    try:
        attrs = _slide_attrs(sid, path, want, dims, thumb, grid, enc, runner, ds.reader_kind)
    except openslide.OpenSlideError as e:
        ds.close()
        raise SlideError(f"{path}: reading tiles failed ({e}); the file may be truncated or corrupt") from e
    bar = Progress(len(grid.coords), f"{sid} tiles", "tile", enabled=progress, leave=False)
    with bar, features_writer(out, enc.dim, attrs) as writer:
        rejected = encode_tiles(path, grid, runner, cfg, tissue, writer, on_tiles=bar.update, dataset=ds)
        writer.finish(rejected)
    if writer.n == 0:
        log.warning("%s: no tissue tiles; wrote an empty features file %s", path, out)
    status = "done" if writer.n else "empty"
    return SlideResult(sid, str(path), status, writer.n, time.perf_counter() - t0, "", rejected, fp)


def _shared_runner(runners: list[EncoderRunner], enc: TileEncoder, cfg: ExtractConfig, expected: int) -> EncoderRunner:
    """The run's encoder runner: ``runners[0]``, or built now (for ``expected`` tiles) and put there."""
    if not runners:
        runners.append(EncoderRunner(enc, cfg, expected_tiles=expected))
    return runners[0]


def _thumbnail(slide: object, path: Path, max_px: int):  # -> PIL.Image.Image
    """The slide's thumbnail; a file that cannot be decoded is a :class:`SlideError` with the decoder's error."""
    import openslide

    try:
        return thumbnail(slide, max_px)
    except (OSError, openslide.OpenSlideError) as e:
        raise SlideError(f"{path}: cannot decode the image ({e}); the file may be truncated or corrupt") from e


def _mpp(slide: object, path: Path, override: float | None, fallback: float | None) -> float:
    """:func:`slide_mpp`, raising :class:`MissingMppError` when no value was given and the metadata has none."""
    try:
        return slide_mpp(slide, path, override, fallback)
    except SlideError as e:
        if override is None and fallback is None:  # then the metadata's absence is the only possible failure
            raise MissingMppError(str(e)) from e
        raise


def encode_tiles(
    path: Path,
    grid: TileGrid,
    runner: EncoderRunner,
    cfg: ExtractConfig,
    tissue: TissueSettings,
    writer: FeaturesWriter,
    on_tiles: Callable[[int], object] | None = None,
    dataset: TileDataset | None = None,
) -> int:
    """Stream the grid's tiles through the encoder into ``writer`` batch by batch; returns the tiles rejected.

    ``on_tiles(n)`` is called after each batch read with its number of tiles (kept and rejected). ``dataset``:
    the grid's :class:`TileDataset` if the caller made it (closed here); by default one with ``cfg.tile_reader``.

    Holds at most the prefetched batches and one batch of features; never all tiles of a slide. With no
    DataLoader workers, a reader thread reads ``cfg.read_ahead`` batches ahead of the encoder
    (:class:`pipeline.slides.prefetch.Prefetcher`). The next batch is submitted before the previous one is
    collected (on CUDA they overlap). Batches come from :func:`pipeline.slides.reader.tile_batches` (a DataLoader,
    or ``cfg.read_threads`` threads per batch).
    """
    import openslide

    ds = dataset if dataset is not None else TileDataset(path, grid, tissue, cfg.tile_reader)
    if not len(grid.coords):
        ds.close()
        return 0
    rejected = 0
    workers = cfg.num_workers
    source = tile_batches(ds, runner.batch_size, workers, cfg.read_threads, runner.pin, cfg.prefetch_factor)
    pending: tuple[tuple[torch.Tensor, object], np.ndarray] | None = None
    ahead = Prefetcher(lambda: source, cfg.read_ahead) if not workers and cfg.read_ahead else nullcontext(source)
    try:
        with ahead as batches:
            if runner.fixed is not None:  # a graph compiled for one batch size: full batches of kept tiles
                batches = full_batches(batches, runner.batch_size)
            for x, idx, dropped in batches:  # x [K, h, w, 3] uint8 RGB, the batch's kept tiles in grid order
                if on_tiles is not None:
                    on_tiles(len(idx) + dropped)
                rejected += dropped
                if len(idx) == 0:
                    continue
                nxt = (runner.submit(x), grid.coords[idx.numpy()])
                if pending is not None:
                    writer.append(runner.collect(pending[0]), pending[1])
                pending = nxt
        if pending is not None:
            writer.append(runner.collect(pending[0]), pending[1])
    except (openslide.OpenSlideError, TileDecodeError) as e:
        raise SlideError(f"{path}: reading tiles failed ({e}); the file may be truncated or corrupt") from e
    finally:
        if isinstance(source, Generator):  # threaded_batches: its thread pool and handle copies
            source.close()
        ds.close()
    return rejected


def extract_slides(
    slides: list[Path],
    out_dir: Path,
    enc: TileEncoder,
    cfg: ExtractConfig,
    mpp_fallback: float | None = None,
    progress: bool = True,
    slide_mpps: Mapping[str, float] | None = None,
) -> list[SlideResult]:
    """Extract many slides (this run's shard of them); failures are recorded, not raised.

    Args:
        mpp_fallback: microns per pixel for slides without it in their metadata (the cohort's ``slide_mpp``);
            ``cfg.slide_mpp`` (``--slide-mpp``), when set, takes its place.
        slide_mpps: microns per pixel given per slide (``str(path)`` -> mpp), winning over the metadata.

    Writes the run report (see the module docstring) in ``out_dir`` after every slide.
    """
    ids = [slide_id_of(Path(p)) for p in slides]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"several slides share the slide_id(s) {dup}; slide file names must be unique")
    shard = parse_shard(cfg.shard)
    if shard is not None:
        slides = [p for p, i in zip(slides, ids, strict=True) if shard_of(i, shard[1]) == shard[0]]
        log.info("shard %d/%d: %d of %d slides", shard[0], shard[1], len(slides), len(ids))
    fallback = cfg.slide_mpp if cfg.slide_mpp is not None else mpp_fallback
    per_slide = {str(Path(k)): float(v) for k, v in (slide_mpps or {}).items()}
    out_dir = Path(out_dir)
    stem = report_stem(shard)
    before = earlier_failures(out_dir)
    runners: list[EncoderRunner] = []  # built on the first slide that needs encoding, then reused
    results: list[SlideResult] = []
    with Progress(len(slides), "extract", "slide", enabled=progress) as bar:
        for i, p in enumerate(map(Path, slides)):
            left = len(slides) - i
            args = (p, out_dir, enc, cfg, per_slide.get(str(p)), fallback, before, runners, progress, left)
            results.append(_extract_or_record(*args))
            write_report(out_dir, stem, results)
            bar.update(1, postfix=f"{sum(r.tiles for r in results)} tiles")
    if not slides:
        write_report(out_dir, stem, results)
    return results


def _extract_or_record(
    p: Path,
    out_dir: Path,
    enc: TileEncoder,
    cfg: ExtractConfig,
    mpp_override: float | None,
    mpp_fallback: float | None,
    before: dict[str, EarlierFailure],
    runners: list[EncoderRunner],
    progress: bool = False,
    slides_left: int = 1,
) -> SlideResult:
    """One slide of :func:`extract_slides`: extracted, skipped as failed before, or its failure recorded."""
    sid = slide_id_of(p)
    t0 = time.perf_counter()
    fp = ""
    try:
        fp = slide_fingerprint(p)
        prior = before.get(sid)
        mpp_given = mpp_override is not None or mpp_fallback is not None
        if prior is not None and prior.fingerprint == fp and not cfg.retry_failed:
            if not (prior.reason == NO_MPP and mpp_given):
                return SlideResult(sid, str(p), "failed", 0, 0.0, EARLIER + prior.error, 0, fp, prior.reason)
            log.info("%s: retried, it failed for lack of microns per pixel and this run gives one", p)
        return extract_slide(p, out_dir, enc, cfg, mpp_override, mpp_fallback, runners, fp, progress, slides_left)
    except Exception as e:  # one bad slide must not stop a night's run; the report names it
        log.error("slide %s failed: %s", p, e)
        log.debug("slide %s traceback", p, exc_info=True)
        msg = str(e) if isinstance(e, SlideError) else f"{type(e).__name__}: {e}"
        if str(p) not in msg:
            msg = f"{p}: {msg}"
        reason = NO_MPP if isinstance(e, MissingMppError) else ""
        return SlideResult(sid, str(p), "failed", 0, time.perf_counter() - t0, msg, 0, fp, reason)


SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


def discover_slides(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Whole-slide files under ``folder`` (recursively, sorted), skipping hidden files and ``exclude``.

    A folder of DICOM files is one slide: its first ``.dcm`` file (OpenSlide finds the rest). Plain images
    (PNG/JPEG) are not picked up from a folder; list them in a cohort spec.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    ex = Path(exclude).resolve() if exclude is not None else None
    found: list[Path] = []
    dicom_dirs: set[Path] = set()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in SLIDE_SUFFIXES:
            continue
        if ex is not None and (p.resolve() == ex or ex in p.resolve().parents):
            continue
        if p.suffix.lower() == ".dcm":
            if p.parent in dicom_dirs:
                continue
            dicom_dirs.add(p.parent)
        found.append(p)
    return found


def extract_folder(folder: Path, out: Path, cfg: ExtractConfig, progress: bool = True) -> Path:
    """Features for every slide file in a folder (no cohort spec needed); returns the features folder."""
    from models.encoders import build_encoder

    slides = discover_slides(folder, exclude=out)
    if not slides:
        raise ValueError(f"{folder}: no slide files ({', '.join(SLIDE_SUFFIXES)}) found")
    enc = build_encoder(cfg.encoder, weights=cfg.weights, random_weights=cfg.random_weights)
    fdir = features_dir(out, cfg)
    res = extract_slides(slides, fdir, enc, cfg, progress=progress)
    failed = [r for r in res if r.status == "failed"]
    log.info("%d slides, %d tiles into %s; %d failed", len(res), sum(r.tiles for r in res), fdir, len(failed))
    for r in failed:
        log.error("  %s: %s", r.slide_path, r.error)
    return fdir
