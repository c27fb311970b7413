"""The ``histofuse`` command line.

    histofuse validate COHORT                  check a cohort spec, print a summary or every problem
    histofuse extract  COHORT [--out DIR]      slides -> features.h5 (resumable)
    histofuse train    COHORT [--out DIR]      federated (default) or --centralised training -> model.safetensors
    histofuse predict  COHORT --model M        risk_scores.csv
    histofuse evaluate RISK_CSV                metrics.json + Kaplan-Meier plot
    histofuse attribute COHORT --model M       tile attention + heatmaps, gene integrated gradients
    histofuse report   RUN_DIR                 report.html
    histofuse run      COHORT                  every stage above, in order
    histofuse demo     [--out DIR]             build the demo cohort and run everything on it
    histofuse cv       COHORT --folds K        site-stratified K-fold (or --leave-site-out) cross-validation
    histofuse config --print               the resolved config as YAML (defaults <- --config <- flags, --set)

Every command takes ``--config FILE.yaml`` and repeated ``--set section.key=value`` overrides; extract,
run and demo also take ``--encoder``, ``--mpp``/``--mag``, ``--tile-px``, ``--batch-size`` and ``--device``.
Without ``--out`` a run writes into a new folder ``runs/<command>-YYYYmmdd-HHMMSS``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from data_specs.artifacts import RunFiles
from pipeline.allocator import keep_freed_memory
from pipeline.cli_errors import EXTRAS, describe, expected_errors, setup_logging
from pipeline.cli_parser import TIMESTAMPED, build_parser, cohort_sources, config_from_args
from pipeline.files import write_text
from pipeline.openmp import passive_waits

if TYPE_CHECKING:
    from data_specs.cohort import Cohort
    from data_specs.config import RunConfig

log = logging.getLogger("histofuse")


def _model_extract_cfg(model_path: Path, out: Path, trust_pickle: bool = False):
    """The config the model was trained with (its extract settings), writing under ``out``."""
    from pipeline.training.bundle import read_card

    return read_card(model_path, trust_pickle).config.model_copy(update={"out": Path(out)})


def _features_for(cohort, model: Path, out: Path, given: Path | None, trust_pickle: bool = False) -> Path | None:
    from pipeline.slides.features import features_dir
    from pipeline.stages import stage_extract

    if not any(p.slides for p in cohort.patients):
        return None
    if given is not None:
        return given
    cfg = _model_extract_cfg(model, out, trust_pickle)
    stage_extract(cohort, cfg)  # no-op for slides already done with the same settings
    return features_dir(out, cfg.extract)


class UsageError(ValueError):
    """A request the CLI refuses before it writes anything (the message names the path or the reason)."""


def check_out(out: Path) -> None:
    """Refuse an output folder that is an existing file or cannot be written, before anything is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is an existing file, not a folder (choose a folder)")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {probe} is not writable (choose a folder you can write to)")


def check_cohort_events(cohort, path: Path) -> None:
    """Refuse, before any work, a cohort in which no patient has an event (all censored)."""
    if not any(p.event for p in cohort.patients):
        raise UsageError(f"{path}: no patient has an event (all {len(cohort.patients)} censored): "
                         "a survival model cannot be trained on it")  # fmt: skip


def _print_metrics(m: dict, out: Path, rep: Path) -> None:
    p = m["pooled"]
    print(f"test C-index (pooled, {p['n']} patients): {p['cindex']:.3f}")
    ci = p.get("cindex_ci") or [float("nan")] * 2
    print(f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]; Uno C {p['uno_cindex']:.3f}; IBS {p['ibs']:.3f}; ", end="")
    print(f"log-rank p {p['logrank_p']:.3g}")
    for s, v in m["per_site"].items():
        print(f"  {s}: {v['cindex']:.3f} (n={v['n']}, events={v['events']})")
    rf = RunFiles
    print(f"outputs in {out}/: {rf.MODEL}, {rf.RISK_SCORES}, {rf.METRICS}, {rf.ATTRIBUTIONS}/, {rf.REPORT}")
    print(f"report: {rep}")


