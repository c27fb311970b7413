"""A linear omics-only Cox model trained by histofuse recovers lifelines' ``CoxPHFitter`` coefficients.

    python scripts/validate_cox.py [--genes 76] [--out runs/validate_cox] [--epochs 4000]

Data: scikit-survival's ``load_breast_cancer`` (GSE7390, Desmedt et al. 2007: 198 node-negative breast
cancers, 76-gene expression signature, distant-metastasis-free time ``t.tdm`` and event ``e.tdm``). The
script writes it as a histofuse cohort (patients.csv + a genes-by-patients expression CSV, ``values: log``)
and trains through the pipeline's own path: ``load_cohort`` -> ``build_data`` (standardisation fitted on the
training patients = everyone) -> ``fit_local`` with ``model.omics_encoder=linear`` (``log_hz = omics @ beta``),
Efron ties, one batch = the whole cohort, no weight decay. lifelines fits the same standardised matrix
(no penaliser). Prints the coefficients side by side, the largest absolute and relative differences, and
both partial log-likelihoods. ``--genes K`` keeps the first K genes of the signature.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import write_csv, write_text


def write_cohort(out: Path, n_genes: int) -> Path:
    from sksurv.datasets import load_breast_cancer

    x, y = load_breast_cancer()
    genes = [c for c in x.columns if c.startswith("X")][:n_genes]
    ids = [f"GSE7390-{i:03d}" for i in range(len(x))]
    out.mkdir(parents=True, exist_ok=True)
    patients = {"patient_id": ids, "site": "desmedt", "time": y["t.tdm"], "event": y["e.tdm"].astype(int), "slides": ""}
    write_csv(out / "patients.csv", pd.DataFrame(patients))
    expr = pd.DataFrame(x[genes].to_numpy(float).T, index=genes, columns=ids)  # genes x patients
    expr.index.name = "gene"
    write_csv(out / "expression.csv", expr, index=True)
    spec = out / "cohort.yaml"
    write_text(
        spec,
        "name: gse7390\ntime_unit: days\npatients: patients.csv\n"
        "omics: {path: expression.csv, values: log, orientation: genes_by_patients}\n",
    )
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=76, help="first K genes of the 76-gene signature")
    ap.add_argument("--out", type=Path, default=Path("runs/validate_cox"))
    ap.add_argument("--epochs", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=0.02)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    from lifelines import CoxPHFitter

    from data_specs import load_cohort, resolve_config
    from models import cox_loss
    from pipeline.training.data import build_data
    from pipeline.training.module import fit_local

    spec = write_cohort(args.out / "cohort", args.genes)
    cohort = load_cohort(spec)
    n = len(cohort.patients)
    cfg = resolve_config(
        None,
        [
            "model.omics_encoder=linear",
            "model.skip=none",  # the network's own linear omics term, trained by the pipeline (no fitted offset)
            "train.loss=cox",
            "train.ties=efron",
            "train.stratify=false",
            f"train.batch_size={n}",
            f"train.epochs={args.epochs}",
            f"train.lr={args.lr}",
            "train.weight_decay=0",
            "federated.enabled=false",
        ],
        out=args.out,
    )
    all_idx = np.arange(n)
    data = build_data(cohort, None, splits={"train": all_idx, "val": all_idx[:0], "test": all_idx[:0]})
    assert data.omics is not None
    t0 = time.perf_counter()
    module, _ = fit_local(data, cfg)
    secs = time.perf_counter() - t0
    beta = module.model.omics_linear.weight.detach().double().numpy()[0]  # type: ignore[union-attr]

    df = pd.DataFrame(data.omics.astype(float), columns=data.genes).assign(T=data.time, E=data.event)
    cph = CoxPHFitter().fit(df, "T", "E")
    ref = cph.params_[data.genes].to_numpy()
    import torch

    x = torch.from_numpy(data.omics.astype(np.float64))
    ev, tm = torch.from_numpy(data.event), torch.from_numpy(data.time.astype(np.float64))
    ll_ours = -float(cox_loss(x @ torch.from_numpy(beta), ev, tm)) * int(data.event.sum())
    diff = np.abs(beta - ref)
    print(f"GSE7390: {n} patients, {int(data.event.sum())} events, {len(data.genes)} genes (standardised)")
    print(f"histofuse: {args.epochs} full-batch AdamW epochs, lr {args.lr}, Efron ties, {secs:.0f} s")
    print(f"{'gene':16s} {'histofuse':>10s} {'lifelines':>10s}")
    for g, b, r in list(zip(data.genes, beta, ref, strict=True))[:10]:
        print(f"{g:16s} {b:10.4f} {r:10.4f}")
    if len(beta) > 10:
        print(f"... ({len(beta) - 10} more)")
    print(f"max |beta - beta_lifelines| = {diff.max():.2e}; max |beta| = {np.abs(ref).max():.3f}")
    print(f"relative L2 error ||beta - ref|| / ||ref|| = {np.linalg.norm(beta - ref) / np.linalg.norm(ref):.2e}")
    print(f"correlation of coefficients = {np.corrcoef(beta, ref)[0, 1]:.6f}")
    print(f"partial log-likelihood: histofuse {ll_ours:.4f}, lifelines {cph.log_likelihood_:.4f}")


if __name__ == "__main__":
    main()
