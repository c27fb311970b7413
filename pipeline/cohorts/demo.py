"""The embedded demo cohort: real tissue arranged into synthetic patients with a known hazard.

Every slide is a small multi-level pyramidal TIFF (tiled, JPEG, Aperio-style description so OpenSlide
reports mpp and objective power) composed of 224 px blocks (at 0.5 um/px) cut from two real H&E
images: carcinoma (``tumor_target_he.png``) and non-tumour skin tissue (``cmu_small_region.svs``),
on a near-white background. Blocks align with the extraction grid, so each tile is all tumour or all
other tissue.

Planted truth (written to ``truth/``), with ``morphology="fraction"`` (the default)::

    log_hz = b_tumour * z(tumour fraction) + b_age * z(age) + sum_g beta_g * s_g

With ``morphology="local"`` the prognostic morphology lives in a few *carrier* tiles: about half the
slides hold a small cluster of 3-8 blocks of colonic glands (``colon_glands_ihc.png``, restained from
DAB/haematoxylin to H&E colours), and every slide's other blocks are tumour and other tissue drawn from
one distribution for everyone (a tumour fraction that carries no risk). Mean pooling dilutes the
carriers among the slide's ~50 tiles; attention can find them::

    log_hz = b_local * z(carrier tiles) + b_age * z(age) + sum_g beta_g * s_g

where ``s_g`` is the latent expression programme of planted gene g (MKI67, FOXM1, CCNB1 up; ESR1,
PGR down in risk). Times are exponential with a site-specific baseline hazard; censoring uniform.
Sites differ in stain (a colour cast) and an omics batch shift, as real hospitals do.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.files import atomic_path, write_json, write_text

log = logging.getLogger(__name__)


BLOCK = 224  # px at level 0 (0.5 um/px)


MPP = 0.5


PLANTED = {"MKI67": 0.8, "FOXM1": 0.6, "CCNB1": 0.5, "ESR1": -0.7, "PGR": -0.5}


B_TUMOUR = 1.2


B_AGE = 0.3


B_LOCAL = 1.2  # per SD of the number of carrier tiles (0 in carrier-free slides)


MORPHOLOGIES = ("fraction", "local")
CARRIER_SLIDES = 0.5  # share of slides with carriers (morphology "local")
CARRIER_TILES = (3, 8)  # carrier blocks in such a slide, inclusive range
LOCAL_GRID = (10, 7)  # (cols, rows) of the local demo's slides: ~50 tissue blocks, so carriers are 6-16%


SITES = ("north", "central", "south")
# the planted truth, under the cohort folder (read back by pipeline.cohorts.demo_check)
TRUTH_DIR = "truth"
TRUTH_PATIENTS = "patients.csv"  # oracle log hazard per patient
TRUTH_TILES = "tiles.csv"  # is_tumour per tile (and is_carrier with morphology "local")
TRUTH_GENES = "genes.json"  # planted gene effects


@dataclass(frozen=True)
class DemoSize:
    patients: int = 120
    cols: int = 7
    rows: int = 5
    genes: int = 300


def demo_size(patients: int = 120, morphology: str = "fraction") -> DemoSize:
    """The demo's default size for ``morphology`` (the local demo has larger slides, see ``LOCAL_GRID``)."""
    if morphology not in MORPHOLOGIES:
        raise ValueError(f"demo morphology {morphology!r}: expected one of {', '.join(MORPHOLOGIES)}")
    if morphology == "local":
        return DemoSize(patients=patients, cols=LOCAL_GRID[0], rows=LOCAL_GRID[1])
    return DemoSize(patients=patients)


def _asset(name: str) -> Path:
    return Path(str(resources.files("pipeline.cohorts.demo_assets") / name))


