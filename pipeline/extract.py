"""Slides -> tiles -> features: one self-describing ``<slide_id>.h5`` per slide, written atomically.

File layout (TRIDENT-like)::

    features  [N, D] float32     tile embeddings
    coords    [N, 2] int64       top-left (x, y) of each tile at level 0
    attrs     encoder, weights, feature_kind, dim, tile_px, target_mpp, slide_mpp, level, read_px,
              size0, min_tissue, thumbnail_px, slide_id, slide_path, n_tiles, format_version

A run over many slides records each slide's status in ``extract_report.csv``; one unreadable slide
is recorded and skipped, the rest go on. Slides whose features file exists with matching attributes
are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from data_specs.config import ExtractConfig
from models.encoders import TileEncoder
from pipeline.slides import SlideError, TileDataset, open_slide, slide_mpp, thumbnail, tile_grid, tissue_mask

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
# Attributes that must match for an existing features file to be reused.
MATCH_KEYS = ("format_version", "encoder", "weights", "tile_px", "target_mpp", "min_tissue", "thumbnail_px")


@dataclass
class SlideResult:
    slide_id: str
    slide_path: str
    status: str  # done | skipped | empty | failed
    tiles: int = 0
    seconds: float = 0.0
    error: str = ""


def slide_id_of(path: Path) -> str:
    name = path.name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def features_dir(out: Path, cfg: ExtractConfig) -> Path:
    """Output folder named by the parameters that define the features."""
    return (
        Path(out)
        / "features"
        / f"{cfg.encoder.replace('/', '_').replace(':', '_')}_{cfg.tile_px}px_{cfg.target_mpp:g}mpp"
    )


def slide_fingerprint(path: Path) -> str:
    """Cheap identity of a slide file (size + hash of its first and last MiB): a replaced slide is re-encoded."""
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def expected_attrs(enc: TileEncoder, cfg: ExtractConfig) -> dict[str, object]:
    return {
        "format_version": FORMAT_VERSION,
        "encoder": enc.name,
        "weights": enc.weights,
        "tile_px": cfg.tile_px,
        "target_mpp": float(cfg.target_mpp),
        "min_tissue": float(cfg.min_tissue),
        "thumbnail_px": cfg.thumbnail_px,
    }


def read_attrs(path: Path) -> dict[str, object] | None:
    """Attributes of a complete features file, or None if absent/incomplete/corrupt."""
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                return None
            return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    except (OSError, KeyError):
        return None


def is_done(path: Path, want: dict[str, object]) -> bool:
    have = read_attrs(path)
    return have is not None and all(have.get(k) == v for k, v in want.items())


def load_features(path: Path, expect: dict[str, object] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read ``(features [N, D], coords [N, 2], attrs)``; with ``expect``, check attributes match."""
    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        if not attrs.get("complete", False):
            raise ValueError(f"{path}: features file is incomplete (an interrupted write?)")
        for k, v in (expect or {}).items():
            if attrs.get(k) != v:
                raise ValueError(f"{path}: attribute '{k}' is {attrs.get(k)!r}, expected {v!r}")
        return f["features"][:], f["coords"][:], attrs


