"""The ``histofuse`` command line.

    histofuse validate COHORT                  check a cohort spec, print a summary or every problem
    histofuse extract  COHORT [--out DIR]      slides -> features.h5 (resumable)
    histofuse train    COHORT [--out DIR]      federated (default) or --centralised training -> model.pt
    histofuse predict  COHORT --model M        risk_scores.csv
    histofuse evaluate RISK_CSV                metrics.json + Kaplan-Meier plot
    histofuse attribute COHORT --model M       tile attention + heatmaps, gene integrated gradients
    histofuse report   RUN_DIR                 report.html
    histofuse run      COHORT                  every stage above, in order
    histofuse demo     [--out DIR]             build the demo cohort and run everything on it
    histofuse cv       COHORT --folds K        site-stratified K-fold cross-validation (C-index mean +- sd)

Every command takes ``--config FILE.yaml`` and repeated ``--set section.key=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("histofuse")


def _common(p: argparse.ArgumentParser, out_default: str | None = "runs/latest") -> None:
    p.add_argument("--config", type=Path, help="run config YAML (defaults <- this file <- --set)")
    _overrides(p, "override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: {out_default})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _overrides(p: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` flag, collected into ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _model_overrides(p: argparse.ArgumentParser, example: str) -> None:
    _overrides(p, f"override the model's saved evaluate/attribute settings, e.g. --set {example} (repeatable)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="histofuse",
        description="Federated multimodal survival models and biomarkers "
        "from whole-slide images, gene expression and clinical data.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate", help="validate a cohort spec and summarise it")
    p.add_argument("cohort", type=Path)
    p.add_argument("-v", "--verbose", action="store_true")
    for name, hlp in (
        ("extract", "slides -> tile features (one .h5 per slide); COHORT may be a folder of slides"),
        ("train", "train the survival model (federated across sites by default)"),
        ("run", "extract, train, predict, evaluate, attribute and report"),
    ):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("cohort", type=Path)
        _common(p)
        if name == "extract":
            p.add_argument("--shard", metavar="K/N", help="process the K-th of N parts of the cohort (1 <= K <= N)")
            p.add_argument("--workers", type=int, metavar="N", help="tile-reading worker processes per slide")
            p.add_argument("--retry-failed", action="store_true", default=None, help="retry slides that failed before")
            p.add_argument("--slide-mpp", type=float, metavar="UM", help="microns per pixel for slides without it")
            p.add_argument("--procs", type=int, default=1, metavar="N", help="N processes, one shard (and GPU) each")
        if name in ("train", "run"):
            g = p.add_mutually_exclusive_group()
            g.add_argument(
                "--federated",
                dest="federated",
                action="store_true",
                default=None,
                help="federated training across the cohort's sites (default)",
            )
            g.add_argument(
                "--centralised",
                dest="federated",
                action="store_false",
                help="pool all training patients in one place (a reference, not for real hospitals)",
            )
        if name == "train":
            p.add_argument(
                "--strategy",
                choices=("fedsgd", "fedavg", "fedprox", "fedadam", "fedyogi"),
                default=None,
                help="federated strategy (same as --set federated.strategy=NAME; default fedavg)",
            )
            p.add_argument(
                "--resume",
                action="store_true",
                help="continue a killed federated run after its last finished round (DIR/federated/server_state.pt)",
            )
    for name, hlp in (
        ("predict", "risk scores for a cohort from a trained model"),
        ("attribute", "tile and gene attributions for a cohort from a trained model"),
    ):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("cohort", type=Path)
        p.add_argument("--model", type=Path, required=True, help="model.pt written by `histofuse train`")
        p.add_argument("--out", type=Path, default=None, help="output folder (default: the model's folder)")
        p.add_argument(
            "--features",
            type=Path,
            default=None,
            help="features folder (default: extracted under --out with the model's encoder settings)",
        )
        if name == "attribute":
            p.add_argument("--split", default="test", help="which patients: train, val, test, predict (default test)")
        _model_overrides(p, "attribute.max_heatmaps=10" if name == "attribute" else "evaluate.risk_groups=tertiles")
        p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("evaluate", help="C-index and Kaplan-Meier from risk_scores.csv")
    p.add_argument("risk_scores", type=Path)
    p.add_argument("--split", default="test", help="train, val, test, predict or all (default test)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: beside risk_scores.csv)")
    _model_overrides(p, "evaluate.bootstrap=1000")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("report", help="assemble report.html for a run folder")
    p.add_argument("run_dir", type=Path)
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("cv", help="cross-validation by patient, stratified by site and event (seeded)")
    p.add_argument("cohort", type=Path)
    _common(p, "runs/cv")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument(
        "--federated",
        dest="federated",
        action="store_true",
        default=False,
        help="train each fold federated across the sites (default: centralised)",
    )
    p = sub.add_parser("demo", help="build the demo cohort (real tissue, planted signals) and run every stage")
    _common(p, "runs/demo")
    p.add_argument("--build-only", action="store_true", help="only build the demo cohort")
    p.add_argument("--patients", type=int, default=120, help="number of demo patients (default 120)")
    p.add_argument("--seed", type=int, default=0)
    return ap


def _config(args: argparse.Namespace, cohort: Path | None, out_default: str):
    from data_specs.config import resolve_config

    ov = list(args.overrides)
    if getattr(args, "federated", None) is not None:
        ov.append(f"federated.enabled={str(args.federated).lower()}")
    if getattr(args, "strategy", None) is not None:
        ov.append(f"federated.strategy={args.strategy}")
    for flag, key in (("shard", "shard"), ("workers", "num_workers"), ("retry_failed", "retry_failed")):
        if getattr(args, flag, None) is not None:
            ov.append(f"extract.{key}={str(getattr(args, flag)).lower()}")
    if getattr(args, "slide_mpp", None) is not None:
        ov.append(f"extract.slide_mpp={args.slide_mpp!r}")
    out = args.out
    if out is None:
        import yaml

        in_yaml = (
            (yaml.safe_load(args.config.read_text()) or {}).get("out")
            if args.config and args.config.is_file()
            else None
        )
        out = Path(in_yaml) if in_yaml else Path(out_default)
    return resolve_config(args.config, ov, cohort=cohort, out=out)


def _model_extract_cfg(model_path: Path, out: Path):
    import torch

    from data_specs.config import RunConfig

    b = torch.load(model_path, map_location="cpu", weights_only=False)
    return RunConfig.model_validate({**b["config"], "out": str(out)})


def _features_for(cohort, model: Path, out: Path, given: Path | None) -> Path | None:
    from pipeline.slides.features import features_dir
    from pipeline.stages import stage_extract

    if not any(p.slides for p in cohort.patients):
        return None
    if given is not None:
        return given
    cfg = _model_extract_cfg(model, out)
    stage_extract(cohort, cfg)  # no-op for slides already done with the same settings
    return features_dir(out, cfg.extract)


def run_all(cohort_path: Path, cfg, title: str) -> Path:
    from data_specs.cohort import load_cohort
    from pipeline.outputs.evaluate import stage_evaluate
    from pipeline.outputs.report import build_report
    from pipeline.stages import stage_attribute, stage_extract, stage_predict, stage_train
    from pipeline.training.data import load_run_data

    cohort = load_cohort(cohort_path)
    out = cfg.out
    cfg.save(out / "config.yaml")
    t0 = time.perf_counter()
    fdir = stage_extract(cohort, cfg)
    log.info("extract: %.0f s", time.perf_counter() - t0)
    t1 = time.perf_counter()
    data = load_run_data(cohort, cfg)  # built once, shared by train, predict and attribute
    model = stage_train(cohort, cfg, data=data)
    log.info("train: %.0f s", time.perf_counter() - t1)
    risk = stage_predict(model, cohort, out, fdir, data=data)
    ev = [f"evaluate.{k}={json.dumps(v)}" for k, v in cfg.to_dict()["evaluate"].items()]
    m = stage_evaluate(risk, out, "test", ev)
    t2 = time.perf_counter()
    stage_attribute(model, cohort, out, fdir, "test", data=data)
    log.info("attribute: %.0f s", time.perf_counter() - t2)
    rep = build_report(out, title)
    c = m["pooled"]["cindex"]
    print(f"test C-index (pooled, {m['pooled']['n']} patients): {c:.3f}")
    p = m["pooled"]
    ci = p.get("cindex_ci") or [float("nan")] * 2
    print(f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]; Uno C {p['uno_cindex']:.3f}; IBS {p['ibs']:.3f}; ", end="")
    print(f"log-rank p {p['logrank_p']:.3g}")
    for s, v in m["per_site"].items():
        print(f"  {s}: {v['cindex']:.3f} (n={v['n']}, events={v['events']})")
    print(f"outputs in {out}/: model.pt, risk_scores.csv, metrics.json, attributions/, report.html")
    print(f"report: {rep}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "numexpr", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from data_specs.cohort import CohortError, load_cohort
    from data_specs.config import ConfigError
    from pipeline.slides.reader import SlideError

    try:
        if args.cmd == "validate":
            print(load_cohort(args.cohort).summary())
        elif args.cmd == "extract":
            from pipeline.stages import stage_extract

            cfg = _config(args, args.cohort, "runs/latest")
            shard = cfg.extract.shard  # shards may share one output folder: each keeps its own config copy
            cfg.save(cfg.out / ("config.yaml" if not shard else f"config.shard-{shard.replace('/', '-of-')}.yaml"))
            if args.procs > 1:  # one process per shard (and per GPU when there are enough)
                from pipeline.slides.extract import extract_in_processes, without_option
                from pipeline.slides.features import features_dir

                if args.shard:
                    raise ValueError("--procs and --shard cannot be combined: --procs N runs shards 1/N..N/N")
                sub = without_option(list(sys.argv[1:] if argv is None else argv), "--procs")
                fdir = features_dir(cfg.out, cfg.extract)
                rc = extract_in_processes(sub, args.procs, fdir)
                print(f"features in {fdir} ({args.procs} processes; report: {fdir / 'extract_report.csv'})")
                return rc
            if args.cohort.is_dir():  # a folder of slides: no cohort spec needed
                from pipeline.slides.extract import extract_folder

                fdir = extract_folder(args.cohort, cfg.out, cfg.extract)
            else:
                fdir = stage_extract(load_cohort(args.cohort), cfg)
            print(f"features in {fdir}" if fdir else "the cohort has no slides: nothing to extract")
        elif args.cmd == "train":
            from pipeline.stages import stage_train

            cfg = _config(args, args.cohort, "runs/latest")
            cfg.save(cfg.out / "config.yaml")
            print(f"model: {stage_train(load_cohort(args.cohort), cfg, resume=args.resume)}")
        elif args.cmd in ("predict", "attribute"):
            from pipeline.stages import stage_attribute, stage_predict

            out = args.out or args.model.parent
            cohort = load_cohort(args.cohort)
            fdir = _features_for(cohort, args.model, out, args.features)
            if args.cmd == "predict":
                print(f"risk scores: {stage_predict(args.model, cohort, out, fdir, args.overrides)}")
            else:
                for k, v in stage_attribute(args.model, cohort, out, fdir, args.split, args.overrides).items():
                    print(f"{k}: {v}")
        elif args.cmd == "evaluate":
            from pipeline.outputs.evaluate import stage_evaluate

            m = stage_evaluate(args.risk_scores, args.out or args.risk_scores.parent, args.split, args.overrides)
            print(f"C-index ({args.split}, pooled): {m['pooled']['cindex']:.3f}; log-rank p {m['logrank_p']:.3g}")
        elif args.cmd == "report":
            from pipeline.outputs.report import build_report

            print(f"report: {build_report(args.run_dir)}")
        elif args.cmd == "run":
            run_all(args.cohort, _config(args, args.cohort, "runs/latest"), f"histofuse: {args.cohort.stem}")
        elif args.cmd == "cv":
            from pipeline.stages import stage_extract
            from pipeline.stages_cv import run_cv

            cfg = _config(args, args.cohort, "runs/cv")
            cfg.save(cfg.out / "config.yaml")
            cohort = load_cohort(args.cohort)
            stage_extract(cohort, cfg)  # no-op without slides or when features exist
            r = run_cv(cohort, cfg, args.folds)
            for f in r["folds"]:
                print(f"fold {f['fold']}: C-index {f['cindex']:.3f} (n={f['n_test']}, events={f['test_events']})")
            print(
                f"{r['k']}-fold {r['mode']} C-index {r['cindex_mean']:.3f} +- {r['cindex_sd']:.3f} "
                f"(Uno {r['uno_cindex_mean']:.3f} +- {r['uno_cindex_sd']:.3f}); results in {cfg.out}/cv_results.json"
            )
        elif args.cmd == "demo":
            from pipeline.cohorts.demo import DemoSize, build_demo

            cfg = _config(args, None, "runs/demo")
            t0 = time.perf_counter()
            spec = build_demo(cfg.out / "cohort", DemoSize(patients=args.patients), seed=args.seed)
            log.info("demo cohort: %s (%.0f s)", spec, time.perf_counter() - t0)
            if args.build_only:
                print(f"demo cohort: {spec}")
                return 0
            cfg = cfg.model_copy(update={"cohort": spec})
            run_all(spec, cfg, "histofuse demo")
            _demo_truth(cfg.out)
            print(f"total: {time.perf_counter() - t0:.0f} s")
    except CohortError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, SlideError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _demo_truth(out: Path) -> None:
    """Print how well the run recovered the demo's planted truth (and save it as truth_check.json)."""
    from pipeline.cohorts.demo_check import check_demo

    r = check_demo(out)
    print(f"oracle C-index on the same test patients: {r['oracle_test_cindex']:.3f}")
    if "planted_gene_ranks" in r:
        print(f"planted gene ranks (of {r['n_genes']}): {r['planted_gene_ranks']}")
    if "attention_tumour_vs_other" in r:
        a = r["attention_tumour_vs_other"]
        print(
            f"mean relative attention: tumour tiles {a['tumour']:.2f}, other tiles {a['other']:.2f}; AUC {a['auc']:.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
