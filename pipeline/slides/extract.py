"""Slides -> tiles -> features: one self-describing ``<slide_id>.h5`` per slide, written atomically.

File layout (TRIDENT-like)::

    features  [N, D] float32     tile embeddings (chunked, grown batch by batch)
    coords    [N, 2] int64       top-left (x, y) of each tile at level 0
    attrs     encoder, weights, feature_kind, dim, tile_px, target_mpp, overlap_px, slide_mpp, level,
              read_px, size0, min_tissue, thumbnail_px, remove_pen, max_background, slide_id, slide_path,
              slide_fingerprint, n_tiles, n_rejected, precision, format_version, complete

Beside it: ``<slide_id>.thumb.jpg`` (the thumbnail), ``<slide_id>.mask.png`` (tissue mask, 255 = tissue) and
``<slide_id>.tissue.geojson`` (tissue contours in level-0 pixels, a FeatureCollection QuPath imports).

Scale and safety:

- memory is bounded by a batch of tiles and a chunk of features, whatever the slide's size: tiles stream
  from DataLoader workers (each with its own slide handle) and features are appended to resizable datasets;
- a features file is written under a temporary name, flushed to disk and renamed when complete, so a
  killed run never leaves a file that reads as complete (:func:`load_features` refuses one without
  ``complete``); leftover temporary files of dead processes are removed on the next run;
- a rerun skips slides whose file exists with matching attributes (encoder, weights, tile size, target and
  slide mpp, overlap, tissue settings, slide fingerprint);
- one unreadable or corrupt slide is recorded in the run report and the rest go on; slides that failed in an
  earlier run are not retried unless ``retry_failed`` (a replaced file, with a new fingerprint, is);
- ``shard="K/N"`` takes the K-th of N disjoint parts of the cohort (by a hash of the slide id, stable when
  slides are added), so several machines or GPUs split one cohort; each shard writes its own report.

The run report (``extract_report[.shard-K-of-N].csv`` and ``.json``) is rewritten after every slide:
slide_id, slide_path, status (done | empty | skipped | failed), tiles, rejected, seconds, error, fingerprint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from data_specs.config import ExtractConfig
from models.encoders import TileEncoder
from pipeline.slides.encode import EncoderRunner
from pipeline.slides.features import (
    _remove_stale_tmp,
    _tmp_name,
    expected_attrs,
    features_dir,
    is_done,
    read_attrs,
    slide_id_of,
    tissue_settings,
)
from pipeline.slides.reader import (
    SlideError,
    TileDataset,
    TileGrid,
    collate_tiles,
    open_slide,
    slide_mpp,
    thumbnail,
    tile_grid,
)
from pipeline.slides.tissue import TissueSettings, save_geojson, save_mask_png, tissue_mask

log = logging.getLogger(__name__)


REPORT_FIELDS = ("slide_id", "slide_path", "status", "tiles", "rejected", "seconds", "error", "fingerprint")


@dataclass
class SlideResult:
    slide_id: str
    slide_path: str
    status: str  # done | empty | skipped | failed
    tiles: int = 0
    seconds: float = 0.0
    error: str = ""
    rejected: int = 0  # tiles read but dropped as near-white/near-black
    fingerprint: str = ""


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


def extract_slide(
    path: Path,
    out_dir: Path,
    enc: TileEncoder,
    cfg: ExtractConfig,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
    runner: EncoderRunner | None = None,
    fingerprint: str | None = None,
) -> SlideResult:
    """Encode every tissue tile of one slide into ``out_dir/<slide_id>.h5`` (atomic; skipped if done).

    Args:
        mpp_override: microns per pixel given for this slide (wins over its metadata).
        mpp_fallback: microns per pixel for a slide whose metadata has none.
    """
    t0 = time.perf_counter()
    path = Path(path)
    sid = slide_id_of(path)
    out = out_dir / f"{sid}.h5"
    fp = fingerprint or slide_fingerprint(path)
    slide = open_slide(path)
    try:
        mpp = slide_mpp(slide, path, mpp_override, mpp_fallback)
        want = {**expected_attrs(enc, cfg), "slide_fingerprint": fp, "slide_mpp": float(mpp)}
        if is_done(out, want):
            n_done = int(read_attrs(out)["n_tiles"])  # type: ignore[index,arg-type]
            return SlideResult(sid, str(path), "skipped", n_done, 0.0, fingerprint=fp)
        thumb = thumbnail(slide, cfg.thumbnail_px)
        tissue = tissue_settings(cfg)
        mask = tissue_mask(thumb, tissue)
        grid = tile_grid(slide, mask, mpp, cfg.target_mpp, cfg.tile_px, cfg.min_tissue, cfg.overlap_px)
        dims = tuple(int(v) for v in slide.dimensions)
    finally:
        slide.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    thumb.save(out_dir / f"{sid}.thumb.jpg", quality=90)
    save_mask_png(mask, out_dir / f"{sid}.mask.png")
    save_geojson(mask, (dims[0], dims[1]), out_dir / f"{sid}.tissue.geojson")
    runner = runner or EncoderRunner(enc, cfg)
    tmp = _tmp_name(out)
    attrs = {
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
    }
    try:
        n, rejected = _encode_into(tmp, path, grid, runner, cfg, tissue, attrs)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind, even on Ctrl-C
        raise
    os.replace(tmp, out)
    if n == 0:
        log.warning("%s: no tissue tiles; wrote an empty features file %s", path, out)
    return SlideResult(sid, str(path), "done" if n else "empty", n, time.perf_counter() - t0, "", rejected, fp)


def _encode_into(
    tmp: Path,
    path: Path,
    grid: TileGrid,
    runner: EncoderRunner,
    cfg: ExtractConfig,
    tissue: TissueSettings,
    attrs: dict,
) -> tuple[int, int]:
    """Stream tiles through the encoder into ``tmp`` batch by batch; returns (tiles kept, tiles rejected).

    Holds at most the DataLoader's prefetched batches and one batch of features; never all tiles of a slide.
    """
    import openslide

    dim = runner.enc.dim
    chunk = 256
    n = rejected = 0
    with h5py.File(tmp, "w") as f:
        feats = f.create_dataset("features", (0, dim), maxshape=(None, dim), dtype="float32", chunks=(chunk, dim))
        coords = f.create_dataset("coords", (0, 2), maxshape=(None, 2), dtype="int64", chunks=(chunk, 2))
        f.attrs.update(attrs)
        f.attrs["complete"] = False

        def write(out: np.ndarray, xy: np.ndarray) -> None:
            nonlocal n
            b = len(out)
            feats.resize(n + b, axis=0)
            coords.resize(n + b, axis=0)
            feats[n : n + b] = out
            coords[n : n + b] = xy
            n += b

        if len(grid.coords):
            ds = TileDataset(path, grid, tissue)
            workers = cfg.num_workers
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=runner.batch_size,
                num_workers=workers,
                collate_fn=collate_tiles,
                pin_memory=runner.pin,
                prefetch_factor=cfg.prefetch_factor if workers else None,
                persistent_workers=False,
            )
            pending: tuple[tuple[torch.Tensor, object], np.ndarray] | None = None
            try:
                for x, idx, keep in loader:  # x [B, h, w, 4] uint8 RGBA; DataLoader keeps grid order
                    if not bool(keep.all()):
                        rejected += int((~keep).sum())
                        x, idx = x[keep], idx[keep]
                    if len(idx) == 0:
                        continue
                    nxt = (runner.submit(x), grid.coords[idx.numpy()])
                    if pending is not None:
                        write(runner.collect(pending[0]), pending[1])
                    pending = nxt
                if pending is not None:
                    write(runner.collect(pending[0]), pending[1])
            except openslide.OpenSlideError as e:
                raise SlideError(f"{path}: reading tiles failed ({e}); the file may be truncated or corrupt") from e
            finally:
                ds.close()
        f.attrs["n_tiles"] = n
        f.attrs["n_rejected"] = rejected
        f.attrs["complete"] = True
        f.flush()
    with open(tmp, "rb+") as fh:  # on disk before the rename makes it visible as complete
        os.fsync(fh.fileno())
    return n, rejected


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1 <= K <= N) -> ``(K, N)``; None -> None. Raises ValueError naming the value."""
    if shard is None:
        return None
    try:
        k_s, n_s = str(shard).split("/")
        k, n = int(k_s), int(n_s)
    except ValueError:
        raise ValueError(f"shard '{shard}': expected K/N, e.g. 2/4 (the second of four parts)") from None
    if not 1 <= k <= n:
        raise ValueError(f"shard '{shard}': K must be between 1 and N={n}")
    return k, n


