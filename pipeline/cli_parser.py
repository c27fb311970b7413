"""The ``histofuse`` command line's arguments: the parser of every command, and the run config they resolve to.

:func:`build_parser` defines the flags; :func:`config_from_args` turns a command's flags into a
:class:`~data_specs.config.RunConfig` (defaults <- ``--config`` YAML <- flags and ``--set`` overrides).
Dispatching the commands is :mod:`pipeline.cli`'s job.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

COHORT_HELP = (
    "cohort spec (YAML), or a patients.csv with patient_id, site, time, event (and slide paths); "
    "`extract` also takes a folder of slides"
)
TIMESTAMPED = "runs/<command>-YYYYmmdd-HHMMSS"  # the default --out of a run (a new folder each time)


def timestamped_out(command: str, root: Path = Path("runs"), now: float | None = None) -> Path:
    """A new run folder ``root/<command>-YYYYmmdd-HHMMSS`` (``-2``, ``-3`` ... when it already exists)."""
    base = root / f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _batch_size(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{v}': expected a positive integer or 'auto'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"'{v}': expected a positive integer or 'auto'")
    return n


def _extract_flags(p: argparse.ArgumentParser) -> None:
    """TRIDENT/CLAM-style tile-encoding flags; each is the same as its ``--set extract.KEY=VALUE``."""
    g = p.add_argument_group("tile encoding (same as --set extract.KEY=VALUE)")
    g.add_argument("--encoder", help="tile encoder: a models.encoders name, a timm name or hf-hub:ID "
                   "(extract.encoder; default efficientnet_lite0_imagenet)")  # fmt: skip
    m = g.add_mutually_exclusive_group()
    m.add_argument("--mpp", type=float, metavar="UM", help="target microns per pixel of the tiles "
                   "(extract.target_mpp; default 0.5, about 20x)")  # fmt: skip
    m.add_argument("--mag", type=float, metavar="X", help="target magnification, as 10/X microns per pixel "
                   "(20 -> 0.5 um/px; same as --mpp)")  # fmt: skip
    g.add_argument("--tile-px", type=int, metavar="PX", help="tile side in pixels at the target mpp "
                   "(extract.tile_px; default 224)")  # fmt: skip
    g.add_argument("--batch-size", type=_batch_size, metavar="N", help="tiles per encoder batch, or 'auto' "
                   "(extract.batch_size; default 32 on CPU, 64 on a GPU)")  # fmt: skip
    g.add_argument("--device", help="device for tile encoding: auto, cpu, cuda, cuda:1 ... (extract.device)")


def _source_flags(p: argparse.ArgumentParser) -> None:
    """``--omics``, ``--clinical`` and ``--time-unit``: a CSV manifest's other modalities without a YAML spec."""
    g = p.add_argument_group("cohort sources without a YAML spec (on a YAML they replace its entries)")
    g.add_argument("--omics", type=Path, metavar="FILE", help="gene expression: .h5ad (patients as obs) or "
                   "CSV/TSV (first column the ids; patients or genes as rows, detected from the ids)")  # fmt: skip
    g.add_argument("--clinical", type=Path, metavar="FILE", help="clinical covariates CSV: patient_id and one "
                   "column per covariate (non-numeric columns are one-hot encoded)")  # fmt: skip
    g.add_argument("--time-unit", metavar="UNIT", help="unit of the manifest's time column: days (default), "
                   "months or years")  # fmt: skip


def cohort_sources(args: argparse.Namespace) -> dict:
    """The ``load_cohort`` keyword arguments given by ``--omics``, ``--clinical`` and ``--time-unit``."""
    keys = ("omics", "clinical", "time_unit")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _common(p: argparse.ArgumentParser, out_default: str | None = TIMESTAMPED) -> None:
    p.add_argument("--config", type=Path, help="run config YAML (defaults <- this file <- --set)")
    _overrides(p, "override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: {out_default})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")