def run_all(cohort_path: Path, cfg, title: str, sources: dict | None = None, features_in: Path | None = None,
            full: bool = True) -> Path:  # fmt: skip
    """Every stage on one cohort. Features are extracted into ``features_in`` (default ``cfg.out``); everything after
    is staged and moved over the previous run's outputs only when every stage has succeeded
    (:func:`pipeline.staging.staged_run`). ``full=False``: no attributions and no report (later seeds)."""
    from data_specs.cohort import load_cohort
    from pipeline.stages import check_trainable, stage_extract
    from pipeline.staging import staged_run
    from pipeline.training.data import load_run_data

    cohort = load_cohort(cohort_path, **(sources or {}))  # sources: --omics/--clinical/--time-unit
    out = cfg.out
    check_out(out)
    check_cohort_events(cohort, cohort_path)
    t0 = time.perf_counter()
    fdir = stage_extract(cohort, cfg.model_copy(update={"out": features_in or out}))
    log.info("extract: %.0f s", time.perf_counter() - t0)
    data = load_run_data(cohort, cfg, out=features_in)  # built once, shared by train, predict and attribute
    check_trainable(data, cohort_path)
    with staged_run(out) as stage:
        m, baseline_lines = _stages_after_extract(cohort, cfg, fdir, data, stage, title if full else None)
    _print_metrics(m, out, RunFiles(root=out).report)
    print("\n".join(baseline_lines))
    return out


def _stages_after_extract(cohort, cfg, fdir: Path | None, data, stage: Path, title: str | None) -> tuple[dict, list]:
    """Train, predict, evaluate, baselines, attribute and report (titled ``title``; None: neither), under ``stage``."""
    from pipeline.outputs.baselines import add_to_run, bundle_predict_fn  # centralised reference models
    from pipeline.outputs.evaluate import stage_evaluate
    from pipeline.outputs.report import build_report
    from pipeline.stages import stage_attribute, stage_predict, stage_train

    t1 = time.perf_counter()
    model = stage_train(cohort, cfg, data=data, stage=stage)
    log.info("train: %.0f s", time.perf_counter() - t1)
    risk = stage_predict(model, cohort, stage, fdir, data=data)
    m = stage_evaluate(risk, stage, "test", config=cfg)
    ev = cfg.evaluate  # a federated run also trains the linear family federated (federated_linear)
    baseline_lines = add_to_run(stage, data, bundle_predict_fn(model), ev.bootstrap, ev.seed, cfg=cfg)
    if title is None:
        return m, baseline_lines
    t2 = time.perf_counter()
    stage_attribute(model, cohort, stage, fdir, "test", data=data)
    log.info("attribute: %.0f s", time.perf_counter() - t2)
    build_report(stage, title)
    return m, baseline_lines


