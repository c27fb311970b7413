"""A run repeated over seeds (``histofuse run --seeds N``): seeds ``0..N-1`` into ``DIR/seed-<k>/``, then
``DIR/seeds_summary.json`` (each test metric's mean +- sd over the seeds) and its console table.

The seed is ``train.seed``, which also seeds the split of the blank ``split`` cells
(:func:`pipeline.training.splits.assign_splits`): the spread covers both the model's initialisation and which
patients are tested. The runs themselves are the CLI's (``run_one``); this module only repeats them and
summarises what they wrote (:mod:`pipeline.outputs.seeds`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from data_specs.artifacts import RunFiles
from data_specs.config import RunConfig
from pipeline.files import write_json

log = logging.getLogger(__name__)


def repeat_over_seeds(cfg: RunConfig, n: int, run_one: Callable[[RunConfig, bool], Path]) -> tuple[dict, list[str]]:
    """Call ``run_one(cfg_k, full)`` for seeds ``k = 0..n-1`` with ``cfg_k.out = cfg.out/seed-<k>`` and
    ``train.seed = k`` (``full`` only for seed 0: attributions and the report); write ``seeds_summary.json``.

    Returns the summary and its console lines. Raises ``ValueError`` for ``n < 1``.
    """
    from pipeline.outputs.seeds import seeds_lines, seeds_summary

    if n < 1:
        raise ValueError(f"--seeds {n}: must be >= 1")
    rf = RunFiles(root=Path(cfg.out))
    metrics = []
    for k in range(n):
        kcfg = cfg.with_overrides([f"train.seed={k}"]).model_copy(update={"out": rf.seed(k).root})
        log.info("seed %d of %d: %s", k + 1, n, kcfg.out)
        run_one(kcfg, k == 0)
        metrics.append(json.loads(rf.seed(k).metrics.read_text()))
    summary = seeds_summary(list(range(n)), metrics)
    write_json(rf.seeds_summary, summary)
    return summary, seeds_lines(summary)
