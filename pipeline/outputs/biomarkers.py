"""Biomarker discovery table: candidate genes and morphological phenotypes tested by Cox regression on
held-out patients.

- Phenotypes: tile embeddings of the training patients (a seeded subsample) are reduced by PCA and
  clustered with scanpy (``neighbors``: exact kNN, Gaussian kernel; then ``leiden``); every tile of
  every patient is then assigned to a cluster by its nearest neighbours in that PCA space, and each
  patient gets the fraction of their tiles in each cluster. Example tiles (nearest to each cluster's
  centre) are cut from the slides.
- Cox fits (lifelines ``CoxPHFitter``) on the held-out patients, stratified by site when several sites
  have events: a univariate fit per candidate and one multivariable fit of the top-ranked candidates
  together. The candidates are the ``top_genes`` best genes by attribution plus every phenotype: both
  are chosen without looking at any outcome (attributions use the model and the patients' inputs
  only; clusters use tile embeddings only), so testing just these on the held-out outcomes is valid,
  and the Benjamini-Hochberg FDR is over exactly the tests made. The multivariable model keeps at
  most one candidate per 10 events (the usual events-per-variable rule), taking the best-ranked
  first; candidates left out have NaN with a note. Variables are standardised on the held-out
  patients: hazard ratios are per 1 SD.

Degenerate cases: fewer than 2 events, a constant variable, or a fit that does not converge give NaN
and a ``note`` in the row, not a crash.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

NAN = float("nan")


@dataclass
class Phenotypes:
    """Tile clusters: ``labels`` per patient (aligned with ``data.tiles``), ``fractions [P, C]``, and for
    each cluster a few example tiles ``(slide_id, x, y)`` nearest its centre."""

    labels: list[np.ndarray]
    fractions: np.ndarray
    names: list[str]
    examples: dict[str, list[tuple[str, int, int]]]
    n_fit_tiles: int


def fit_phenotypes(
    bags: list[np.ndarray],
    tiles: list[list[tuple[str, int, int]]],
    fit_idx: np.ndarray,
    max_tiles: int = 20000,
    resolution: float = 0.5,
    n_pcs: int = 30,
    n_examples: int = 6,
    seed: int = 0,
    assign_idx: np.ndarray | None = None,
) -> Phenotypes:
    """Leiden clusters of tile embeddings fitted on the tiles of ``fit_idx`` (training patients).

    Args:
        bags: per patient ``features [N_i, D]``; tiles: per patient ``[(slide_id, x, y)]``.
        assign_idx: patients whose tiles get a cluster (default all; others get empty labels, zero fractions).
    """
    import anndata as ad
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(seed)
    pool = [(i, j) for i in fit_idx for j in range(len(bags[i]))]
    if len(pool) < 20:
        raise ValueError(f"too few training tiles ({len(pool)}) to find phenotypes (need >= 20)")
    pick = [pool[k] for k in np.sort(rng.choice(len(pool), min(max_tiles, len(pool)), replace=False))]
    x = np.stack([bags[i][j] for i, j in pick]).astype(np.float32)
    pca = PCA(n_components=min(n_pcs, x.shape[1], len(x) - 1), random_state=seed).fit(x)
    z = pca.transform(x)
    a = ad.AnnData(X=z.astype(np.float32))
    a.obsm["X_pca"] = z
    # exact kNN (scikit-learn) and Gaussian-kernel connectivities: no numba compilation on first use
    sc.pp.neighbors(a, n_neighbors=15, use_rep="X_pca", method="gauss", transformer="sklearn", random_state=seed)
    sc.tl.leiden(a, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    fit_labels = a.obs["leiden"].astype(int).to_numpy()
    names = [f"P{c}" for c in range(fit_labels.max() + 1)]
    knn = KNeighborsClassifier(n_neighbors=15).fit(z, fit_labels)
    labels, fractions = [], np.zeros((len(bags), len(names)))
    assign = set(range(len(bags)) if assign_idx is None else np.asarray(assign_idx).tolist())
    for i, b in enumerate(bags):
        lab = knn.predict(pca.transform(b)) if len(b) and i in assign else np.zeros(0, int)
        labels.append(lab)
        if len(lab):
            fractions[i] = np.bincount(lab, minlength=len(names)) / len(lab)
    examples = {}
    for c, name in enumerate(names):
        members = np.flatnonzero(fit_labels == c)
        centre = z[members].mean(axis=0)
        near = members[np.argsort(((z[members] - centre) ** 2).sum(axis=1))[:n_examples]]
        examples[name] = [tiles[pick[k][0]][pick[k][1]] for k in near]
    return Phenotypes(labels, fractions, names, examples, len(pick))


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy); NaN p-values stay NaN and are not counted."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = false_discovery_control(p[ok], method="bh")
    return out


def _cox(df: pd.DataFrame, cols: list[str], strata: bool) -> tuple[pd.DataFrame | None, str | None]:
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter(penalizer=0.0)
            cph.fit(df[[*cols, "time", "event"] + (["site"] if strata else [])], "time", "event",
                    strata=["site"] if strata else None)  # fmt: skip
        return cph.summary, None
    except (ConvergenceError, ValueError, np.linalg.LinAlgError, ZeroDivisionError) as e:
        return None, f"Cox fit failed: {str(e).split('.')[0][:100]}"


def cox_table(
    x: pd.DataFrame, time: np.ndarray, event: np.ndarray, site: np.ndarray, ranked: list[str], epv: int = 10
) -> pd.DataFrame:
    """Univariate Cox per column of ``x`` (held-out patients) and one multivariable fit of the columns in
    ``ranked`` (best first, at most ``events // epv``). Columns: hr, hr_lo, hr_hi, p, fdr (uni_ and multi_).
    """
    time, event = np.asarray(time, float), np.asarray(event, bool)
    z = (x - x.mean()) / x.std(ddof=0).replace(0, np.nan)
    df = z.copy()
    df["time"], df["event"], df["site"] = time, event.astype(int), np.asarray(site).astype(str)
    strata = bool(pd.Series(event).groupby(df["site"].to_numpy()).sum().gt(0).sum() > 1)
    rows = []
    for c in x.columns:
        r = {"name": c, "n": len(df), "events": int(event.sum())}
        if event.sum() < 2:
            r["note"] = f"fewer than 2 events ({int(event.sum())}) among the held-out patients"
        elif not np.isfinite(z[c]).all():
            r["note"] = "constant among the held-out patients"
        else:
            s, why = _cox(df, [c], strata)
            if s is None:
                r["note"] = why
            else:
                r |= _row(s, c, "uni")
        rows.append(r)
    out = pd.DataFrame(rows)
    for k in ("uni_hr", "uni_hr_lo", "uni_hr_hi", "uni_p", "note"):
        if k not in out:
            out[k] = NAN if k != "note" else ""
    out["uni_fdr"] = bh_fdr(out.uni_p.to_numpy(float))
    n_multi = int(event.sum()) // epv
    usable = [c for c in ranked if c in z.columns and np.isfinite(z[c]).all()]
    chosen = usable[: max(0, n_multi)]
    multi = {}
    if len(chosen) >= 1:
        s, why = _cox(df, chosen, strata)
        for c in chosen:
            multi[c] = _row(s, c, "multi") if s is not None else {"multi_note": why}
    for k in ("multi_hr", "multi_hr_lo", "multi_hr_hi", "multi_p"):
        out[k] = [multi.get(c, {}).get(k, NAN) for c in out.name]
    out["multi_fdr"] = bh_fdr(out.multi_p.to_numpy(float))
    out["in_multivariable"] = out.name.isin(chosen)
    out["note"] = [
        "; ".join(v for v in (str(n) if isinstance(n, str) else "", multi.get(c, {}).get("multi_note", "")) if v)
        for c, n in zip(out.name, out.note, strict=True)
    ]
    out.attrs["multivariable"] = {"variables": chosen, "max_variables": n_multi, "stratified_by_site": strata}
    return out


def _row(summary: pd.DataFrame, c: str, pre: str) -> dict:
    s = summary.loc[c]
    return {
        f"{pre}_hr": float(s["exp(coef)"]),
        f"{pre}_hr_lo": float(s["exp(coef) lower 95%"]),
        f"{pre}_hr_hi": float(s["exp(coef) upper 95%"]),
        f"{pre}_p": float(s["p"]),
    }


def biomarker_table(
    held_out: pd.DataFrame,
    genes: pd.DataFrame | None,
    gene_rank: pd.DataFrame | None,
    phenos: pd.DataFrame | None,
    top_genes: int = 20,
) -> tuple[pd.DataFrame, dict]:
    """The table: for the ``top_genes`` best genes by attribution and every phenotype, univariate and
    multivariable Cox on the held-out patients.

    Args:
        held_out: ``patient_id, site, time, event`` of the held-out patients.
        genes: ``[P, G]`` standardised expression of those patients (columns = genes; NaN rows: no omics).
        gene_rank: ``rank, gene, direction`` from :func:`pipeline.attribution.rank_genes`.
        phenos: ``[P, C]`` phenotype fractions of those patients (columns = phenotype names).

    Returns ``(table sorted kind, rank, univariate p; info)``; ``info`` describes the multivariable fit.
    """
    parts, rank_of, kind_of = [], {}, {}
    if genes is not None and gene_rank is not None:
        parts.append(genes)
        rank_of.update(dict(zip(gene_rank.gene, gene_rank["rank"], strict=True)))
        kind_of.update(dict.fromkeys(genes.columns, "gene"))
    if phenos is not None:
        parts.append(phenos)
        kind_of.update(dict.fromkeys(phenos.columns, "phenotype"))
    if not parts:
        return pd.DataFrame(), {}
    x = pd.concat(parts, axis=1)
    keep = x.notna().all(axis=1).to_numpy()  # patients with every candidate modality
    x, ho = x[keep].reset_index(drop=True), held_out[keep].reset_index(drop=True)
    gene_cands = sorted((g for g in x.columns if kind_of[g] == "gene"), key=lambda g: rank_of.get(g, 1e9))
    ranked = gene_cands[:top_genes] + [p for p in x.columns if kind_of[p] == "phenotype"]
    x = x[ranked]
    t = cox_table(x, ho.time.to_numpy(), ho.event.to_numpy(), ho.site.to_numpy(), ranked)
    info = {
        **t.attrs.get("multivariable", {}),
        "patients": int(keep.sum()),
        "left_out_missing_modality": int((~keep).sum()),
    }
    t.insert(0, "kind", [kind_of[n] for n in t.name])
    ranks = pd.array([rank_of.get(n) for n in t.name], dtype="Int64")  # integers; empty for phenotypes
    t.insert(1, "attribution_rank", ranks)
    if gene_rank is not None:
        d = dict(zip(gene_rank.gene, gene_rank.direction, strict=True))
        t["attribution_direction"] = [d.get(n, "") for n in t.name]
    t["top_candidate"] = t.name.isin(ranked)
    t = t.sort_values(["kind", "attribution_rank", "uni_p"], na_position="last", kind="stable").reset_index(drop=True)
    return t, info