def _overrides(p: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` flag, collected into ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _model_overrides(p: argparse.ArgumentParser, example: str) -> None:
    _overrides(p, f"override the model's saved evaluate/attribute settings, e.g. --set {example} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="histofuse",
        description="Federated multimodal survival models and biomarkers "
        "from whole-slide images, gene expression and clinical data.",
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate", help="validate a cohort spec and summarise it")
    p.add_argument("cohort", type=Path, help=COHORT_HELP)
    _source_flags(p)
    p.add_argument("--config", type=Path, help="run config YAML whose train split settings the summary shows")
    _overrides(p, "override a config value, e.g. --set train.seed=3 (repeatable)")
    _test_sites_flag(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")
    _extract_parser(sub)
    _train_parser(sub, "train", "train the survival model (federated across sites by default)")
    _train_parser(sub, "run", "extract, train, predict, evaluate, attribute and report")
    _model_parser(sub, "predict", "risk scores for a cohort from a trained model", "evaluate.risk_groups=tertiles")
    _model_parser(sub, "attribute", "tile and gene attributions for a cohort from a trained model",
                  "attribute.max_heatmaps=10")  # fmt: skip
    p = sub.add_parser("evaluate", help="C-index and Kaplan-Meier from risk_scores.csv")
    p.add_argument("risk_scores", type=Path)
    p.add_argument("--split", default="test", help="train, val, test, predict or all (default test)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: beside risk_scores.csv)")
    _model_overrides(p, "evaluate.bootstrap=1000")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")
    p = sub.add_parser("report", help="assemble report.html for a run folder")
    p.add_argument("run_dir", type=Path)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")
    _cv_parser(sub)
    _config_parser(sub)
    p = sub.add_parser("demo", help="build the demo cohort (real tissue, planted signals) and run every stage")
    _common(p, "runs/demo")
    _extract_flags(p)
    p.add_argument("--build-only", action="store_true", help="only build the demo cohort")
    p.add_argument("--patients", type=int, default=120, help="number of demo patients (default 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--morphology", choices=("fraction", "local"), default="fraction",
                   help="where the slides' prognostic signal lives: the tumour fraction (default) or a few carrier "
                   "tiles in some slides (attention must find them; the truth files name them)")  # fmt: skip
    return ap


def _extract_parser(sub) -> None:
    p = sub.add_parser("extract", help="slides -> tile features (one .h5 per slide); COHORT may be a folder of slides")
    p.add_argument("cohort", type=Path, help=COHORT_HELP)
    _common(p)
    _source_flags(p)
    _extract_flags(p)
    p.add_argument("--shard", metavar="K/N", help="process the K-th of N parts of the cohort (1 <= K <= N)")
    p.add_argument("--workers", type=int, metavar="N", help="tile-reading worker processes per slide")
    p.add_argument("--retry-failed", action="store_true", default=None, help="retry slides that failed before")
    p.add_argument("--slide-mpp", type=float, metavar="UM", help="microns per pixel for slides without it")
    p.add_argument("--procs", type=int, default=1, metavar="N", help="N processes, one shard (and GPU) each")


def _train_parser(sub, name: str, hlp: str) -> None:
    p = sub.add_parser(name, help=hlp)
    p.add_argument("cohort", type=Path, help=COHORT_HELP)
    _common(p)
    _source_flags(p)
    if name == "run":
        _extract_flags(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--federated", dest="federated", action="store_true", default=None,
                   help="federated training across the cohort's sites (default)")  # fmt: skip
    g.add_argument("--centralised", dest="federated", action="store_false",
                   help="pool all training patients in one place (a reference, not for real hospitals)")  # fmt: skip
    _test_sites_flag(p)
    if name == "run":
        _seeds_flag(p)
    if name == "train":
        p.add_argument("--strategy", choices=("fedsgd", "fedavg", "fedprox", "fedadam", "fedyogi"), default=None,
                       help="federated strategy (same as --set federated.strategy=NAME; default fedavg)")  # fmt: skip
        p.add_argument("--resume", action="store_true", help="continue a killed federated run after its last "
                       "finished round (DIR/federated/server_state.json)")  # fmt: skip


def _test_sites_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-sites", metavar="A,B", help="comma-separated sites held out as test only: never trained "
                   "on, not in the federation or its statistics (train.test_sites)")  # fmt: skip


def _seeds_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="repeat with seeds 0..N-1 (train.seed and "
                   "the split seed) and report mean +- sd of each metric (default 1)")  # fmt: skip


def parse_sites(v: str | None) -> list[str]:
    """``--test-sites A,B`` as a list of site names (blank entries dropped)."""
    return [s.strip() for s in (v or "").split(",") if s.strip()]


def _model_parser(sub, name: str, hlp: str, example: str) -> None:
    p = sub.add_parser(name, help=hlp)
    p.add_argument("cohort", type=Path, help=COHORT_HELP)
    _source_flags(p)
    p.add_argument("--model", type=Path, required=True, help="model.safetensors written by `histofuse train`")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a legacy pickled model.pt (unpickling runs its code: only your own files)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the model's folder)")
    p.add_argument("--features", type=Path, default=None, help="features folder "
                   "(default: extracted under --out with the model's encoder settings)")  # fmt: skip
    if name == "attribute":
        p.add_argument("--split", default="test", help="which patients: train, val, test, predict (default test)")
    _model_overrides(p, example)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")


def _cv_parser(sub) -> None:
    p = sub.add_parser("cv", help="cross-validation by patient, stratified by site and event (seeded)")
    p.add_argument("cohort", type=Path, help=COHORT_HELP)
    _common(p)
    _source_flags(p)
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument(
        "--leave-site-out",
        action="store_true",
        help="one fold per site: that site's patients are the "
        "test set, the other sites train and validate (how well the model transfers to a new hospital)",
    )
    _seeds_flag(p)
    p.add_argument(
        "--modality-ablation",
        action="store_true",
        help="also retrain each fold without each modality (C-index without slides/omics/clinical)",
    )
    p.add_argument("--federated", dest="federated", action="store_true", default=False,
                   help="train each fold federated across the sites (default: centralised)")  # fmt: skip


def _config_parser(sub) -> None:
    p = sub.add_parser("config", help="print the resolved run config (defaults <- --config <- flags and --set)")
    p.add_argument("--print", dest="print_config", action="store_true", required=True,
                   help="print the config as YAML (a starting point for --config FILE)")  # fmt: skip
    p.add_argument("--config", type=Path, help="run config YAML to resolve")
    _overrides(p, "override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="output folder to show (default: not set)")
    _extract_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")


def package_version() -> str:
    """The installed histofuse version (``unknown`` when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("histofuse")
    except PackageNotFoundError:
        return "unknown"


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides the command's flags stand for (put after the user's own ``--set``)."""
    ov = []
    if getattr(args, "federated", None) is not None:
        ov.append(f"federated.enabled={str(args.federated).lower()}")
    if getattr(args, "test_sites", None):
        ov.append(f"train.test_sites={json.dumps(parse_sites(args.test_sites))}")
    if getattr(args, "strategy", None) is not None:
        ov.append(f"federated.strategy={args.strategy}")
    for flag, key in (("shard", "shard"), ("workers", "num_workers"), ("retry_failed", "retry_failed")):
        if getattr(args, flag, None) is not None:
            ov.append(f"extract.{key}={str(getattr(args, flag)).lower()}")
    if getattr(args, "slide_mpp", None) is not None:
        ov.append(f"extract.slide_mpp={args.slide_mpp!r}")
    if getattr(args, "mag", None) is not None:
        if args.mag <= 0:
            raise ValueError(f"--mag {args.mag}: must be > 0 (e.g. 20 for 0.5 um/px)")
        ov.append(f"extract.target_mpp={10.0 / args.mag!r}")
    for flag, key in (("encoder", "encoder"), ("mpp", "target_mpp"), ("tile_px", "tile_px"),
                      ("batch_size", "batch_size"), ("device", "device")):  # fmt: skip
        if getattr(args, flag, None) is not None:
            ov.append(f"extract.{key}={getattr(args, flag)}")
    return ov


def config_from_args(args: argparse.Namespace, cohort: Path | None, out_default: str | Path | None = None):
    """The run config of a command: defaults <- ``--config`` <- ``--set`` <- flags. ``--out`` wins, then the
    YAML's ``out``, then ``out_default`` (None: a new :func:`timestamped_out` folder named after the command)."""
    from data_specs.config import resolve_config

    ov = [*args.overrides, *flag_overrides(args)]
    out = args.out
    if out is None:
        import yaml

        in_yaml = (
            (yaml.safe_load(args.config.read_text()) or {}).get("out")
            if args.config and args.config.is_file()
            else None
        )
        out = Path(in_yaml) if in_yaml else Path(out_default) if out_default else timestamped_out(args.cmd)
    return resolve_config(args.config, ov, cohort=cohort, out=out)
