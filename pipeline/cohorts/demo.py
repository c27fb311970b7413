"""The embedded demo cohort: real tissue arranged into synthetic patients with a known hazard.

Every slide is a small multi-level pyramidal TIFF (tiled, JPEG, Aperio-style description so OpenSlide
reports mpp and objective power) composed of 224 px blocks (at 0.5 um/px) cut from two real H&E
images: carcinoma (``tumor_target_he.png``) and non-tumour skin tissue (``cmu_small_region.svs``),
on a near-white background. Blocks align with the extraction grid, so each tile is all tumour or all
other tissue.

Planted truth (written to ``truth/``)::

    log_hz = b_tumour * z(tumour fraction) + b_age * z(age) + sum_g beta_g * s_g

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

log = logging.getLogger(__name__)


BLOCK = 224  # px at level 0 (0.5 um/px)


MPP = 0.5


PLANTED = {"MKI67": 0.8, "FOXM1": 0.6, "CCNB1": 0.5, "ESR1": -0.7, "PGR": -0.5}


B_TUMOUR = 1.2


B_AGE = 0.3


SITES = ("north", "central", "south")


@dataclass(frozen=True)
class DemoSize:
    patients: int = 120
    cols: int = 7
    rows: int = 5
    genes: int = 300


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
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
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
    tmp.replace(path)


def build_demo(out: str | Path, size: DemoSize | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build the demo cohort into ``out`` and return the cohort YAML path. Deterministic from ``seed``."""
    import anndata as ad
    import pandas as pd

    size = size or DemoSize()
    out = Path(out)
    spec = out / "cohort.yaml"
    stamp = out / "truth" / "build.json"
    want = {"seed": seed, **size.__dict__, "version": 2}
    if spec.is_file() and stamp.is_file() and not force and json.loads(stamp.read_text()) == want:
        log.info("demo cohort already built in %s", out)
        return spec
    rng = np.random.default_rng(seed)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    tumour_img, other_img, other_mask = _sources()

    n = size.patients
    site_idx = rng.choice(len(SITES), size=n, p=[0.42, 0.33, 0.25])
    tumour_frac_target = rng.uniform(0.05, 0.85, size=n)
    age = rng.normal(60, 11, size=n).clip(25, 90).round()
    # Stain: each site casts a colour; each slide jitters around it.
    site_cast = np.array([[1.0, 1.0, 1.0], [1.04, 0.96, 1.02], [0.95, 1.0, 1.05]])

    tiles_rows = []
    tumour_frac = np.zeros(n)
    pids = [f"DEMO-{i:04d}" for i in range(n)]
    cy, cx = (size.rows - 1) / 2, (size.cols - 1) / 2
    from tqdm.auto import tqdm

    for i in tqdm(range(n), desc="demo slides", unit="slide"):
        # Tissue: an ellipse of blocks with a ragged edge; tumour: the blocks nearest a random focus.
        yy, xx = np.mgrid[0 : size.rows, 0 : size.cols]
        r = ((yy - cy) / (size.rows / 2)) ** 2 + ((xx - cx) / (size.cols / 2)) ** 2
        tissue = r + rng.normal(0, 0.15, r.shape) < 0.9
        cells = np.argwhere(tissue)
        focus = cells[rng.integers(len(cells))]
        d = ((cells - focus) ** 2).sum(1) + rng.uniform(0, 0.5, len(cells))
        k = int(round(tumour_frac_target[i] * len(cells)))
        is_tumour = np.zeros(len(cells), bool)
        is_tumour[np.argsort(d)[:k]] = True
        tumour_frac[i] = is_tumour.mean()
        canvas = np.full((size.rows * BLOCK, size.cols * BLOCK, 3), 242, np.uint8)
        canvas = (canvas + rng.normal(0, 2, canvas.shape)).clip(0, 255).astype(np.uint8)
        cast = site_cast[site_idx[i]] * rng.normal(1, 0.015, 3)
        for (by, bx), tum in zip(cells, is_tumour, strict=True):
            block = _crop(rng, tumour_img, None) if tum else _crop(rng, other_img, other_mask)
            canvas[by * BLOCK : (by + 1) * BLOCK, bx * BLOCK : (bx + 1) * BLOCK] = (block * cast).clip(0, 255)
            tiles_rows.append((pids[i], int(bx * BLOCK), int(by * BLOCK), int(tum)))
        write_pyramid_tiff(out / "slides" / f"{pids[i]}.tif", canvas, MPP)

    # Gene expression: latent programmes + planted genes + site batch shift; negative-binomial counts.
    g_names = list(PLANTED) + [f"G{j:04d}" for j in range(size.genes - len(PLANTED))]
    n_fac = 8
    latent = rng.normal(size=(n, n_fac))
    loadings = rng.normal(0, 0.35, size=(n_fac, size.genes)) * (rng.random((n_fac, size.genes)) < 0.3)
    planted_s = rng.normal(size=(n, len(PLANTED)))
    base = rng.normal(3.0, 1.0, size=size.genes)
    logmu = base + latent @ loadings
    logmu[:, : len(PLANTED)] += 1.2 * planted_s
    batch = rng.normal(0, 0.25, size=(len(SITES), size.genes))
    logmu += batch[site_idx]
    libsize = rng.lognormal(0, 0.25, size=(n, 1))
    mu = np.exp(logmu) * libsize
    disp = 10.0  # NB: Gamma-Poisson with shape `disp`
    counts = rng.poisson(rng.gamma(disp, mu / disp)).astype(np.float32)

    def z(v: np.ndarray) -> np.ndarray:
        return (v - v.mean()) / v.std()

    beta = np.array(list(PLANTED.values()))
    log_hz = B_TUMOUR * z(tumour_frac) + B_AGE * z(age) + planted_s @ beta
    base_hz = np.array([1 / 1500, 1 / 1100, 1 / 1900])[site_idx]
    t_event = rng.exponential(1.0 / (base_hz * np.exp(log_hz)))
    t_cens = rng.uniform(500, 5000, size=n)
    time_ = np.minimum(t_event, t_cens).round(1).clip(1.0)
    event = (t_event <= t_cens).astype(int)

    # Fixed split, stratified by site and event: ~60% train, 15% val, 25% test.
    split = np.empty(n, dtype=object)
    for s in range(len(SITES)):
        for e in (0, 1):
            idx = np.flatnonzero((site_idx == s) & (event == e))
            idx = idx[rng.permutation(len(idx))]
            n_test, n_val = int(round(0.25 * len(idx))), int(round(0.15 * len(idx)))
            split[idx[:n_test]] = "test"
            split[idx[n_test : n_test + n_val]] = "val"
            split[idx[n_test + n_val :]] = "train"

    # A few patients without omics, to show masking of a missing modality.
    no_omics = set(rng.choice(n, size=max(1, n // 30), replace=False).tolist())
    keep = [i for i in range(n) if i not in no_omics]
    adata = ad.AnnData(X=counts[keep], obs=pd.DataFrame(index=[pids[i] for i in keep]), var=pd.DataFrame(index=g_names))
    adata.uns["description"] = "demo cohort raw counts (negative binomial), patients x genes"
    adata.write_h5ad(out / "omics.h5ad")

    with (out / "patients.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "site", "time", "event", "slides", "split"])
        for i in range(n):
            w.writerow([pids[i], SITES[site_idx[i]], time_[i], event[i], f"slides/{pids[i]}.tif", split[i]])
    with (out / "clinical.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "age", "grade_score"])
        noise = rng.normal(size=n)  # an uninformative covariate
        for i in range(n):
            w.writerow([pids[i], age[i], round(float(noise[i]), 3)])
    spec.write_text(
        "# histofuse demo cohort (built by `histofuse demo --build`)\n"
        "name: demo\ntime_unit: days\npatients: patients.csv\n"
        "omics: {path: omics.h5ad, values: counts, allow_missing: true}\n"
        "clinical: {path: clinical.csv, id_column: patient_id}\n"
    )
    with (out / "truth" / "patients.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["patient_id", "site", "split", "oracle_log_hz", "tumour_fraction", "age"] + [f"s_{g}" for g in PLANTED]
        )
        for i in range(n):
            w.writerow(
                [
                    pids[i],
                    SITES[site_idx[i]],
                    split[i],
                    round(float(log_hz[i]), 5),
                    round(float(tumour_frac[i]), 4),
                    age[i],
                ]
                + [round(float(v), 5) for v in planted_s[i]]
            )
    with (out / "truth" / "tiles.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "x", "y", "is_tumour"])
        w.writerows(tiles_rows)
    (out / "truth" / "genes.json").write_text(
        json.dumps(
            {
                "planted": PLANTED,
                "b_tumour": B_TUMOUR,
                "b_age": B_AGE,
                "patients_without_omics": [pids[i] for i in sorted(no_omics)],
            },
            indent=2,
        )
    )
    stamp.write_text(json.dumps(want))
    return spec
