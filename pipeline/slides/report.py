"""The extraction run report and cohort shards.

The report (``extract_report[.shard-K-of-N].csv`` and ``.json``) has one row per slide: slide_id, slide_path,
status (done | empty | skipped | failed), tiles, rejected, seconds, error, fingerprint. A shard ``"K/N"`` is
the K-th of N disjoint parts of a cohort, by a hash of the slide id (stable when slides are added).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.files import write_text

REPORT_FIELDS = ("slide_id", "slide_path", "status", "tiles", "rejected", "seconds", "error", "fingerprint")


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


def earlier_failures(out_dir: Path) -> dict[str, tuple[str, str]]:
    """Slides recorded as failed by earlier runs (any shard): slide_id -> (fingerprint, error)."""
    failed: dict[str, tuple[str, str]] = {}
    for p in sorted(Path(out_dir).glob("extract_report*.json")):
        try:
            rows = json.loads(p.read_text()).get("slides", [])
        except (OSError, ValueError):
            continue
        for r in rows:
            if r.get("status") == "failed" and r.get("fingerprint"):
                failed[r["slide_id"]] = (r["fingerprint"], r.get("error", ""))
    return failed


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
