"""Run folders that a failed command never damages: outputs are staged, then moved over the previous run's.

A training command writes its results (``config.yaml``, the model file, ``train_summary.json``, the
federated round checkpoints, and for ``histofuse run`` everything after) into ``DIR/.incomplete/``;
only when the command succeeds is each staged entry moved onto ``DIR`` (one atomic rename per entry;
a folder replaces the old folder of the same name whole). A command that fails leaves ``DIR`` as it was.
The staged federated checkpoints are what ``--resume`` continues after a killed or failed run.
Inputs that outlive one command (``features/``, the demo cohort) stay in ``DIR`` and are not staged.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_specs.artifacts import RunFiles

log = logging.getLogger(__name__)

STAGING = ".incomplete"  # under the run folder: same file system, so every move is a rename


def staging_dir(root: Path) -> Path:
    """Where a command writing into run folder ``root`` stages its outputs."""
    return Path(root) / STAGING


def commit(stage: Path, root: Path) -> list[Path]:
    """Move every entry of ``stage`` onto ``root`` (replacing entries of the same name), then remove ``stage``.

    Returns the committed paths under ``root``.
    """
    done = []
    for src in sorted(stage.iterdir()):
        dst = root / src.name
        old = None
        if dst.is_dir() and not dst.is_symlink():
            old = root / f"{STAGING}-old-{src.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)  # a folder cannot be renamed over a non-empty one: move it aside first
        os.replace(src, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        done.append(dst)
    stage.rmdir()
    return done


def _resumable(stage: Path) -> bool:
    return (stage / RunFiles.FEDERATED).is_dir()


@contextmanager
def staged_run(root: Path, resume: bool = False) -> Iterator[Path]:
    """Stage a command's outputs for run folder ``root``: yields the staging folder, commits it on success.

    Without ``resume`` a stale staging folder (from a killed or failed run) is discarded first. With
    ``resume``, the staged federated checkpoints are continued; if there are none, a copy of ``root``'s own
    (a finished run) is staged, so a failing resume leaves the finished run intact. On failure the staging
    folder is kept only when it holds federated checkpoints to resume from, and removed otherwise.
    """
    root, stage = Path(root), staging_dir(root)
    if not resume:
        shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True, exist_ok=True)
    fed = root / RunFiles.FEDERATED
    if resume and not _resumable(stage) and fed.is_dir():
        shutil.copytree(fed, stage / RunFiles.FEDERATED)
    try:
        yield stage
    except BaseException:
        if _resumable(stage):
            log.warning("%s: kept (federated checkpoints) for --resume; %s is unchanged", stage, root)
        else:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    commit(stage, root)
