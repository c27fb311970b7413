"""Peak RSS of ``histofuse extract`` at 1x and 4x slide area, sampled over time, repeated.

    python scripts/rss_over_time.py [--side 24576] [--scale 2] [--repeats 3] [--glibc-defaults]
                                    [--encoder efficientnet_lite0_imagenet] [--set KEY=VALUE ...]
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
keep-freed-memory setting; ``--set`` passes config overrides to the CLI; ``--trace DIR`` writes each run's
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
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples: list[tuple[float, float]] = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        mib = _vmrss_mib(proc.pid)
        if mib is not None:
            samples.append((time.perf_counter() - t0, mib))
        time.sleep(interval)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"histofuse extract {folder} failed:\n{err[-3000:]}")
    (rep,) = list(out.glob("features/*/extract_report.csv"))
    tiles = int(pd.read_csv(rep)["tiles"].sum())
    t_peak, peak = max(samples, key=lambda s: s[1]) if samples else (0.0, 0.0)
    late = [m for t, m in samples if t >= wall / 2]
    return {
        "tiles": tiles,
        "wall": wall,
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
    runs: dict[str, list[dict]] = {"1x": [], f"{args.scale**2}x": []}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        sizes = {"1x": args.side, f"{args.scale**2}x": args.side * args.scale}
        for key, side in sizes.items():
            (work / key).mkdir()
            write_slide(work / key / "islands.svs", side, seed=0 if key == "1x" else 1)
        for rep in range(args.repeats):
            for key in runs:
                out = work / f"out_{key}_{rep}"
                r = run_once(work / key, out, args.encoder, env, args.interval, tuple(args.overrides))
                runs[key].append(r)
                print(f"{key} run {rep + 1}: {r['tiles']} tiles in {r['wall']:.0f} s; ru_maxrss "
                      f"{r['maxrss_mib']:.0f} MiB, sampled peak {r['sampled_peak_mib']:.0f} MiB at "
                      f"{100 * r['peak_at']:.0f}% of the run, second-half median {r['late_median_mib']:.0f} MiB; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
                if args.trace:
                    args.trace.mkdir(parents=True, exist_ok=True)
                    lines = ["seconds,rss_mib"] + [f"{t:.2f},{m:.1f}" for t, m in r["samples"]]
                    (args.trace / f"rss_{key}_{rep + 1}.csv").write_text("\n".join(lines) + "\n")
    med = {k: statistics.median(r["maxrss_mib"] for r in v) for k, v in runs.items()}
    small, big = med.values()
    print("medians of ru_maxrss: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in med.items())
          + f"; {list(runs)[1]} / 1x: {big / small:.2f}x (runs: "
          + ", ".join(f"{b['maxrss_mib'] / s['maxrss_mib']:.2f}" for s, b in zip(*runs.values(), strict=True))
          + ")")  # fmt: skip
    if args.json:
        slim = {k: [{f: x for f, x in r.items() if f != "samples"} for r in v] for k, v in runs.items()}
        args.json.write_text(json.dumps({"setting": setting, "runs": slim, "median_maxrss_mib": med}, indent=1))


if __name__ == "__main__":
    main()