def cmd_validate(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The cohort summary, then the split training will use, per site (given cells kept, blanks assigned)."""
    from data_specs.cohort import load_cohort
    from data_specs.config import resolve_config
    from pipeline.cli_parser import flag_overrides
    from pipeline.training.splits import assign_splits, split_lines

    cohort = load_cohort(args.cohort, **cohort_sources(args))
    print(cohort.summary())
    t = resolve_config(args.config, [*args.overrides, *flag_overrides(args)]).train
    splits = assign_splits(cohort, t.val_fraction, t.test_fraction, t.seed, t.test_sites)
    n = {k: len(v) for k, v in splits.items()}
    print(f"split used for training (train.seed {t.seed}; train {n['train']}, val {n['val']}, test {n['test']}):")
    print("\n".join(split_lines(cohort, splits, t.test_sites)))
    return 0


def cmd_extract(args: argparse.Namespace, argv: list[str] | None) -> int:
    from data_specs.cohort import load_cohort
    from pipeline.stages import stage_extract

    if args.procs > 1 and args.shard:
        raise UsageError("--procs and --shard cannot be combined: --procs N runs shards 1/N..N/N")
    cfg = run_config(args, args.cohort)
    check_out(cfg.out)
    if args.cohort.is_dir() and cohort_sources(args):
        raise UsageError(f"{args.cohort}: --omics/--clinical/--time-unit need a cohort (patients.csv), not a folder")
    cohort = None if args.cohort.is_dir() else load_cohort(args.cohort, **cohort_sources(args))
    shard = cfg.extract.shard  # shards may share one output folder: each keeps its own config copy
    write_text(RunFiles(root=cfg.out).shard_config(shard), cfg.to_yaml())
    if args.procs > 1:  # one process per shard (and per GPU when there are enough)
        from pipeline.slides.extract import discover_slides
        from pipeline.slides.features import features_dir
        from pipeline.slides.parallel import extract_in_processes

        fdir = features_dir(cfg.out, cfg.extract)
        if cohort is None:
            slides, fallback, per_slide = discover_slides(args.cohort, exclude=cfg.out), None, None
        else:
            slides, fallback = [s for p in cohort.patients for s in p.slides], cohort.slide_mpp
            per_slide = cohort.slide_mpp_overrides()
        rc = extract_in_processes(slides, fdir, cfg.extract, args.procs, fallback, per_slide)
        from pipeline.slides.report import report_stem, run_outcome

        print(f"features in {fdir} ({args.procs} processes; report: {fdir / report_stem(None)}.csv)")
        status, line = run_outcome(fdir, report_stem(None))
        print(line)
        return max(rc, status)
    if cohort is None:  # a folder of slides: no cohort spec needed
        from pipeline.slides.extract import extract_folder

        fdir = extract_folder(args.cohort, cfg.out, cfg.extract)
    else:
        fdir = stage_extract(cohort, cfg)
    print(f"features in {fdir}" if fdir else "the cohort has no slides: nothing to extract")
    if fdir is None:
        return 0
    from pipeline.slides.report import parse_shard, report_stem, run_outcome

    status, line = run_outcome(fdir, report_stem(parse_shard(shard)))
    print(line)  # exit 1 when every slide failed
    return status


def run_config(args: argparse.Namespace, cohort: Path | None, out_default: str | None = None) -> RunConfig:
    """:func:`config_from_args`, logging the run folder when it is a new timestamped one (no ``--out``)."""
    cfg = config_from_args(args, cohort, out_default)
    if args.out is None:
        log.info("run folder: %s (choose one with --out)", cfg.out)
    return cfg


def _trainable_cohort(args: argparse.Namespace) -> tuple[RunConfig, Cohort]:
    """The config and cohort of a training command, refused (``UsageError``) before anything is written
    when ``--out`` cannot be written or no patient has an event."""
    from data_specs.cohort import load_cohort

    cfg = run_config(args, args.cohort)
    cohort = load_cohort(args.cohort, **cohort_sources(args))
    check_out(cfg.out)
    check_cohort_events(cohort, args.cohort)
    return cfg, cohort


def save_config(cfg: RunConfig) -> Path:
    """Write the run's resolved config as ``config.yaml`` in its folder."""
    return write_text(RunFiles(root=cfg.out).config, cfg.to_yaml())


def cmd_train(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pipeline.stages import check_trainable, stage_train
    from pipeline.training.data import load_run_data

    cfg, cohort = _trainable_cohort(args)
    data = load_run_data(cohort, cfg)
    check_trainable(data, args.cohort)
    # config, model and summary are staged: a failing train leaves an existing run's files alone
    print(f"model: {stage_train(cohort, cfg, data=data, resume=args.resume)}")
    return 0


def cmd_predict_or_attribute(args: argparse.Namespace, argv: list[str] | None) -> int:
    from data_specs.cohort import load_cohort
    from pipeline.stages import stage_attribute, stage_predict

    out = args.out or args.model.parent
    cohort = load_cohort(args.cohort, **cohort_sources(args))
    if not args.model.is_file():
        raise FileNotFoundError(2, "no such model file", str(args.model))
    check_out(out)
    trust = args.trust_pickle
    fdir = _features_for(cohort, args.model, out, args.features, trust)
    if args.cmd == "predict":
        print(f"risk scores: {stage_predict(args.model, cohort, out, fdir, args.overrides, trust_pickle=trust)}")
    else:
        written = stage_attribute(args.model, cohort, out, fdir, args.split, args.overrides, trust_pickle=trust)
        for k, v in written.items():
            print(f"{k}: {v}")
    return 0


def cmd_evaluate(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pipeline.outputs.evaluate import stage_evaluate

    out = args.out or args.risk_scores.parent
    check_out(out)
    m = stage_evaluate(args.risk_scores, out, args.split, args.overrides)
    print(f"C-index ({args.split}, pooled): {m['pooled']['cindex']:.3f}; log-rank p {m['logrank_p']:.3g}")
    return 0


def cmd_report(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pipeline.outputs.report import build_report

    print(f"report: {build_report(args.run_dir)}")
    return 0


def cmd_run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """One run, or ``--seeds N`` runs in ``DIR/seed-<k>/`` (features extracted once into ``DIR``) and their spread."""
    from pipeline.repeats import repeat_over_seeds

    cfg, title, src = run_config(args, args.cohort), f"histofuse: {args.cohort.stem}", cohort_sources(args)
    if args.seeds == 1:
        run_all(args.cohort, cfg, title, src)
        return 0
    one = lambda c, full: run_all(args.cohort, c, f"{title} ({c.out.name})", src, cfg.out, full)  # noqa: E731
    print("\n".join(repeat_over_seeds(cfg, args.seeds, one)[1]))
    return 0


def cmd_cv(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pipeline.crossval import CVPlan, run_cv
    from pipeline.outputs.cv import cv_lines
    from pipeline.stages import stage_extract

    cfg, cohort = _trainable_cohort(args)
    stage_extract(cohort, cfg)  # no-op without slides or when features exist; run_cv stages config.yaml
    plan = CVPlan(args.folds, args.leave_site_out, args.seeds, args.modality_ablation)
    r = run_cv(cohort, cfg, plan)
    print("\n".join(cv_lines(r.runs, r.summary)))
    print(f"results in {RunFiles(root=cfg.out).cv_summary} (per seed, every fold: cv_results.json)")
    return 0


def cmd_demo(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pipeline.cohorts.demo import build_demo, demo_size

    cfg = run_config(args, None, "runs/demo")
    check_out(cfg.out)
    t0 = time.perf_counter()
    size, cohort_dir = demo_size(args.patients, args.morphology), RunFiles(root=cfg.out).demo_cohort
    spec = build_demo(cohort_dir, size, seed=args.seed, morphology=args.morphology)
    log.info("demo cohort: %s (%.0f s)", spec, time.perf_counter() - t0)
    if args.build_only:
        print(f"demo cohort: {spec}")
        return 0
    cfg = cfg.model_copy(update={"cohort": spec})
    run_all(spec, cfg, "histofuse demo")
    _demo_truth(cfg.out)
    print(f"total: {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_config(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Print the resolved config; ``out`` only when given (each command otherwise makes a timestamped folder)."""
    import yaml

    cfg = config_from_args(args, None, "-")
    d = cfg.to_dict()
    if args.out is None and d.get("out") == "-":
        del d["out"]
        print(f"# out: not set (each command writes a new {TIMESTAMPED} unless --out is given)")
    print(yaml.safe_dump(d, sort_keys=False), end="")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str] | None], int]] = {
    "validate": cmd_validate,
    "extract": cmd_extract,
    "train": cmd_train,
    "predict": cmd_predict_or_attribute,
    "attribute": cmd_predict_or_attribute,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "run": cmd_run,
    "cv": cmd_cv,
    "demo": cmd_demo,
    "config": cmd_config,
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command; an expected failure is one line ``error: ...`` and exit 2
    (``-v`` prints its traceback first)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    keep_freed_memory()
    if args.cmd == "extract":
        passive_waits()  # before torch loads: encoder threads give the reader its core (pipeline/openmp.py)
    try:
        return COMMANDS[args.cmd](args, argv)
    except ModuleNotFoundError as e:
        if e.name not in EXTRAS:
            raise
        if args.verbose:
            traceback.print_exception(e, file=sys.stderr)
        extra = EXTRAS[e.name]
        print(f"error: this needs the optional package {e.name}: pip install 'histofuse[{extra}]'", file=sys.stderr)
        return 2
    except expected_errors() as e:
        if args.verbose:
            traceback.print_exception(e, file=sys.stderr)
        print(f"error: {describe(e, args)}", file=sys.stderr)
        return 2


def _demo_truth(out: Path) -> None:
    """Print how well the run recovered the demo's planted truth (and save it, see ``RunFiles.truth_check``)."""
    from pipeline.cohorts.demo_check import check_demo, summary_lines

    print("\n".join(summary_lines(check_demo(out))))


if __name__ == "__main__":
    sys.exit(main())
