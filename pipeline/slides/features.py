"""The features ``.h5`` file: the only code that opens one, for reading or writing.

Layout (TRIDENT-like): ``features [N, D] float32``, ``coords [N, 2] int64`` (top-left (x, y) of each tile
at level 0) and attributes describing how they were made (encoder, tile size, mpp, tissue settings, slide
fingerprint, ``complete``). The attributes sit on the file's root and on ``coords`` (where CLAM and TRIDENT
readers look, with their ``patch_size`` / ``patch_level`` / ``patch_size_level0`` names added).
:func:`features_writer` writes one atomically; :func:`load_features`, :func:`read_attrs` and
:func:`read_tile_geometry` read one and check it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from data_specs.artifacts import FeatureAttrs
from data_specs.config import ExtractConfig
from models.encoders import TileEncoder
from pipeline.files import atomic_path, remove_stale_tmp
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
    return TissueSettings(
        remove_pen=cfg.remove_pen,
        max_background=cfg.max_background,
        min_piece_um2=cfg.min_piece_um2,
        fill_holes_um2=cfg.fill_holes_um2,
    )


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
        "min_piece_um2": float(cfg.min_piece_um2),
        "fill_holes_um2": float(cfg.fill_holes_um2),
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


def _mismatch(attrs: Mapping[str, object], want: Mapping[str, object]) -> str | None:
    """The first attribute of ``want`` that ``attrs`` lacks or holds another value of, else None."""
    return next((k for k, v in want.items() if attrs.get(k) != v), None)


def done_attrs(path: Path, want: Mapping[str, object]) -> dict[str, object] | None:
    """Attributes of the complete features file ``path`` when they hold ``want``; None when it must be (re)written."""
    have = read_attrs(path)
    return have if have is not None and _mismatch(have, want) is None else None


def load_features(path: Path, expect: dict[str, object] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read ``(features [N, D], coords [N, 2], attrs)``; with ``expect``, check attributes match."""
    with h5py.File(path, "r") as f:
        attrs = _attrs(f)
        if not attrs.get("complete", False):
            raise ValueError(f"{path}: features file is incomplete (an interrupted write?)")
        if expect and (k := _mismatch(attrs, expect)) is not None:
            raise ValueError(f"{path}: attribute '{k}' is {attrs.get(k)!r}, expected {expect[k]!r}")
        feature_attrs(path, attrs)
        feats, coords = f["features"][:], f["coords"][:]
        if feats.shape[0] != coords.shape[0] or feats.shape[0] != attrs.get("n_tiles", feats.shape[0]):
            raise ValueError(f"{path}: features {feats.shape} and coords {coords.shape} disagree with n_tiles")
        return feats, coords, attrs


def feature_attrs(path: Path, attrs: Mapping[str, object]) -> FeatureAttrs:
    """The typed identity (encoder, weights, dim, tile_px, target_mpp) of a features file's attributes."""
    try:
        return FeatureAttrs.from_h5_attrs(dict(attrs))
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"{path}: features file attributes are not valid: {e}") from None


@dataclass(frozen=True)
class TileGeometry:
    """Where a features file's tiles sit on the slide (level-0 pixels)."""

    width0: int
    height0: int
    size0: int  # side of one tile


def read_tile_geometry(path: Path) -> TileGeometry:
    """The slide size and tile side recorded in a complete features file; raises ValueError naming the file."""
    attrs = read_attrs(path)
    if attrs is None:
        raise ValueError(f"{path}: no complete features file (missing, interrupted or corrupt)")
    try:
        return TileGeometry(int(attrs["width0"]), int(attrs["height0"]), int(attrs["size0"]))  # type: ignore[call-overload]
    except KeyError as e:
        raise ValueError(f"{path}: features file lacks the attribute {e} (written by an older version?)") from None


class FeaturesWriter:
    """Appends batches of tile features to the resizable datasets of an open features file."""

    def __init__(
        self, f: h5py.File, dim: int, attrs: Mapping[str, object], coords_attrs: Mapping[str, object], chunk: int = 256
    ):
        self._f = f
        self._feats = f.create_dataset("features", (0, dim), maxshape=(None, dim), dtype="float32", chunks=(chunk, dim))
        self._coords = f.create_dataset("coords", (0, 2), maxshape=(None, 2), dtype="int64", chunks=(chunk, 2))
        self._set_attrs({**attrs, "complete": False})
        self._coords.attrs.update(coords_attrs)
        self.n = 0

    def _set_attrs(self, attrs: Mapping[str, object]) -> None:
        self._f.attrs.update(attrs)
        self._coords.attrs.update(attrs)

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        """Add ``features [B, D]`` float32 and ``coords [B, 2]`` int64."""
        b = len(features)
        assert len(coords) == b, (features.shape, coords.shape)
        self._feats.resize(self.n + b, axis=0)
        self._coords.resize(self.n + b, axis=0)
        self._feats[self.n : self.n + b] = features
        self._coords[self.n : self.n + b] = coords
        self.n += b

    def finish(self, n_rejected: int) -> None:
        """Record the counts and mark the file complete (it becomes visible when the writer's block ends)."""
        self._set_attrs({"n_tiles": self.n, "n_rejected": n_rejected, "complete": True})
        self._f.flush()


@contextmanager
def features_writer(path: Path, dim: int, attrs: Mapping[str, object]) -> Iterator[FeaturesWriter]:
    """Write ``path`` under a temporary name; it replaces ``path`` (flushed to disk) only when the block ends
    without an exception and :meth:`FeaturesWriter.finish` was called. Temporary files left by dead processes
    are removed first.

    ``attrs`` should hold ``level``, ``read_px`` and ``size0``: they are also written on ``coords`` as CLAM's
    ``patch_level`` / ``patch_size`` and TRIDENT's ``patch_size_level0``.
    """
    path = Path(path)
    remove_stale_tmp(path)
    extra = {}
    if {"level", "read_px", "size0"} <= set(attrs):
        extra = {"patch_level": attrs["level"], "patch_size": attrs["read_px"], "patch_size_level0": attrs["size0"]}
    with atomic_path(path, fsync=True) as tmp, h5py.File(tmp, "w") as f:
        w = FeaturesWriter(f, dim, attrs, extra)
        yield w
        if not f.attrs["complete"]:
            raise RuntimeError(f"{path}: features writer closed before finish()")
