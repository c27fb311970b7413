"""Peak RSS of ``histofuse extract`` at 1x and 4x slide area, sampled over time, repeated.

    python scripts/rss_over_time.py [--side 24576] [--scale 2] [--repeats 3] [--glibc-defaults]
                                    [--encoder efficientnet_lite0_imagenet] [--set KEY=VALUE ...]
                                    [--variant "KEY=VALUE ..." --variant ...]
                                    [--trace DIR] [--json FILE]

Each run is ``histofuse extract`` on a folder with one island slide (``scripts/bench_extract.py``'s slide:
pyramidal JPEG TIFF, 0.25 um/px, seeded tissue islands) in a fresh process; this driver reads the process's
``VmRSS`` from ``/proc`` every ``--interval`` seconds and takes ``ru_maxrss`` from ``wait4`` at the end. The 1x
and ``--scale``\\ :sup:`2` x slides alternate (1x, 4x, 1x, 4x, ...) so load from other jobs falls on both alike.
Printed per run: tiles, wall seconds, ``ru_maxrss``, the sampled peak and when it came (as a share of the run),
and the median RSS over the second half of the run; then the medians of the repeats and the ratio 4x / 1x of
the peak, the figure of "peak RSS flat at 4x slide area".

``--glibc-defaults`` runs the CLI with glibc's allocator defaults (``MALLOC_MMAP_MAX_=65536
MALLOC_TRIM_THRESHOLD_=131072`` in its environment, which the CLI then leaves alone) instead of its
keep-freed-memory setting; ``--set`` passes config overrides to every run; ``--variant "K=V ..."`` (repeatable)
compares sets of overrides, alternating within each repeat, with each run's tiles per second (its slide's seconds
in the run report) beside its RSS; ``--trace DIR`` writes each run's
samples (seconds, MiB) as CSV. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

GLIBC_DEFAULTS = {"MALLOC_MMAP_MAX_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _vmrss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_once(
    folder: Path, out: Path, encoder: str, env: dict, interval: float, overrides: tuple[str, ...] = ()
) -> dict:
    """One ``histofuse extract`` on ``folder``: its RSS samples, ``ru_maxrss`` and tile count."""
    import pandas as pd

    cmd = [str(Path(sys.executable).parent / "histofuse"), "extract", str(folder), "--out", str(out)]
    cmd += ["--encoder", encoder, "--mpp", "0.5", "--tile-px", "224"]
    cmd += [] if encoder == "efficientnet_lite0_imagenet" else ["--set", "extract.random_weights=true"]
    cmd += [a for kv in overrides for a in ("--set", kv)]
    t0 = time.perf_counter()
    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: the CLI's progress lines never fill a buffer
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            mib = _vmrss_mib(proc.pid)
            if mib is not None:
                samples.append((time.perf_counter() - t0, mib))
            time.sleep(interval)
        wall = time.perf_counter() - t0
        log.seek(0)
        err = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"histofuse extract {folder} failed:\n{err[-3000:]}")
    (rep,) = list(out.glob("features/*/extract_report.csv"))
    report = pd.read_csv(rep)
    tiles, slide_s = int(report["tiles"].sum()), float(report["seconds"].sum())
    t_peak, peak = max(samples, key=lambda s: s[1]) if samples else (0.0, 0.0)
    late = [m for t, m in samples if t >= wall / 2]
    return {
        "tiles": tiles,
        "wall": wall,
        "tiles_per_s": tiles / slide_s if slide_s > 0 else 0.0,  # the slide's own seconds (run report)
        "maxrss_mib": usage.ru_maxrss / 1024,
        "sampled_peak_mib": peak,
        "peak_at": t_peak / wall,
        "late_median_mib": statistics.median(late) if late else 0.0,
        "samples": samples,
    }


def main() -> None:
    from bench_extract import write_slide

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=24576, help="1x slide side in level-0 px (0.25 um/px)")
    ap.add_argument("--scale", type=int, default=2, help="side factor of the large slide (2: 4x area)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--encoder", default="efficientnet_lite0_imagenet")
    ap.add_argument("--glibc-defaults", action="store_true", help="glibc's allocator defaults, not the CLI's")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for the CLI")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="a set of space-separated config overrides; repeat it to compare sets in alternating runs",
    )
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    ap.add_argument("--trace", type=Path, default=None, help="write each run's samples here as CSV")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for k in GLIBC_DEFAULTS:
        env.pop(k, None)
    if args.glibc_defaults:
        env.update(GLIBC_DEFAULTS)
    setting = "glibc defaults" if args.glibc_defaults else "the CLI's keep-freed-memory setting"
    extra = f"; --set {' '.join(args.overrides)}" if args.overrides else ""
    print(f"{os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}; allocator: {setting}{extra}", flush=True)
    variants = args.variant or [""]
    keys = ["1x", f"{args.scale**2}x"]
    runs: dict[str, dict[str, list[dict]]] = {v: {k: [] for k in keys} for v in variants}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        for key, side in zip(keys, (args.side, args.side * args.scale), strict=True):
            (work / key).mkdir()
            write_slide(work / key / "islands.svs", side, seed=0 if key == "1x" else 1)
        for rep in range(args.repeats):
            for v in variants:  # variants alternate within each repeat: load falls on all alike
                for key in keys:
                    out = work / f"out_{len(runs[v][key])}_{key}_{variants.index(v)}"
                    ov = (*args.overrides, *v.split())
                    r = run_once(work / key, out, args.encoder, env, args.interval, ov)
                    runs[v][key].append(r)
                    print(f"{v or 'as configured'} {key} run {rep + 1}: {r['tiles']} tiles in {r['wall']:.0f} s "
                          f"({r['tiles_per_s']:.1f} tiles/s in the slide); ru_maxrss {r['maxrss_mib']:.0f} MiB, "
                          f"sampled peak {r['sampled_peak_mib']:.0f} MiB at {100 * r['peak_at']:.0f}% of the run, "
                          f"second-half median {r['late_median_mib']:.0f} MiB; load {os.getloadavg()[0]:.1f}",
                          flush=True)  # fmt: skip
                    if args.trace:
                        args.trace.mkdir(parents=True, exist_ok=True)
                        lines = ["seconds,rss_mib"] + [f"{t:.2f},{m:.1f}" for t, m in r["samples"]]
                        name = f"rss_{variants.index(v)}_{key}_{rep + 1}.csv"
                        (args.trace / name).write_text("\n".join(lines) + "\n")
    summary = {}
    for v, by_key in runs.items():
        med = {k: statistics.median(r["maxrss_mib"] for r in by_key[k]) for k in keys}
        speed = {k: statistics.median(r["tiles_per_s"] for r in by_key[k]) for k in keys}
        pairs = ", ".join(f"{b['maxrss_mib'] / a['maxrss_mib']:.2f}" for a, b in zip(*by_key.values(), strict=True))
        print(f"{v or 'as configured'}: medians of ru_maxrss " + ", ".join(f"{k} {m:.0f} MiB" for k, m in med.items())
              + f"; {keys[1]} / 1x {med[keys[1]] / med['1x']:.2f}x (pairs {pairs}); median tiles/s "
              + ", ".join(f"{k} {t:.1f}" for k, t in speed.items()), flush=True)  # fmt: skip
        summary[v] = {"median_maxrss_mib": med, "median_tiles_per_s": speed}
    if args.json:
        slim = {v: {k: [{f: x for f, x in r.items() if f != "samples"} for r in rs] for k, rs in by.items()}
                for v, by in runs.items()}  # fmt: skip
        args.json.write_text(json.dumps({"setting": setting, "runs": slim, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
