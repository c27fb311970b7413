"""The report's model card, limitations and run metadata, read from a run folder's files.

``config.yaml`` (encoder, MIL, fusion, loss, federated settings, config digest), ``train_summary.json``
(centralised or federated, rounds, DP epsilon, the ``model.skip`` used and why), ``risk_scores.csv`` (patients
and events per site, time unit), ``metrics.json`` (the model against the linear baselines) and, where found beside
the run, one features ``.h5`` (what the encoder's weights were trained on). Missing files leave their lines out.
"""

from __future__ import annotations

import html
import json
import logging
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import yaml

from data_specs.artifacts import RunFiles

log = logging.getLogger(__name__)

TRAINED_ON = {
    "imagenet": "ImageNet natural photographs (not pathology)",
    "pathology": "histopathology tiles",
    "random": "nothing: random weights",
}


def _yaml(path: Path) -> dict:
    try:
        d = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, yaml.YAMLError) as e:
        log.warning("%s: not read (%s)", path, e)
        return {}
    return d if isinstance(d, dict) else {}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        log.warning("%s: not read (%s)", path, e)
        return {}


def features_attrs(root: Path) -> dict:
    """Attributes of the first features ``.h5`` under ``root/features`` or ``root/../features`` ({} if none)."""
    import h5py

    for base in (root / "features", root.parent / "features"):
        for p in sorted(base.glob("**/*.h5"))[:1] if base.is_dir() else []:
            try:
                with h5py.File(p, "r") as f:
                    return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            except OSError as e:
                log.warning("%s: not read (%s)", p, e)
    return {}


def config_digest(cfg: dict) -> str:
    """``RunConfig.digest()`` of the run's resolved config; ``–`` when it no longer validates."""
    from data_specs.config import RunConfig

    try:
        return RunConfig.model_validate(cfg).digest()
    except ValueError as e:
        log.warning("config.yaml does not validate as a RunConfig (%s): no digest", e)
        return "–"