def _sources() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tumour RGB, other-tissue RGB, other-tissue mask) from the real images."""
    import openslide

    tumour = np.asarray(Image.open(_asset("tumor_target_he.png")).convert("RGB"))
    s = openslide.OpenSlide(str(_asset("cmu_small_region.svs")))
    other = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    s.close()
    hsv = np.asarray(Image.fromarray(other).convert("HSV"))
    other_mask = (hsv[..., 1] > 30) & (other.mean(-1) < 225)
    return tumour, other, other_mask


def _carrier_source() -> tuple[np.ndarray, np.ndarray]:
    """(RGB, tissue mask) of the carrier pattern: colonic glands, DAB/haematoxylin restained to H&E colours
    (haematoxylin kept as nuclei, DAB as an eosin-like cytoplasm) so it differs by morphology, not by brown."""
    from skimage.color import hed2rgb, rgb2hed

    ihc = np.asarray(Image.open(_asset("colon_glands_ihc.png")).convert("RGB"))
    hed = rgb2hed(ihc)
    he = np.stack([3.0 * hed[..., 0], 0.3 * hed[..., 2].clip(0, None) + 0.005, np.zeros(hed.shape[:2])], -1)
    rgb = (hed2rgb(he) * 255).clip(0, 255).astype(np.uint8)
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    return rgb, (hsv[..., 1] > 30) & (rgb.mean(-1) < 225)


def _crop(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray | None, min_frac: float = 0.85) -> np.ndarray:
    h, w = img.shape[:2]
    for _ in range(200):
        y, x = rng.integers(0, h - BLOCK), rng.integers(0, w - BLOCK)
        if mask is None or mask[y : y + BLOCK, x : x + BLOCK].mean() >= min_frac:
            break
    c = img[y : y + BLOCK, x : x + BLOCK]
    c = np.rot90(c, int(rng.integers(0, 4)))
    return np.ascontiguousarray(c[:, ::-1] if rng.random() < 0.5 else c)


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float | None, levels: int = 3, quality: int = 85) -> None:
    """Tiled, JPEG-compressed, pyramidal TIFF. With ``mpp``, an Aperio-style description makes OpenSlide
    report microns per pixel and objective power; without, it opens as a generic TIFF with no mpp."""
    import tifffile

    h, w = rgb.shape[:2]
    desc = (
        ""
        if mpp is None
        else f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q={quality}"
        f"|AppMag = {10 / mpp:g}|MPP = {mpp}"
    )
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as tif:
        img = Image.fromarray(rgb)
        for lv in range(levels):
            arr = np.asarray(img)
            tif.write(
                arr,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                description=(desc if lv == 0 else f"Aperio Image Library v12.0.0\r\n{arr.shape[1]}x{arr.shape[0]} -> ")
                if mpp
                else None,
                subfiletype=0 if lv == 0 else 1,
                metadata=None,
            )
            img = img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.LANCZOS)


@dataclass
class _Draws:
    """Everything drawn for the demo's ``n`` patients (arrays of length ``n`` unless said otherwise)."""

    pids: list[str]
    site_idx: np.ndarray
    age: np.ndarray
    tumour_frac: np.ndarray | None = None
    carriers: np.ndarray | None = None  # planted carrier blocks per slide (morphology "local"), else None
    tiles_rows: list | None = None  # (slide_id, x, y, is_tumour[, is_carrier]) per block
    genes: list[str] | None = None
    counts: np.ndarray | None = None  # [n, G] float32
    planted_s: np.ndarray | None = None  # [n, len(PLANTED)]
    log_hz: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    split: np.ndarray | None = None
    no_omics: set[int] | None = None
    noise: np.ndarray | None = None


