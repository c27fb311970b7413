"""What SecAgg+ secure sums cost a deployment: bytes per site and seconds, plain vs ``federated.secagg=true``.

    python scripts/secure_sum_cost.py COHORT_DIR OUT [--json summary.json]

``COHORT_DIR`` holds a demo cohort (``histofuse demo --build-only --out D`` gives ``D/cohort``); its patients,
omics and clinical data are used without slides. Over the in-process grid (Flower's wire format, no network)
the project's ServerApp/ClientApp pair runs

1. the statistics exchange alone (omics and clinical summaries, follow-up ceilings), plain and under SecAgg+;
   the normalisers' largest relative difference;
2. a whole deployment (1 round, then the finish rounds) on a clinical-only copy, plain and under SecAgg+.

Prints, per Flower group (``statistics``, ``secure_sum:<phase>``, training rounds, ``finish``), the mean bytes a
site sent, and the wall time of each run (the first run of each kind is a warm-up and is not reported).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from data_specs import load_cohort
from pipeline.federated.client_app import client_app
from pipeline.federated.embedded import InProcessGrid
from pipeline.federated.protocol import run_config_from_flower
from pipeline.federated.server_app import exchange_cohort_statistics, server_app


def _grid(cohort: Path, out: Path, rc: dict) -> InProcessGrid:
    sites = load_cohort(cohort).sites
    nodes = {600 + k: s for k, s in enumerate(sites)}
    conf = {nid: {"site": s, "cohort": str(cohort), "out": str(out)} for nid, s in nodes.items()}
    run = {"federated.min_sites": len(sites), **rc, "out": str(out), "config": "", "resume": False}
    return InProcessGrid({nid: (s, client_app) for nid, s in nodes.items()}, node_configs=conf, run_config=run)


def _bytes(grid: InProcessGrid) -> dict[str, int]:
    return {g: int(np.mean(list(v.values()))) for g, v in grid.bytes_by_round.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cohort_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    src, out = a.cohort_dir, a.out
    out.mkdir(parents=True, exist_ok=True)
    pts = pd.read_csv(src / "patients.csv").assign(slides="")
    pts.to_csv(out / "patients.csv", index=False)
    spec = out / "cohort.yaml"
    spec.write_text(f"name: demo\ntime_unit: days\npatients: patients.csv\nclinical: {{path: {src / 'clinical.csv'}, "
                    f"id_column: patient_id}}\nomics: {{path: {src / 'omics.h5ad'}, values: counts, "
                    "allow_missing: true}\n")  # fmt: skip
    (out / "clinical_only.yaml").write_text("\n".join(spec.read_text().splitlines()[:4]) + "\n")
    res: dict = {"statistics": {}, "deployment": {}}
    stats = {}
    for name, extra in (("warm-up", {}), ("plain", {}), ("secagg", {"federated.secagg": True})):
        grid = _grid(spec, out / f"stats_{name}", extra)
        t0 = time.perf_counter()
        stats[name] = exchange_cohort_statistics(grid, run_config_from_flower(grid.contexts[600].run_config))
        res["statistics"][name] = {"seconds": round(time.perf_counter() - t0, 3), "bytes_per_site": _bytes(grid)}
    diff = {}
    for part in ("omics", "clinical"):
        for key in ("mean", "std"):
            p, s = (np.asarray(stats[x][part][key], float) for x in ("plain", "secagg"))
            diff[f"{part}.{key}"] = float(np.max(np.abs(p - s) / np.maximum(np.abs(p), 1e-300)))
    res["statistics"]["max_relative_difference"] = diff
    res["statistics"]["genes"] = len(stats["plain"]["omics"]["genes"])
    base = {"train.batch_size": 8, "federated.rounds": 1, "federated.local_epochs": 1}
    for name, extra in (("warm-up", {}), ("plain", {}), ("secagg", {"federated.secagg": True})):
        grid = _grid(out / "clinical_only.yaml", out / f"deploy_{name}", {**base, **extra})
        t0 = time.perf_counter()
        server_app(grid, Context(1, SUPERLINK_NODE_ID, {}, RecordDict(), dict(grid.contexts[600].run_config)))
        res["deployment"][name] = {"seconds": round(time.perf_counter() - t0, 2), "bytes_per_site": _bytes(grid)}
    for part in res.values():
        part.pop("warm-up")
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
