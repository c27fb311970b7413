"""TODO slides.features."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import h5py
import numpy as np

from data_specs.config import ExtractConfig
from models.encoders import TileEncoder
from pipeline.slides.tissue import TissueSettings

FORMAT_VERSION = 2


def slide_id_of(path: Path) -> str:
    """The slide's id: its file name without extension(s); for DICOM (one folder per slide), the folder's name."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return path.parent.name
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


def tissue_settings(cfg: ExtractConfig) -> TissueSettings:
    return TissueSettings(remove_pen=cfg.remove_pen, max_background=cfg.max_background)


def expected_attrs(enc: TileEncoder, cfg: ExtractConfig) -> dict[str, object]:
    return {
        "format_version": FORMAT_VERSION,
        "encoder": enc.name,
        "weights": enc.weights,
        "tile_px": cfg.tile_px,
        "target_mpp": float(cfg.target_mpp),
        "overlap_px": cfg.overlap_px,
        "min_tissue": float(cfg.min_tissue),
        "thumbnail_px": cfg.thumbnail_px,
        "remove_pen": bool(cfg.remove_pen),
        "max_background": float(cfg.max_background),
    }


def _attrs(f: h5py.File) -> dict[str, object]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}


def read_attrs(path: Path) -> dict[str, object] | None:
    """Attributes of a complete features file, or None if absent/incomplete/corrupt."""
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                return None
            return _attrs(f)
    except (OSError, KeyError):
        return None


def is_done(path: Path, want: dict[str, object]) -> bool:
    have = read_attrs(path)
    return have is not None and all(have.get(k) == v for k, v in want.items())


def load_features(path: Path, expect: dict[str, object] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read ``(features [N, D], coords [N, 2], attrs)``; with ``expect``, check attributes match."""
    with h5py.File(path, "r") as f:
        attrs = _attrs(f)
        if not attrs.get("complete", False):
            raise ValueError(f"{path}: features file is incomplete (an interrupted write?)")
        for k, v in (expect or {}).items():
            if attrs.get(k) != v:
                raise ValueError(f"{path}: attribute '{k}' is {attrs.get(k)!r}, expected {v!r}")
        feats, coords = f["features"][:], f["coords"][:]
        if feats.shape[0] != coords.shape[0] or feats.shape[0] != attrs.get("n_tiles", feats.shape[0]):
            raise ValueError(f"{path}: features {feats.shape} and coords {coords.shape} disagree with n_tiles")
        return feats, coords, attrs


def _tmp_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _remove_stale_tmp(out: Path) -> None:
    """Delete temporary files of this slide left by dead processes on this host (a kill -9)."""
    host = socket.gethostname()
    for p in out.parent.glob(f".{out.name}.{host}.*.tmp"):
        try:
            pid = int(p.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if pid == os.getpid() or not _alive(pid):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
