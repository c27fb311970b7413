"""Diagnostic: the network's linear skip term (``model.skip=linear``) fitted alone, to convergence, as ridge Cox.

    python scripts/ridge_skip_diagnostic.py RUN [--isotropic]

``RUN``: a ``histofuse demo`` folder (``cohort/cohort.yaml`` and ``features/``) or a run folder (``config.yaml``).
The skip term's inputs (standardised mean-pooled tile features, genes, clinical covariates, each block over the
square root of its width; ``--isotropic``: the tile block centred and divided by one overall scale instead of per
dimension) are fitted on the run's training split by L-BFGS (full batch, site-stratified Efron Cox loss plus
``lambda / 2 * ||w||^2``) for a grid of ``lambda``; ``lambda`` is chosen by the C-index on the run's val split, then
the test C-index of that fit (and of a refit on train + val) is printed. The test C of every grid point is printed
too, labelled as a diagnostic: it is never used to choose anything. Centralised only.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

LAMBDAS = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


def skip_inputs(run: Path, isotropic: bool):
    """``(data, X [P, D + G + C] float64)``: the skip term's inputs for every patient of the run's cohort."""
    from data_specs import load_cohort, resolve_config
    from pipeline.training.data import load_run_data, make_loader, model_inputs
    from pipeline.training.module import new_model

    ov = ["federated.enabled=false", "model.skip=linear"]
    if (run / "config.yaml").is_file():
        cfg = resolve_config(run / "config.yaml", ov, out=run)
    else:
        cfg = resolve_config(None, ov, out=run, cohort=run / "cohort" / "cohort.yaml")
    data = load_run_data(load_cohort(cfg.cohort), cfg)
    skip = new_model(data, cfg).eval().skip
    idx = np.arange(len(data.patient_ids))
    with torch.no_grad():
        x = model_inputs(next(iter(make_loader(data, idx, len(idx), False))))
        z = skip.slide_z(x["features"], x["mask"])  # (P, D)
        if isotropic:  # undo the per-dimension scale, divide by one overall scale
            scale = skip.get_buffer("slide_scale")
            z = z * scale / scale.pow(2).mean().sqrt()
        parts = [z]
        for k, m in (("omics", "omics_mask"), ("clinical", "clinical_mask")):
            if x.get(k) is not None:
                v = x[k].masked_fill(~x[m].unsqueeze(1), 0.0)
                parts.append(v / v.shape[1] ** 0.5)
    return data, torch.cat(parts, 1).double()


def fit_ridge(x: torch.Tensor, data, ix: np.ndarray, lam: float) -> torch.Tensor:
    """Ridge Cox weights ``[F]`` on the patients ``ix`` (L-BFGS to convergence)."""
    from models import cox_loss

    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")
    t, e, s = (torch.from_numpy(a[ix]) for a in (data.time.astype(np.float64), data.event, data.site))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = cox_loss(x[ix] @ w, e, t, s) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--isotropic", action="store_true", help="tile block: one overall scale, not per dimension")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    from pipeline.stats.metrics import harrell_cindex

    data, x = skip_inputs(args.run, args.isotropic)
    tr, va, te = data.splits["train"], data.splits["val"], data.splits["test"]

    def cindex(w: torch.Tensor, ix: np.ndarray) -> float:
        return float(harrell_cindex(data.time[ix], data.event[ix], (x[ix] @ w).numpy()))

    scores = []
    for lam in LAMBDAS:
        w = fit_ridge(x, data, tr, lam)
        scores.append((cindex(w, va), lam))
        print(f"lambda {lam:g}: val C {scores[-1][0]:.3f} (diagnostic only: test C {cindex(w, te):.3f})")
    best = max(scores)[1]  # ties: the larger lambda
    w_tr, w_all = fit_ridge(x, data, tr, best), fit_ridge(x, data, np.concatenate([tr, va]), best)
    c_tr, c_all = cindex(w_tr, te), cindex(w_all, te)
    print(f"chosen lambda {best:g} (val); test C: fit on train {c_tr:.3f}, on train+val {c_all:.3f}")


if __name__ == "__main__":
    main()