def _autodevice(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def extract_slide(
    path: Path, out_dir: Path, enc: TileEncoder, cfg: ExtractConfig, mpp_override: float | None = None
) -> SlideResult:
    """Encode every tissue tile of one slide into ``out_dir/<slide_id>.h5`` (atomic; skipped if done)."""
    t0 = time.perf_counter()
    sid = slide_id_of(path)
    out = out_dir / f"{sid}.h5"
    want = {**expected_attrs(enc, cfg), "slide_fingerprint": slide_fingerprint(path)}
    if is_done(out, want):
        return SlideResult(sid, str(path), "skipped", int(read_attrs(out)["n_tiles"]), 0.0)  # type: ignore[index,arg-type]
    slide = open_slide(path)
    try:
        mpp = slide_mpp(slide, path, mpp_override)
        thumb = thumbnail(slide, cfg.thumbnail_px)
        mask = tissue_mask(thumb)
        grid = tile_grid(slide, mask, mpp, cfg.target_mpp, cfg.tile_px, cfg.min_tissue)
        dims = slide.dimensions
    finally:
        slide.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    thumb.save(out_dir / f"{sid}.thumb.jpg", quality=90)
    from PIL import Image

    Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / f"{sid}.mask.png")
    n = len(grid.coords)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    device = _autodevice(cfg.device)
    model = enc.model.to(device)
    try:
        _encode_into(
            tmp,
            path,
            grid,
            enc,
            cfg,
            device,
            model,
            attrs_base={
                **want,
                "slide_mpp": float(mpp),
                "slide_id": sid,
                "slide_path": str(path),
                "width0": int(dims[0]),
                "height0": int(dims[1]),
                "thumb_width": thumb.size[0],
                "thumb_height": thumb.size[1],
            },
        )
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind, even on Ctrl-C
        raise
    os.replace(tmp, out)
    return SlideResult(sid, str(path), "done" if n else "empty", n, time.perf_counter() - t0)


def _encode_into(
    tmp: Path,
    path: Path,
    grid,
    enc: TileEncoder,
    cfg: ExtractConfig,
    device: torch.device,
    model: torch.nn.Module,
    attrs_base: dict,
) -> None:
    """Stream tiles through the encoder into ``tmp`` in chunks; never holds all tiles in memory."""
    import openslide

    n = len(grid.coords)
    with h5py.File(tmp, "w") as f:
        chunks = (min(n, 256), enc.dim) if n else None
        dset = f.create_dataset("features", shape=(n, enc.dim), dtype="float32", chunks=chunks)
        f.create_dataset("coords", data=grid.coords.astype(np.int64))
        f.attrs.update(
            {
                **attrs_base,
                "dim": enc.dim,
                "feature_kind": enc.feature_kind,
                "level": grid.level,
                "read_px": grid.read_px,
                "size0": grid.size0,
                "n_tiles": n,
            }
        )
        if n:
            ds = TileDataset(path, grid, enc.transform)
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
            use_amp = device.type == "cuda"
            try:
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    for x, idx in loader:
                        feats = model(x.to(device, non_blocking=True)).float().cpu().numpy()
                        dset[int(idx[0]) : int(idx[-1]) + 1] = feats  # DataLoader keeps order: contiguous
            except openslide.OpenSlideError as e:
                raise SlideError(f"{path}: reading tiles failed ({e}); the file may be truncated or corrupt") from e
        else:
            log.warning("%s: no tissue found; writing an empty features file", path)
        f.attrs["complete"] = True


def extract_slides(
    slides: list[Path],
    out_dir: Path,
    enc: TileEncoder,
    cfg: ExtractConfig,
    mpp_override: float | None = None,
    progress: bool = True,
) -> list[SlideResult]:
    """Extract many slides; failures are recorded, not raised. Writes ``extract_report.csv`` in ``out_dir``."""
    from tqdm.auto import tqdm

    ids = [slide_id_of(p) for p in slides]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"several slides share the slide_id(s) {sorted(dup)}; slide file names must be unique")
    results = []
    for p in tqdm(slides, desc="extract", unit="slide", disable=not progress):
        try:
            r = extract_slide(Path(p), out_dir, enc, cfg, mpp_override)
        except (SlideError, OSError, ValueError) as e:
            log.error("slide %s failed: %s", p, e)
            r = SlideResult(slide_id_of(Path(p)), str(p), "failed", 0, 0.0, str(e))
        results.append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".extract_report.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "slide_path", "status", "tiles", "seconds", "error"])
        for r in results:
            w.writerow([r.slide_id, r.slide_path, r.status, r.tiles, f"{r.seconds:.2f}", r.error])
    tmp.replace(out_dir / "extract_report.csv")
    return results
