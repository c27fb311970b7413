"""TCGA-BRCA clinical survival (FLamby's 6 regional centres and fixed train/test split): federated benchmark.

    python scripts/tcga_brca.py --data PATH/TO/tcga_brca [--out runs/tcga_brca] [--seeds 42 43 44 45 46]
        [--methods pooled sites fedsgd fedavg fedprox fedadam fedadam_secagg fedadam_dp linear_pooled linear_fedavg
        linear_fedadam lcv_pooled lcv_pooled_unstratified lcv_fedsgd lcv_fedavg lcv_fedadam coxnet_inrun]
        [--tune fedsgd linear_pooled ...]
        [--set section.key=value ...]

Builds a clinical-only cohort spec with :func:`pipeline.cohorts.tcga_brca.build_cohort` (FLamby's ``brca.csv``
and ``train_test_split.csv``; validation: 15% of each centre's training patients, seeded), then trains each
method and prints the pooled test C-index in FLamby's metric (lifelines ``concordance_index(T, -risk, E)``),
mean +- sd over seeds, with wall time per round and bytes each site sent per round (Flower wire format,
embedded runtime).

The ``lcv_*`` rows are the linear family fitted to its optimum (:mod:`pipeline.training.linear_fit`,
:mod:`pipeline.federated.linear_sites`): its penalty by (federated) K-fold CV on the training + validation
patients; ``coxnet_inrun`` is the centralised Coxnet every run reports (alpha by CV on the same patients).

Choices use the validation split only: the best round / epoch by pooled validation Cox loss, and with
``--tune M ...`` each listed method's candidate settings (``CANDIDATES``) are compared on the first seed by
pooled validation C-index before any test number is computed. The test set is never used for a choice.

Each method's data are prepared as its run prepares them: a pooled method's normalisers and clinical encoding
from all training patients, a federated method's from the sites' summaries (categories and cells with fewer than
``federated.min_count`` patients at a site suppressed; on TCGA-BRCA that drops the rare stage IIIC columns).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.cohorts.tcga_brca import build_cohort
from pipeline.files import write_json

# Settings fixed before any run (no test-set look): rounds x local epochs match the pooled epochs. Server
# learning rates were chosen on the validation split of seed 42 (`--tune fedsgd fedadam`): FedSGD 0.1 (val C
# 0.754 vs 0.747 at 0.3 and 0.749 at 1.0), FedAdam 0.05 (0.738 vs 0.721 at 0.01). DP settings are a priori.
COMMON = ["train.epochs=8", "federated.rounds=8", "federated.local_epochs=1"]
METHODS: dict[str, list[str]] = {
    "pooled": ["federated.enabled=false"],
    "sites": ["federated.enabled=false"],  # each centre alone on its own training patients
    "fedsgd": ["federated.strategy=fedsgd", "federated.rounds=40", "federated.server_lr=0.1"],
    "fedavg": ["federated.strategy=fedavg"],
    "fedprox": ["federated.strategy=fedprox", "federated.proximal_mu=0.01"],
    "fedadam": ["federated.strategy=fedadam", "federated.server_lr=0.05"],
    "fedadam_secagg": ["federated.strategy=fedadam", "federated.server_lr=0.05", "federated.secagg=true"],
    "fedadam_dp": [
        "federated.strategy=fedadam",
        "federated.server_lr=0.05",
        "federated.dp_noise=1.0",
        "federated.dp_clip=0.1",
    ],
}
# The linear model family (model.family=linear: log_hz linear in the covariates, L2 through AdamW weight decay):
# zero-initialised and convex, so longer schedules cost little. Its learning rate / penalty (and FedAdam's server
# rate) are picked on validation with --tune, like the network's.
LINEAR = ["model.family=linear", "train.epochs=30", "federated.rounds=30", "federated.local_epochs=1"]
METHODS |= {
    "linear_pooled": [*LINEAR, "federated.enabled=false"],
    "linear_fedavg": [*LINEAR, "federated.strategy=fedavg"],
    "linear_fedadam": [*LINEAR, "federated.strategy=fedadam", "federated.server_lr=0.05"],
}
# What every federated `histofuse run` reports as "federated linear Cox (no pooling)"
# (pipeline.outputs.federated_linear): the run's own strategy and schedule, its weight decay chosen per seed on
# the pooled validation C-index
METHODS |= {"inrun_linear_fedavg": ["federated.strategy=fedavg"], "inrun_linear_fedadam": METHODS["fedadam"]}
# The linear family fitted to its optimum (pipeline.training.linear_fit): full-batch penalised Cox (ridge or elastic
# net, train.linear_l1_ratio; auto: the mix chosen with the penalty), penalty by K-fold
# cross-validated partial likelihood on each centre's training + validation patients (federated CV for the
# federated rows; no validation split needed), then pooled (site-stratified, or not), FedSGD (summed site gradients,
# server L-BFGS), or FedAvg / FedAdam (LCV_ROUNDS rounds of LCV_LOCAL_ITER local L-BFGS iterations, a-priori settings)
# at the penalty federated CV chose
LCV_ROUNDS, LCV_LOCAL_ITER, LCV_SERVER_LR = 50, 5, 0.05
METHODS |= {
    "lcv_pooled": ["federated.enabled=false"],
    "lcv_pooled_unstratified": ["federated.enabled=false", "train.stratify=false"],
    "lcv_fedsgd": [],
    "lcv_fedavg": [],
    "lcv_fedadam": [],
    "coxnet_inrun": [],  # the centralised Coxnet every run reports (alpha by CV on training + validation patients)
}
_PENALTY = (0.01, 1.0, 10.0)  # AdamW weight decay: ~none, moderate, strong (|w| <~ 1 / weight_decay)
CANDIDATES: dict[str, list[list[str]]] = {
    "fedsgd": [[f"federated.server_lr={lr}"] for lr in (0.1, 0.3, 1.0)],
    "fedadam": [[f"federated.server_lr={lr}"] for lr in (0.01, 0.05)],
    "linear_pooled": [[f"train.lr={lr}", f"train.weight_decay={wd}"] for lr in (0.003, 0.01, 0.03) for wd in _PENALTY],
    "linear_fedavg": [[f"train.lr={lr}", f"train.weight_decay={wd}"] for lr in (0.003, 0.01, 0.03) for wd in _PENALTY],
    "linear_fedadam": [
        ["train.lr=0.01", f"federated.server_lr={lr}", f"train.weight_decay={wd}"]
        for lr in (0.01, 0.05, 0.1)
        for wd in _PENALTY
    ],
}


def _cindex(data, idx: np.ndarray, model) -> float:
    from lifelines.utils import concordance_index

    from pipeline.training.predict import predict

    lh = predict(model, data, idx).log_hz
    return float(concordance_index(data.time[idx], -lh, data.event[idx]))


_FEDCV: dict[int, dict] = {}  # per cohort (seed): the federated CV fit, shared by the lcv_fed* rows


def linear_cv(method: str, data, cfg) -> dict:
    """The ``lcv_*`` methods: one record (test and CV C-index, chosen penalty, rounds, seconds)."""
    from pipeline.federated.linear_sites import fit_fedavg, fit_federated_cv, site_parties
    from pipeline.training.linear_fit import fit_linear_centralised
    from pipeline.training.module import new_model

    t0 = time.perf_counter()
    c = cfg.with_overrides(["model.family=linear"])
    idx = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    model = new_model(data, c)
    if method.startswith("lcv_pooled"):
        fit = fit_linear_centralised(model, data, idx, c)["linear_fit"]
    else:
        if id(data) not in _FEDCV:
            _FEDCV[id(data)] = {**fit_federated_cv(model, data, idx, c), "beta": model.coefficients().clone()}
        fit = _FEDCV[id(data)]
        model.set_coefficients(fit["beta"])
        if method in ("lcv_fedavg", "lcv_fedadam"):
            parties, _ = site_parties(model, data, idx, c)
            beta = fit_fedavg(parties, fit["penalty"], LCV_ROUNDS, LCV_LOCAL_ITER, method[4:], LCV_SERVER_LR)
            model.set_coefficients(torch.from_numpy(beta))
    te = data.splits["test"]
    return {"test": _cindex(data, te, model), "val": fit["cv_cindex"], "penalty": fit["penalty"],
            "l1_ratio": fit["l1_ratio"], "rounds": fit["rounds"], "seconds": time.perf_counter() - t0}  # fmt: skip


def train_one(method: str, data, cfg) -> list[dict]:
    """Train ``method``; one record per model (``sites``: one per centre) with val/test C-index and costs."""
    from pipeline.federated.embedded import run_federated
    from pipeline.training.module import fit_local

    te, va = data.splits["test"], data.splits["val"]
    if method == "sites":
        tr_s, va_s = data.subset_sites(data.splits["train"]), data.subset_sites(va)
        out = []
        for s in data.sites:
            module, _ = fit_local(data, cfg, train_idx=tr_s[s], val_idx=va_s[s])
            out.append({"site": s, "test": _cindex(data, te, module.model), "val": _cindex(data, va, module.model)})
        return out
    if method.startswith("lcv_"):
        return [linear_cv(method, data, cfg)]
    if method == "coxnet_inrun":
        from pipeline.outputs.baselines import fit_baselines
        from pipeline.outputs.scoring import BaselineSettings

        b = fit_baselines(data, None, BaselineSettings(n_boot=0))["baselines"]["clinical"]  # type: ignore[index]
        return [{"test": b["cindex"], "val": b.get("cv_cindex", float("nan"))}]
    t0 = time.perf_counter()
    if method.startswith("inrun_"):
        from pipeline.outputs.federated_linear import fit_federated_linear
        from pipeline.outputs.scoring import BaselineSettings

        fl = fit_federated_linear(data, cfg, settings=BaselineSettings(n_boot=0))  # Harrell C = lifelines' here
        return [{"test": fl["cindex"], "val": fl["val_cindex"], "weight_decay": fl["weight_decay"],
                 "seconds": time.perf_counter() - t0}]  # fmt: skip
    if not cfg.federated.enabled:  # pooled (centralised) training, either family
        module, _ = fit_local(data, cfg)
        model, secs = module.model, time.perf_counter() - t0
        return [{"test": _cindex(data, te, model), "val": _cindex(data, va, model), "seconds_per_epoch":
                 secs / cfg.train.epochs}]  # fmt: skip
    model, info = run_federated(data, cfg)
    h = info["history"]
    sent = [np.mean(list(r["bytes_sent_per_site"].values())) for r in h if r.get("bytes_sent_per_site")]
    rec = {
        "test": _cindex(data, te, model),
        "val": _cindex(data, va, model),
        "best_round": info["best_round"],
        "seconds_per_round": float(np.mean([r["seconds"] for r in h])),
        "bytes_sent_per_site_per_round": float(np.mean(sent)) if sent else None,
        "update_bytes": h[-1].get("update_bytes"),
        "seconds_per_epoch": (time.perf_counter() - t0) / (cfg.federated.rounds * cfg.federated.local_epochs),
    }
    if "privacy" in info:
        rec["epsilon"], rec["delta"] = info["privacy"]["epsilon"], info["privacy"]["delta"]
    return [rec]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with brca.csv and train_test_split.csv")
    ap.add_argument("--out", type=Path, default=Path("runs/tcga_brca"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tune", nargs="*", default=[], choices=list(CANDIDATES), help="pick settings on validation")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides for every run")
    ap.add_argument("--dp-epsilon", type=float, default=None,
                    help="DP methods: the noise multiplier that gives this epsilon at federated.dp_delta after the "
                    "run's rounds (Opacus RDP accountant, every site every round)")  # fmt: skip
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    from data_specs import load_cohort, resolve_config
    from pipeline.training.data import load_run_data

    def config(method: str, seed: int, extra: list[str]):
        ov = [*COMMON, *METHODS[method], *extra, *args.overrides, f"train.seed={seed}"]
        cfg = resolve_config(None, ov, out=args.out / "scratch")
        if args.dp_epsilon is not None and cfg.federated.dp_noise > 0:
            from opacus.accountants.utils import get_noise_multiplier

            fc = cfg.federated
            sigma = get_noise_multiplier(target_epsilon=args.dp_epsilon, target_delta=fc.dp_delta, sample_rate=1.0,
                                         steps=fc.rounds, accountant="rdp")  # fmt: skip
            cfg = cfg.with_overrides([f"federated.dp_noise={sigma}"])
        return cfg

    chosen: dict[str, list[str]] = {m: [] for m in args.methods}
    specs = {seed: build_cohort(args.data, args.out / f"cohort_seed{seed}", seed) for seed in args.seeds}
    datasets: dict[tuple[int, bool], object] = {}

    def dataset(seed: int, cfg):
        """The seed's cohort prepared as a run with ``cfg`` prepares it: pooled statistics for a pooled run, the
        sites' summaries (cells under ``federated.min_count`` suppressed) for a federated one."""
        key = (seed, bool(cfg.federated.enabled))
        if key not in datasets:
            datasets[key] = load_run_data(load_cohort(specs[seed]), cfg)
        return datasets[key]

    for m in args.tune:
        seed = args.seeds[0]
        scores = []
        for cand in CANDIDATES[m]:
            c = config(m, seed, cand)
            v = train_one(m, dataset(seed, c), c)[0]["val"]
            scores.append(v)
            print(f"tune {m} {' '.join(cand)}: validation C-index {v:.3f} (seed {seed})", flush=True)
        best = CANDIDATES[m][int(np.argmax(scores))]
        for dep in [x for x in chosen if x == m or x.startswith(m + "_")]:
            chosen[dep] = best
        print(f"tune {m}: chose {' '.join(best)}", flush=True)

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for m in args.methods:
            c = config(m, seed, chosen.get(m, []))
            for rec in train_one(m, dataset(seed, c), c):
                results[m].append({"seed": seed, **rec})
                site = f" {rec['site']}" if "site" in rec else ""
                mix = f" l1_ratio {rec['l1_ratio']:g} penalty {rec['penalty']:.3g}" if "l1_ratio" in rec else ""
                print(f"seed {seed} {m}{site}: test {rec['test']:.3f} val {rec['val']:.3f}{mix}", flush=True)
    summary = {}
    for m, recs in results.items():
        groups = {}
        for r in recs:
            groups.setdefault(r.get("site", m), []).append(r)
        for name, rs in groups.items():
            t = [r["test"] for r in rs]
            s = {"test_mean": float(np.mean(t)), "test_sd": float(np.std(t, ddof=1)) if len(t) > 1 else 0.0,
                 "runs": t, "settings": [*METHODS[m], *chosen.get(m, [])]}  # fmt: skip
            for k in ("seconds_per_round", "bytes_sent_per_site_per_round", "update_bytes", "seconds_per_epoch",
                      "epsilon", "penalty", "l1_ratio", "rounds", "seconds"):  # fmt: skip
                vals = [r[k] for r in rs if r.get(k) is not None]
                if vals:
                    s[k] = float(np.mean(vals))
            summary[name if m != "sites" else f"alone:{name}"] = s
    for name, s in summary.items():
        extra = " ".join(
            f"{k}={s[k]:.4g}"
            for k in (
                "seconds_per_round",
                "bytes_sent_per_site_per_round",
                "epsilon",
                "penalty",
                "l1_ratio",
                "rounds",
                "seconds",
            )
            if k in s
        )
        print(f"{name:18s}: {s['test_mean']:.3f} +- {s['test_sd']:.3f} over {len(s['runs'])} seeds {extra}")
    if "pooled" in summary and "fedavg" in summary:
        r = summary["fedavg"]["seconds_per_epoch"] / summary["pooled"]["seconds_per_epoch"]
        print(f"embedded FedAvg vs centralised, wall time per epoch of data: {r:.2f}x")
        summary["embedded_vs_centralised_time_per_epoch"] = {"ratio": r}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "federated_summary.json", {"common": COMMON, "results": summary})


if __name__ == "__main__":
    main()
