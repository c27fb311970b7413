"""The one way a run artifact reaches the disk: written under a temporary name, then renamed.

A reader never sees a half-written file: :func:`atomic_path` yields a temporary path in the target's own
folder (``.<name>.<host>.<pid>.tmp``, so a rename never crosses file systems), and renames it over the
target only when the block finishes without an exception; on an exception (Ctrl-C included) the temporary
file is removed. A process killed with ``kill -9`` leaves its temporary file behind;
:func:`remove_stale_tmp` deletes those of dead processes on this host.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def tmp_name(path: Path) -> Path:
    """The temporary name this process writes ``path`` under."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` (parents created).

    Args:
        path: the final file.
        fsync: flush the file to disk before the rename (for files whose presence means "complete").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(o: Any) -> Any:
    """Standard JSON values: NaN/inf become null, numpy scalars and arrays become Python ones."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [json_safe(v) for v in o]
    if hasattr(o, "tolist") and not isinstance(o, str):  # numpy arrays and scalars
        return json_safe(o.tolist())
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented standard JSON (see :func:`json_safe`)."""
    return write_text(path, json.dumps(json_safe(obj), indent=2, default=str))


def write_csv(path: str | Path, df: Any, index: bool = False) -> Path:
    """A pandas DataFrame as CSV."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=index)
    return Path(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(path: str | Path) -> None:
    """Delete temporary files of ``path`` left by dead processes of this host (a ``kill -9``)."""
    path = Path(path)
    host = socket.gethostname()
    for p in path.parent.glob(f".{path.name}.{host}.*.tmp"):
        try:
            pid = int(p.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if pid == os.getpid() or not _alive(pid):
            p.unlink(missing_ok=True)
