"""Extraction in several processes at once: one shard of the cohort per process (and per GPU when there are enough).

:func:`extract_in_processes` starts the workers (:func:`extract_shard`, fresh ``spawn`` processes that rebuild the
encoder from the resolved config) and merges their reports when all have finished.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from data_specs.config import ExtractConfig
from pipeline.slides.extract import extract_slides
from pipeline.slides.report import merge_reports


def extract_in_processes(
    slides: list[Path],
    out_dir: Path,
    cfg: ExtractConfig,
    n: int,
    mpp_fallback: float | None = None,
    slide_mpps: Mapping[str, float] | None = None,
) -> int:
    """:func:`extract_slides` in ``n`` processes at once, shard ``k/n`` each, one GPU each when there are ``n``.

    Each worker (a fresh ``spawn`` process) rebuilds the encoder from ``cfg`` and extracts its shard into
    ``out_dir``; when all have finished, their reports are merged into ``out_dir/extract_report.csv``.
    Returns the worst exit status (0 when every worker finished; failed slides are in the report).
    """
    import multiprocessing as mp

    if cfg.shard is not None:
        raise ValueError(f"extract.shard={cfg.shard!r} cannot be combined with {n} processes (they run 1/N..N/N)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    ctx = mp.get_context("spawn")
    job = ([str(p) for p in slides], str(out_dir), cfg.model_dump(mode="json"), mpp_fallback, dict(slide_mpps or {}))
    procs = []
    for k in range(1, n + 1):
        gpu = gpus[k - 1] if len(gpus) >= n else None
        proc = ctx.Process(target=extract_shard, args=(k, n, gpu, *job), name=f"extract-{k}-of-{n}")
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join()
    merge_reports(out_dir, n)
    return max(c if c >= 0 else 128 - c for c in (proc.exitcode or 0 for proc in procs))


def extract_shard(
    k: int,
    n: int,
    gpu: str | None,
    slides: list[str],
    out_dir: str,
    cfg: dict,
    mpp_fallback: float | None,
    slide_mpps: dict[str, float],
) -> None:
    """Worker of :func:`extract_in_processes`: shard ``k/n`` of ``slides`` with the resolved ``cfg`` (a dict)."""
    from models.encoders import build_encoder

    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA is first touched in this process
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s shard {k}/{n} %(name)s: %(message)s")
    c = ExtractConfig.model_validate({**cfg, "shard": f"{k}/{n}"})
    enc = build_encoder(c.encoder, weights=c.weights, random_weights=c.random_weights)
    extract_slides([Path(p) for p in slides], Path(out_dir), enc, c, mpp_fallback, False, slide_mpps)
