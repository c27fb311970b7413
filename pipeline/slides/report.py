"""The extraction run report and cohort shards.

The report (``extract_report[.shard-K-of-N].csv`` and ``.json``) has one row per slide: slide_id, slide_path,
status (done | empty | skipped | failed), tiles, rejected, seconds, error, fingerprint, reason (why a slide
failed, when a rerun can act on it: ``no_mpp`` = no microns per pixel was known for it). A shard ``"K/N"`` is
the K-th of N disjoint parts of a cohort, by a hash of the slide id (stable when slides are added).
:func:`run_outcome` turns a report into the command's exit status and summary line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from pipeline.files import write_text

REPORT_FIELDS = ("slide_id", "slide_path", "status", "tiles", "rejected", "seconds", "error", "fingerprint", "reason")
NO_MPP = "no_mpp"  # reason: the slide had no microns per pixel and none was given; a rerun that gives one retries
EARLIER = "failed in an earlier run (rerun with --retry-failed): "  # prefix of a failure not retried


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
    reason: str = ""  # "" or NO_MPP


class EarlierFailure(NamedTuple):
    """A slide recorded as failed by an earlier run: the file it failed on, the root error and its reason."""

    fingerprint: str
    error: str
    reason: str


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


def write_report(out_dir: Path, stem: str, results: list[SlideResult]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(REPORT_FIELDS)
    for r in results:
        d = asdict(r)
        d["seconds"] = f"{r.seconds:.2f}"
        w.writerow([d[k] for k in REPORT_FIELDS])
    write_text(out_dir / f"{stem}.csv", buf.getvalue())
    summary: dict[str, int] = {}
    for r in results:
        summary[r.status] = summary.get(r.status, 0) + 1
    write_text(
        out_dir / f"{stem}.json", json.dumps({"summary": summary, "slides": [asdict(r) for r in results]}, indent=1)
    )


def root_error(error: str) -> str:
    """The error itself, without the "failed in an earlier run" prefixes that earlier reruns put before it."""
    while error.startswith(EARLIER):
        error = error[len(EARLIER) :]
    return error


def earlier_failures(out_dir: Path) -> dict[str, EarlierFailure]:
    """Slides whose latest record in the reports of earlier runs (any shard, oldest report first) is a failure.

    A slide that failed in one report and was extracted in a later one is not a failure. Reports written
    before the ``reason`` column existed get :data:`NO_MPP` from their error text.
    """
    failed: dict[str, EarlierFailure] = {}
    reports = sorted(Path(out_dir).glob("extract_report*.json"), key=lambda q: (q.stat().st_mtime_ns, q.name))
    for p in reports:
        try:
            rows = json.loads(p.read_text()).get("slides", [])
        except (OSError, ValueError):
            continue
        for r in rows:
            sid = r.get("slide_id")
            if r.get("status") != "failed":
                failed.pop(sid, None)
            elif r.get("fingerprint"):
                error = root_error(str(r.get("error", "")))
                reason = r.get("reason") or (NO_MPP if "no microns-per-pixel" in error else "")
                failed[sid] = EarlierFailure(r["fingerprint"], error, reason)
    return failed


def run_outcome(out_dir: Path, stem: str) -> tuple[int, str]:
    """Exit status and one summary line of the run whose report is ``out_dir/<stem>.json``.

    Status 1 when every slide failed (or the report is missing), else 0; the line counts each status and,
    when some slides failed, says where their errors are.
    """
    p = Path(out_dir) / f"{stem}.json"
    try:
        summary: dict[str, int] = json.loads(p.read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return 1, f"{p}: no extraction report was written"
    n, failed = sum(summary.values()), summary.get("failed", 0)
    counts = ", ".join(f"{summary[k]} {k}" for k in ("done", "empty", "skipped", "failed") if k in summary)
    line = f"{n} slides: {counts or 'none'}"
    if failed:
        what = "every slide failed" if failed == n else f"{failed} of {n} slides failed"
        line += f"; {what}, errors in {p.with_suffix('.csv')}"
    return (1 if n and failed == n else 0), line


def merge_reports(out_dir: Path, n: int) -> list[dict]:
    """Combine the ``n`` shard reports in ``out_dir`` into ``extract_report.csv`` / ``.json``."""
    rows: list[dict] = []
    for k in range(1, n + 1):
        p = Path(out_dir) / f"{report_stem((k, n))}.json"
        if p.is_file():
            rows += json.loads(p.read_text())["slides"]
    results = [SlideResult(**{f: r[f] for f in SlideResult.__dataclass_fields__ if f in r}) for r in rows]
    write_report(Path(out_dir), report_stem(None), sorted(results, key=lambda r: r.slide_id))
    return rows
