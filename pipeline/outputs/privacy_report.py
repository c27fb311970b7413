"""The report's privacy section: what left each site (from the run's privacy ledger) and what protected it.

Reads ``privacy_ledger.jsonl`` (embedded runs) and any ``privacy_ledger.<site>.jsonl`` (deployed SuperNodes)
in the run folder (:mod:`pipeline.federated.ledger`: one line per reply a site sent, its form and never its
values), and the run's ``config.yaml`` / ``train_summary.json`` for the protections in force (minimum count
k, SecAgg+, DP epsilon). One table row per phase and site: replies, rounds, the record keys sent (arrays
with their shapes), bytes of array payload, refused replies.
"""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from pathlib import Path

import pandas as pd
import yaml

from data_specs.artifacts import RunFiles

log = logging.getLogger(__name__)


def ledger_files(rf: RunFiles) -> list[Path]:
    """The run's ledger and every deployed node's own ledger, in name order."""
    return sorted(rf.privacy_ledger.parent.glob("privacy_ledger*.jsonl"))


def _keys(entry: dict) -> tuple[set[str], int]:
    """``record.key`` names (arrays as ``record[n arrays]``) and the array bytes of one ledger line."""
    names: set[str] = set()
    nbytes = 0
    for rec, body in (entry.get("records") or {}).items():
        keys = body.get("keys", {})
        if body.get("kind") == "arrays":
            names.add(f"{rec}[{len(keys)} arrays]")
            nbytes += sum(int(k.get("bytes", 0)) for k in keys.values())
        else:
            names.update(f"{rec}.{k}" for k in keys)
    return names, nbytes


def ledger_table(lines: list[dict]) -> pd.DataFrame:
    """One row per (phase, site): replies, rounds covered, keys sent, array bytes, refused replies."""
    rows: dict[tuple[str, str], dict] = defaultdict(
        lambda: {"replies": 0, "rounds": set(), "keys": set(), "array_bytes": 0, "refused": 0}
    )
    for e in lines:
        r = rows[(str(e.get("phase", "?")), str(e.get("site", "?")))]
        r["replies"] += 1
        if e.get("round") is not None:
            r["rounds"].add(int(e["round"]))
        if "error" in e:
            r["refused"] += 1
            continue
        names, nbytes = _keys(e)
        r["keys"] |= names
        r["array_bytes"] += nbytes
    out = []
    for (phase, site), r in sorted(rows.items()):
        rounds = sorted(r["rounds"])
        out.append(
            {
                "phase": phase,
                "site": site,
                "replies": r["replies"],
                "rounds": f"{rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else (str(rounds[0]) if rounds else ""),
                "keys sent": ", ".join(sorted(r["keys"])),
                "array bytes": r["array_bytes"],
                "refused": r["refused"],
            }
        )
    return pd.DataFrame(out)


def _protections(rf: RunFiles) -> str:
    try:
        fc = (yaml.safe_load(rf.config.read_text()) or {}).get("federated", {}) if rf.config.is_file() else {}
        info = json.loads(rf.train_summary.read_text()) if rf.train_summary.is_file() else {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        log.warning("privacy section: run settings not read (%s)", e)
        fc, info = {}, {}
    parts = [f"minimum count k = {fc.get('min_count', '?')} (no aggregate over fewer patients or events left a site)"]
    parts.append("SecAgg+ on: the server saw only the sum of the updates" if fc.get("secagg") else "SecAgg+ off")
    p = info.get("privacy")
    if p:
        parts.append(
            f"DP: epsilon {p['epsilon']:.2f} at delta {p['delta']:g} (site-level, noise multiplier "
            f"{p['noise_multiplier']:g}, clip {p['clip']:g}; covers the aggregated updates only)"
        )
    else:
        parts.append("no differential privacy")
    return "; ".join(parts) + "."


def privacy_html(rf: RunFiles) -> list[str]:
    """The section, or nothing when the run folder holds no ledger (a centralised run)."""
    from pipeline.federated.ledger import read_ledger

    lines: list[dict] = []
    for path in ledger_files(rf):
        try:
            lines += list(read_ledger(path))
        except (OSError, ValueError) as e:
            log.warning("privacy section: %s not read (%s)", path, e)
    if not lines:
        return []
    table = ledger_table(lines)
    files = ", ".join(html.escape(p.name) for p in ledger_files(rf))
    return [
        "<h2>What left each site (privacy ledger)</h2>",
        f"<p>{html.escape(_protections(rf))} Every reply a site sent passed the disclosure policy and is listed "
        f"in {files} (its form only: keys, shapes, types; never a value). {len(lines)} replies in all.</p>",
        table.to_html(index=False, border=0, classes="t"),
    ]


DEPLOYED_METRICS_NOTE = (
    "Harrell's C from the sites' summed within-site concordant and comparable pairs of test patients (no pair "
    "across sites is formed: no site sees another's patients; a site under k test patients or events sends none). "
    "Uno's C, td-AUC, IBS, Kaplan-Meier curves and bootstrap CIs need per-patient times and risks: they are "
    "site-local, not available to the server."
)


def site_local_html(rf: RunFiles) -> list[str]:
    """A deployment's report: what its server does not hold, each part named as site-local (why), and the sites
    that sent no test metric; nothing for a run folder without ``site_local.json`` (embedded or centralised)."""
    from pipeline.federated.lifecycle import SITE_LOCAL_FILE

    path = rf.root / SITE_LOCAL_FILE
    try:
        info = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as e:
        log.warning("site-local section: %s not read (%s)", path, e)
        return []
    if not info:
        return []
    names = [str(s) for s in info.get("sites", [])]
    each = lambda part: ", ".join(part.replace("<site>", s) for s in names) if "<site>" in part else part  # noqa: E731
    rows = pd.DataFrame([{"part": each(k), "why": v} for k, v in info.get("site_local", {}).items()])
    sites = ", ".join(html.escape(s) for s in names)
    silent = info.get("sites_without_metrics") or []
    return [
        "<h2>At the sites only</h2>",
        f"<p>A {html.escape(str(info.get('runtime', 'deployment')))} run: the server holds the model file, the "
        f"aggregates above and the sites' ledgers, from sites {sites}. These parts are site-local, not available "
        "to the server (each site can build them from its own patients and the model file):</p>",
        rows.to_html(index=False, border=0, classes="t") if len(rows) else "",
        f"<p class='note'>Sites that sent no test metric (fewer than k test patients or events): "
        f"{html.escape(', '.join(map(str, silent)))}.</p>"
        if silent
        else "",
    ]