def git_commit() -> str:
    """The source tree's git commit (``+dirty`` when changed), or ``–`` outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "–"
    return f"{sha}{'+dirty' if dirty else ''}" if sha else "–"


def cohort_name(cfg: dict) -> str:
    """The cohort spec's ``name`` (or its file name) from ``config.yaml``'s ``cohort``."""
    c = cfg.get("cohort")
    if not c:
        return "–"
    p = Path(str(c))
    spec = p if p.is_file() else p / "cohort.yaml"
    return str(_yaml(spec).get("name") or p.stem)


def _li(k: str, v: object) -> str:
    return f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"


def _sites(rf: RunFiles) -> str:
    if not rf.risk_scores.is_file():
        return "–"
    df = pd.read_csv(rf.risk_scores, usecols=lambda c: c in {"site", "event"})
    g = df.groupby("site").event.agg(["size", "sum"])
    return "; ".join(f"{s}: {int(r['size'])} patients, {int(r['sum'])} events" for s, r in g.iterrows())


def _training(info: dict, cfg: dict) -> str:
    if not info:
        return "–"
    if info.get("mode") != "federated":
        return f"centralised (all sites' patients pooled), {len(info.get('history', []))} epochs"
    fc = cfg.get("federated", {})
    hist = info.get("history", [])
    eps = [r["epsilon"] for r in hist if isinstance(r, dict) and "epsilon" in r]
    dp = (
        f"differential privacy epsilon {eps[-1]:.2f} (delta {fc.get('dp_delta')})" if eps else "no differential privacy"
    )
    sites = f"minimum {info['min_sites']} sites a round; {_drops(info)}" if "min_sites" in info else _drops(info)
    return (
        f"federated across sites, strategy {fc.get('strategy', '?')}, {len(hist) or fc.get('rounds')} rounds, {dp}; "
        f"{sites}"
    )


SKIPS = {
    "fitted": "the fitted linear family as a frozen offset, the network a gated residual on top",
    "linear": "a linear term trained with the network, the network a gated residual on top",
    "none": "none: the network alone",
}


def _skip(info: dict, mo: dict, tr: dict) -> str:
    """What ``model.skip`` the run used and why (``train_summary.json``'s ``model_skip``; else ``config.yaml``)."""
    if mo.get("family") == "linear":
        return "– (the linear family)"
    rec = info.get("model_skip") or {}
    used = str(rec.get("used") or mo.get("skip") or "–")
    text = f"{used}: {SKIPS[used]}" if used in SKIPS else used
    if rec.get("requested") == "auto":
        text += f" (auto: {rec.get('reason', '?')})"
    pen = rec.get("residual_penalty", tr.get("residual_penalty"))
    if used in ("fitted", "linear") and pen is not None:
        text += f"; residual penalty {pen:g}" if isinstance(pen, int | float) else f"; residual penalty {pen}"
    return text


def _drops(info: dict) -> str:
    """Which site was retried or dropped in which round (``train_summary.json``'s ``retried``/``dropped``)."""
    out = []
    for key, verb in (("dropped", "dropped"), ("retried", "retried")):
        events = info.get(key) or []
        if events:
            out.append(f"{verb}: " + ", ".join(f"{e.get('site')} (round {e.get('round')})" for e in events))
    return "; ".join(out) if out else "no site dropped or retried"


def model_card_html(rf: RunFiles) -> list[str]:
    """The model card: encoder and what it was trained on, MIL, fusion, loss, data, how it was trained."""
    cfg = _yaml(rf.config)
    info = _json(rf.train_summary)
    fa = features_attrs(rf.root)
    ex, mo, tr = cfg.get("extract", {}), cfg.get("model", {}), cfg.get("train", {})
    enc = fa.get("encoder") or ex.get("encoder", "–")
    kind = str(fa.get("feature_kind") or ("imagenet" if "imagenet" in str(enc) else "unknown"))
    items = [
        _li("tile encoder", f"{enc} (weights {fa.get('weights', ex.get('weights') or 'default')}), frozen"),
        _li("encoder trained on", TRAINED_ON.get(kind, kind)),
        _li("tiles", f"{ex.get('tile_px', '?')} px at {ex.get('target_mpp', '?')} microns per pixel"),
        _li("slide pooling (MIL)", mo.get("mil", "–")),
        _li("fusion of slides and omics", f"{mo.get('fusion', '–')} (omics encoder {mo.get('omics_encoder', '–')})"),
        _li("loss", {"cox": "Cox partial likelihood", "nll": "discrete-time hazards NLL"}.get(tr.get("loss"), "–")),
        _li("linear start (model.skip)", _skip(info, mo, tr)),
        _li("patients and events per site", _sites(rf)),
        _li("training", _training(info, cfg)),
    ]
    return ["<h2 id='model-card'>Model card</h2>", "<ul class='card'>", *items, "</ul>",
            "<p class='note'>Intended use: research on survival prediction from whole-slide images and omics, "
            "and hypothesis generation about the tiles and genes the model attends to.</p>"]  # fmt: skip


def limitations_html(rf: RunFiles) -> list[str]:
    """Limitations: research use only; ImageNet features; a small test set; the model against the baselines."""
    fa, cfg, m = features_attrs(rf.root), _yaml(rf.config), _json(rf.metrics)
    items = ["<li><b>Research use only, not for clinical decisions.</b> The model is not validated clinically.</li>"]
    enc = str(fa.get("feature_kind") or cfg.get("extract", {}).get("encoder", ""))
    if "imagenet" in enc:
        items.append("<li>Tile features come from an ImageNet encoder: they are not pathology features, and a "
                     "pathology foundation model may describe tissue far better.</li>")  # fmt: skip
    n = m.get("pooled", {}).get("n")
    if n is not None:
        ev = m["pooled"].get("events")
        small = " a small test set: wide confidence intervals" if n < 200 else ""
        items.append(f"<li>{n} patients ({ev} events) in the {html.escape(str(m.get('split')))} set;{small}.</li>")
    verdict = m.get("baselines", {}).get("model_minus_best", {}).get("verdict")
    if verdict:
        items.append(f"<li>Against the best linear baseline: {html.escape(str(verdict))}.</li>")
    items.append("<li>Attributions (attention, integrated gradients) show what the model uses, not causes.</li>")
    return ["<h2 id='limitations'>Limitations</h2>", "<ul>", *items, "</ul>"]


def metadata_html(rf: RunFiles, time_unit: str = "") -> list[str]:
    """Run metadata: report date, histofuse version, git commit, cohort, time unit, config digest."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("histofuse")
    except PackageNotFoundError:
        ver = "unknown"
    cfg = _yaml(rf.config)
    items = [
        _li("report date (UTC)", datetime.now(UTC).isoformat(timespec="seconds")),
        _li("histofuse version", ver),
        _li("git commit (source tree, when the report was built)", git_commit()),
        _li("cohort", cohort_name(cfg)),
        _li("time unit", time_unit or "–"),
        _li("config digest", config_digest(cfg) if cfg else "–"),
    ]
    return ["<h2 id='run-metadata'>Run metadata</h2>", "<ul>", *items, "</ul>"]


def package_version(name: str) -> str:
    """The installed version of package ``name``, or ``not installed``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