def shard_of(slide_id: str, n: int) -> int:
    """1-based shard of a slide among ``n``: a hash of its id, so adding slides never moves the others."""
    return int(hashlib.sha1(slide_id.encode()).hexdigest(), 16) % n + 1


def report_stem(shard: tuple[int, int] | None) -> str:
    return "extract_report" if shard is None else f"extract_report.shard-{shard[0]}-of-{shard[1]}"


def _write_report(out_dir: Path, stem: str, results: list[SlideResult]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{stem}.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(REPORT_FIELDS)
        for r in results:
            d = asdict(r)
            d["seconds"] = f"{r.seconds:.2f}"
            w.writerow([d[k] for k in REPORT_FIELDS])
    tmp.replace(out_dir / f"{stem}.csv")
    summary: dict[str, int] = {}
    for r in results:
        summary[r.status] = summary.get(r.status, 0) + 1
    tmp = out_dir / f".{stem}.json.tmp"
    tmp.write_text(json.dumps({"summary": summary, "slides": [asdict(r) for r in results]}, indent=1))
    tmp.replace(out_dir / f"{stem}.json")


def earlier_failures(out_dir: Path) -> dict[str, tuple[str, str]]:
    """Slides recorded as failed by earlier runs (any shard): slide_id -> (fingerprint, error)."""
    failed: dict[str, tuple[str, str]] = {}
    for p in sorted(Path(out_dir).glob("extract_report*.json")):
        try:
            rows = json.loads(p.read_text()).get("slides", [])
        except (OSError, ValueError):
            continue
        for r in rows:
            if r.get("status") == "failed" and r.get("fingerprint"):
                failed[r["slide_id"]] = (r["fingerprint"], r.get("error", ""))
    return failed


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
    from tqdm.auto import tqdm

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
    runner: EncoderRunner | None = None
    results: list[SlideResult] = []
    for p in tqdm(slides, desc="extract", unit="slide", disable=not progress):
        p = Path(p)
        sid = slide_id_of(p)
        t0 = time.perf_counter()
        fp = ""
        try:
            fp = slide_fingerprint(p)
            if sid in before and before[sid][0] == fp and not cfg.retry_failed:
                why = f"failed in an earlier run (rerun with --retry-failed): {before[sid][1]}"
                r = SlideResult(sid, str(p), "failed", 0, 0.0, why, fingerprint=fp)
            else:
                if runner is None:
                    runner = EncoderRunner(enc, cfg)
                r = extract_slide(p, out_dir, enc, cfg, per_slide.get(str(p)), fallback, runner, fp)
        except Exception as e:  # one bad slide must not stop a night's run; the report names it
            log.error("slide %s failed: %s", p, e)
            log.debug("slide %s traceback", p, exc_info=True)
            msg = str(e) if isinstance(e, SlideError) else f"{type(e).__name__}: {e}"
            if str(p) not in msg:
                msg = f"{p}: {msg}"
            r = SlideResult(sid, str(p), "failed", 0, time.perf_counter() - t0, msg, fingerprint=fp)
        results.append(r)
        _write_report(out_dir, stem, results)
    if not slides:
        _write_report(out_dir, stem, results)
    return results


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


def merge_reports(out_dir: Path, n: int) -> list[dict]:
    """Combine the ``n`` shard reports in ``out_dir`` into ``extract_report.csv`` / ``.json``."""
    rows: list[dict] = []
    for k in range(1, n + 1):
        p = Path(out_dir) / f"{report_stem((k, n))}.json"
        if p.is_file():
            rows += json.loads(p.read_text())["slides"]
    results = [SlideResult(**{f: r[f] for f in SlideResult.__dataclass_fields__ if f in r}) for r in rows]
    _write_report(Path(out_dir), report_stem(None), sorted(results, key=lambda r: r.slide_id))
    return rows


def extract_in_processes(argv: list[str], n: int, out_dir: Path) -> int:
    """Run ``histofuse extract <argv> --shard k/n`` in ``n`` processes at once, one GPU each when there are ``n``.

    Each process takes one shard of the cohort; when all have finished, their reports are merged into
    ``out_dir/extract_report.csv``. Returns the worst exit status.
    """
    import subprocess
    import sys

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    procs = []
    for k in range(1, n + 1):
        env = dict(os.environ)
        if len(gpus) >= n:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k - 1]
        cmd = [sys.executable, "-m", "pipeline.cli", *argv, "--shard", f"{k}/{n}"]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    merge_reports(out_dir, n)
    return max(codes)


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out