def build_demo(
    out: str | Path, size: DemoSize | None = None, seed: int = 0, force: bool = False, morphology: str = "fraction"
) -> Path:
    """Build the demo cohort into ``out`` and return the cohort YAML path. Deterministic from ``seed``.

    The random draws happen in one fixed order (slides, expression, outcomes, split, missing omics,
    clinical noise), so a seed always gives the same cohort. ``morphology`` is where the slides' prognostic
    signal lives (module docstring); "fraction" builds exactly the cohort it always did."""
    size = size or demo_size(morphology=morphology)
    if morphology not in MORPHOLOGIES:
        raise ValueError(f"demo morphology {morphology!r}: expected one of {', '.join(MORPHOLOGIES)}")
    out = Path(out)
    spec = out / "cohort.yaml"
    stamp = out / TRUTH_DIR / "build.json"
    want = {"seed": seed, **size.__dict__, "version": 2} | (
        {"morphology": morphology} if morphology != "fraction" else {}
    )
    if spec.is_file() and stamp.is_file() and not force and json.loads(stamp.read_text()) == want:
        log.info("demo cohort already built in %s", out)
        return spec
    rng = np.random.default_rng(seed)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / TRUTH_DIR).mkdir(parents=True, exist_ok=True)
    n = size.patients
    site_idx = rng.choice(len(SITES), size=n, p=[0.42, 0.33, 0.25])
    tumour_frac_target = rng.uniform(0.05, 0.85, size=n)
    age = rng.normal(60, 11, size=n).clip(25, 90).round()
    d = _Draws([f"DEMO-{i:04d}" for i in range(n)], site_idx, age)
    if morphology == "local":  # drawn after the fraction demo's draws, which it leaves as they were
        lo, hi = CARRIER_TILES
        d.carriers = np.where(rng.random(n) < CARRIER_SLIDES, rng.integers(lo, hi + 1, size=n), 0)
    _draw_slides(rng, size, out, d, tumour_frac_target)
    _draw_expression(rng, size, d)
    _draw_outcomes(rng, d)
    _draw_split(rng, d)
    d.no_omics = set(rng.choice(n, size=max(1, n // 30), replace=False).tolist())  # masking a missing modality
    d.noise = rng.normal(size=n)  # an uninformative clinical covariate
    _write_cohort(out, spec, d)
    _write_truth(out, d)
    write_json(stamp, want)  # last: its presence means the cohort is complete
    return spec


def _draw_slides(rng: np.random.Generator, size: DemoSize, out: Path, d: _Draws, tumour_target: np.ndarray) -> None:
    """One pyramidal TIFF per patient: an ellipse of blocks with a ragged edge, tumour the blocks nearest a
    random focus (and, with carriers, a cluster of carrier blocks around a second focus); each site casts a
    stain colour and each slide jitters around it."""
    from pipeline.progress import Progress

    tumour_img, other_img, other_mask = _sources()
    carrier_img, carrier_mask = _carrier_source() if d.carriers is not None else (None, None)
    site_cast = np.array([[1.0, 1.0, 1.0], [1.04, 0.96, 1.02], [0.95, 1.0, 1.05]])
    d.tiles_rows, d.tumour_frac = [], np.zeros(len(d.pids))
    with Progress(len(d.pids), "demo slides", "slide") as bar:
        for i in range(len(d.pids)):
            n_car = None if d.carriers is None else int(d.carriers[i])
            cells, is_tumour, is_carrier = _layout(rng, size, tumour_target[i], n_car)
            d.tumour_frac[i] = is_tumour.mean()
            canvas = np.full((size.rows * BLOCK, size.cols * BLOCK, 3), 242, np.uint8)
            canvas = (canvas + rng.normal(0, 2, canvas.shape)).clip(0, 255).astype(np.uint8)
            cast = site_cast[d.site_idx[i]] * rng.normal(1, 0.015, 3)
            for (by, bx), tum, car in zip(cells, is_tumour, is_carrier, strict=True):
                if car:
                    block = _crop(rng, carrier_img, carrier_mask)  # type: ignore[arg-type]
                else:
                    block = _crop(rng, tumour_img, None) if tum else _crop(rng, other_img, other_mask)
                canvas[by * BLOCK : (by + 1) * BLOCK, bx * BLOCK : (bx + 1) * BLOCK] = (block * cast).clip(0, 255)
                row = (d.pids[i], int(bx * BLOCK), int(by * BLOCK), int(tum))
                d.tiles_rows.append(row if n_car is None else (*row, int(car)))
            write_pyramid_tiff(out / "slides" / f"{d.pids[i]}.tif", canvas, MPP)
            bar.update()


def _layout(
    rng: np.random.Generator, size: DemoSize, tumour_target: float, n_carriers: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One slide's tissue blocks ``cells [K, 2]`` (row, col), ``is_tumour [K]`` and ``is_carrier [K]``.

    Tumour: the ``tumour_target`` share of blocks nearest a random focus. Carriers (``n_carriers`` blocks,
    None: no draw at all, as in the fraction demo) the blocks nearest a second focus; they replace whatever
    was there, so a carrier is never a tumour block."""
    cy, cx = (size.rows - 1) / 2, (size.cols - 1) / 2
    yy, xx = np.mgrid[0 : size.rows, 0 : size.cols]
    r = ((yy - cy) / (size.rows / 2)) ** 2 + ((xx - cx) / (size.cols / 2)) ** 2
    tissue = r + rng.normal(0, 0.15, r.shape) < 0.9
    cells = np.argwhere(tissue)
    focus = cells[rng.integers(len(cells))]
    dist = ((cells - focus) ** 2).sum(1) + rng.uniform(0, 0.5, len(cells))
    k = int(round(tumour_target * len(cells)))
    is_tumour = np.zeros(len(cells), bool)
    is_tumour[np.argsort(dist)[:k]] = True
    is_carrier = np.zeros(len(cells), bool)
    if n_carriers:
        if n_carriers >= len(cells):
            raise ValueError(f"demo: {n_carriers} carrier blocks do not fit a slide of {len(cells)} tissue blocks")
        focus = cells[rng.integers(len(cells))]
        dist = ((cells - focus) ** 2).sum(1) + rng.uniform(0, 0.5, len(cells))
        is_carrier[np.argsort(dist)[:n_carriers]] = True
        is_tumour &= ~is_carrier
    return cells, is_tumour, is_carrier


def _draw_expression(rng: np.random.Generator, size: DemoSize, d: _Draws) -> None:
    """Latent programmes + planted genes + a site batch shift; negative-binomial counts ``[n, G]``."""
    n = len(d.pids)
    d.genes = list(PLANTED) + [f"G{j:04d}" for j in range(size.genes - len(PLANTED))]
    n_fac = 8
    latent = rng.normal(size=(n, n_fac))
    loadings = rng.normal(0, 0.35, size=(n_fac, size.genes)) * (rng.random((n_fac, size.genes)) < 0.3)
    d.planted_s = rng.normal(size=(n, len(PLANTED)))
    base = rng.normal(3.0, 1.0, size=size.genes)
    logmu = base + latent @ loadings
    logmu[:, : len(PLANTED)] += 1.2 * d.planted_s
    batch = rng.normal(0, 0.25, size=(len(SITES), size.genes))
    logmu += batch[d.site_idx]
    libsize = rng.lognormal(0, 0.25, size=(n, 1))
    mu = np.exp(logmu) * libsize
    disp = 10.0  # NB: Gamma-Poisson with shape `disp`
    d.counts = rng.poisson(rng.gamma(disp, mu / disp)).astype(np.float32)


def _draw_outcomes(rng: np.random.Generator, d: _Draws) -> None:
    """The planted log hazard; exponential event times with a site baseline; uniform censoring."""

    def z(v: np.ndarray) -> np.ndarray:
        return (v - v.mean()) / v.std()

    beta = np.array(list(PLANTED.values()))
    slide = B_TUMOUR * z(d.tumour_frac) if d.carriers is None else B_LOCAL * z(d.carriers.astype(float))
    d.log_hz = slide + B_AGE * z(d.age) + d.planted_s @ beta
    base_hz = np.array([1 / 1500, 1 / 1100, 1 / 1900])[d.site_idx]
    t_event = rng.exponential(1.0 / (base_hz * np.exp(d.log_hz)))
    t_cens = rng.uniform(500, 5000, size=len(d.pids))
    d.time = np.minimum(t_event, t_cens).round(1).clip(1.0)
    d.event = (t_event <= t_cens).astype(int)


def _draw_split(rng: np.random.Generator, d: _Draws) -> None:
    """A fixed split, stratified by site and event: ~60% train, 15% val, 25% test."""
    d.split = np.empty(len(d.pids), dtype=object)
    for s in range(len(SITES)):
        for e in (0, 1):
            idx = np.flatnonzero((d.site_idx == s) & (d.event == e))
            idx = idx[rng.permutation(len(idx))]
            n_test, n_val = int(round(0.25 * len(idx))), int(round(0.15 * len(idx)))
            d.split[idx[:n_test]] = "test"
            d.split[idx[n_test : n_test + n_val]] = "val"
            d.split[idx[n_test + n_val :]] = "train"


def _write_rows(path: Path, header: list[str], rows) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _write_cohort(out: Path, spec: Path, d: _Draws) -> None:
    """omics.h5ad (raw counts), patients.csv, clinical.csv and the cohort YAML."""
    import anndata as ad
    import pandas as pd

    n = len(d.pids)
    keep = [i for i in range(n) if i not in d.no_omics]
    obs = pd.DataFrame(index=[d.pids[i] for i in keep])
    adata = ad.AnnData(X=d.counts[keep], obs=obs, var=pd.DataFrame(index=d.genes))
    adata.uns["description"] = "demo cohort raw counts (negative binomial), patients x genes"
    with atomic_path(out / "omics.h5ad") as tmp:
        adata.write_h5ad(tmp)
    sites = [SITES[k] for k in d.site_idx]
    rows = ([d.pids[i], sites[i], d.time[i], d.event[i], f"slides/{d.pids[i]}.tif", d.split[i]] for i in range(n))
    _write_rows(out / "patients.csv", ["patient_id", "site", "time", "event", "slides", "split"], rows)
    rows = ([d.pids[i], d.age[i], round(float(d.noise[i]), 3)] for i in range(n))
    _write_rows(out / "clinical.csv", ["patient_id", "age", "grade_score"], rows)
    write_text(
        spec,
        "# histofuse demo cohort (built by `histofuse demo --build`)\n"
        "name: demo\ntime_unit: days\npatients: patients.csv\n"
        "omics: {path: omics.h5ad, values: counts, allow_missing: true}\n"
        "clinical: {path: clinical.csv, id_column: patient_id}\n",
    )


def _write_truth(out: Path, d: _Draws) -> None:
    """truth/: patients.csv (oracle log hazard, tumour fraction, planted programmes; carrier blocks with
    morphology "local"), tiles.csv (is_tumour, and is_carrier with "local"), genes.json."""
    local = d.carriers is not None
    header = ["patient_id", "site", "split", "oracle_log_hz", "tumour_fraction", "age"] + [f"s_{g}" for g in PLANTED]
    rows = [
        [d.pids[i], SITES[d.site_idx[i]], d.split[i], round(float(d.log_hz[i]), 5), round(float(d.tumour_frac[i]), 4),
         d.age[i]] + [round(float(v), 5) for v in d.planted_s[i]]
        for i in range(len(d.pids))
    ]  # fmt: skip
    if local:
        header.append("carrier_tiles")
        rows = [[*row, int(c)] for row, c in zip(rows, d.carriers, strict=True)]
    _write_rows(out / TRUTH_DIR / TRUTH_PATIENTS, header, rows)
    tile_header = ["slide_id", "x", "y", "is_tumour"] + (["is_carrier"] if local else [])
    _write_rows(out / TRUTH_DIR / TRUTH_TILES, tile_header, d.tiles_rows)
    truth = {
        "planted": PLANTED,
        "b_tumour": 0.0 if local else B_TUMOUR,
        "b_age": B_AGE,
        "patients_without_omics": [d.pids[i] for i in sorted(d.no_omics)],
    }
    if local:
        truth |= {"morphology": "local", "b_local": B_LOCAL, "carrier_tiles": list(CARRIER_TILES)}
    write_json(out / TRUTH_DIR / TRUTH_GENES, truth)
