"""Training time per epoch and peak memory of the survival models, per fusion and batch size.

    python scripts/bench_models.py                      # 200 patients x 2,000 tiles x 1,280-d, CPU
    python scripts/bench_models.py --patients 20 --tiles 200 --configs concat:16   # a quick look

Synthetic cohort (features are random: this measures cost, not accuracy): ``--patients`` patients, each
with ``--tiles`` tile features of ``--dim`` (1,280 = EfficientNet-B0/lite0 width), ``--genes`` omics and
``--clinical`` clinical covariates, two sites. Each configuration runs in a fresh process through the
training recipe of ``fit_local`` and the federated sites (``new_model``, ``new_module``, ``make_trainer``,
``make_loader``: Lightning, collate, model, loss, AdamW), every tile used (``train.max_tiles`` =
``--tiles``). Up to ``--steps`` steps are timed (a whole epoch at batch size 16); the time per epoch is the
median step (collate included, the first step left out) x steps per epoch, which a shared machine's load
spikes disturb less than one wall-clock epoch. Batch size 1 uses the Cox memory bank (32 patients).
Reported: seconds per step and per epoch, the process's peak resident memory (``ru_maxrss``), the part of
it above the resident memory once the cohort was in memory (the training's own peak), and the 1-minute
load average. Configurations are ``FUSION[+MIL]:BATCH`` (``concat+transmil:16``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

DEFAULT = [
    "concat:1",
    "concat:16",
    "bilinear:1",
    "bilinear:16",
    "coattention:1",
    "coattention:16",
    "concat+transmil:1",
    "concat+transmil:16",
]


def _rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_one(args: argparse.Namespace, config: str) -> dict:
    """One configuration in this process; returns its measurements."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    import numpy as np
    import torch

    from data_specs.config import resolve_config
    from pipeline.training.data import CohortData, make_loader
    from pipeline.training.module import make_trainer, new_model, new_module

    name, bs = config.split(":")
    fusion, _, mil = name.partition("+")
    rng = np.random.default_rng(0)
    p = args.patients
    bags = [rng.standard_normal((args.tiles, args.dim), dtype=np.float32) for _ in range(p)]
    idx = np.arange(p)
    data = CohortData(
        [f"P{i}" for i in range(p)],
        ["a", "b"],
        idx % 2,
        rng.exponential(1.0, p).astype(np.float32),
        rng.random(p) < 0.6,
        {"train": idx, "val": idx[:0], "test": idx[:0]},
        bags=bags,
        tiles=[[] for _ in range(p)],
        feature_dim=args.dim,
        omics=rng.standard_normal((p, args.genes), dtype=np.float32),
        omics_present=np.ones(p, bool),
        genes=[f"G{k}" for k in range(args.genes)],
        clinical=rng.standard_normal((p, args.clinical), dtype=np.float32),
        clinical_present=np.ones(p, bool),
        clinical_columns=[f"C{k}" for k in range(args.clinical)],
    )
    rss_data = _rss_gib()
    overrides = [
        f"model.fusion={fusion}",
        f"model.mil={mil or 'gated_attention'}",
        f"train.batch_size={bs}",
        f"train.max_tiles={args.tiles}",
        f"train.memory_bank={32 if int(bs) == 1 else 0}",
        "federated.enabled=false",
    ]
    cfg = resolve_config(None, [*overrides, "train.epochs=1"], out=Path(args.tmp))
    import lightning as L

    class StepClock(L.Callback):
        """A timestamp at the start of the epoch and after every training step."""

        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.t.append(time.perf_counter())

        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
            self.t.append(time.perf_counter())

    clock = StepClock()
    module = new_module(new_model(data, cfg), cfg)
    trainer = make_trainer(1, [clock], validate=False)  # the recipe fit_local and federated sites use
    b = int(bs)
    timed = idx[: min(p, args.steps * b)]  # a full epoch when it has at most --steps steps
    loader = make_loader(data, timed, b, True, cfg.train.seed, cfg.train.max_tiles)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    wall = time.perf_counter() - t0
    steps = np.diff(clock.t)  # per step, collate included
    steps = steps[1:] if len(steps) > 1 else steps  # the first (loader start-up) left out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "config": config,
        "steps_timed": len(steps),
        "s_per_step_median": float(np.median(steps)),
        "s_per_epoch": float(np.median(steps)) * -(-p // b),
        "timed_wall_s": wall,
        "peak_rss_gib": peak,
        "train_peak_gib": peak - rss_data,
        "load_avg_1min": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--clinical", type=int, default=8)
    ap.add_argument("--steps", type=int, default=24, help="training steps timed per configuration")
    ap.add_argument("--configs", nargs="+", default=DEFAULT)
    ap.add_argument("--tmp", default="runs/bench_models")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args, args.one)))
        return
    print(
        f"{args.patients} patients x {args.tiles} tiles x {args.dim}-d, {args.genes} genes, {args.clinical} clinical; "
        f"up to {args.steps} timed steps; MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}"
    )
    head = f"{'s/step':>7s} {'s/epoch':>8s} {'peak RSS GiB':>13s} {'training peak GiB':>18s} {'load':>5s}"
    print(f"{'config':22s} {head}")
    rows = []
    for c in args.configs:
        cmd = [sys.executable, __file__, "--one", c, "--patients", str(args.patients), "--tiles", str(args.tiles)]
        cmd += ["--dim", str(args.dim), "--genes", str(args.genes), "--clinical", str(args.clinical)]
        cmd += ["--steps", str(args.steps), "--tmp", args.tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{c:22s} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"{c:22s} {r['s_per_step_median']:7.2f} {r['s_per_epoch']:8.1f} {r['peak_rss_gib']:13.2f} "
            f"{r['train_peak_gib']:18.2f} {r['load_avg_1min']:5.1f}",
            flush=True,
        )
    ref = next((r for r in rows if r["config"] == "concat:16"), None)
    if ref:
        ratios = ", ".join(f"{r['config']} {r['s_per_epoch'] / ref['s_per_epoch']:.2f}x" for r in rows)
        print(f"time per epoch relative to concat:16: {ratios}")


if __name__ == "__main__":
    main()
