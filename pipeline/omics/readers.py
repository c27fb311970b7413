"""Gene expression and clinical covariates: read, harmonise, align to the cohort, normalise with
cohort-level statistics that are built from per-site summaries (no patient value is ever pooled).

Omics, in order:

1. **Read** (:func:`read_omics`): h5ad (``obs`` = patients, or transposed when its ``var_names`` are the
   cohort's patients), CSV/TSV with patients as rows or as columns (``orientation`` in the spec, or
   detected by which axis matches the cohort's patient ids).
2. **Harmonise gene identifiers** (:func:`harmonise_gene_ids`): Ensembl version suffixes stripped
   (``ENSG00000141510.16`` -> ``ENSG00000141510``), symbols upper-cased; optionally taken from a
   ``gene_column`` (an h5ad ``var`` column, or a CSV column in the genes-by-patients orientation).
   Identifiers that collide after harmonisation are merged by their mean, with a warning.
3. **Missing values**: an error naming the file and the numbers of values, patients and genes,
   unless the spec says ``impute: zero`` (filled with 0 in the file's own units, before
   normalisation) or ``impute: mean`` (the gene's cohort-level training mean, i.e. 0 after
   standardisation).
4. **Normalise per patient** (no fitted state): counts -> ``scanpy.pp.normalize_total(1e4)`` +
   ``log1p``; ``values: log`` -> as is.
5. **Cohort-level fit** from per-site summaries (:meth:`OmicsNormaliser.site_summary` ->
   :meth:`OmicsNormaliser.from_summaries`): gene panel (a panel file, or every gene), optionally the
   ``n_top_genes`` highly variable genes by scanpy's ``flavor="seurat"`` rule evaluated on the
   summaries (identical to ``sc.pp.highly_variable_genes`` on the pooled training patients), per-gene
   mean/sd for standardisation, and optionally GMT gene sets turned into pathway tokens (per-pathway
   mean of the standardised member genes, as SurvPath does with Hallmark/Reactome sets).

Clinical: numeric columns standardised, categorical columns one-hot with categories fixed at fit
time (an unseen category at prediction is all-zero, with a warning), and a ``<name>__missing``
indicator for every column that had missing values among the training patients. Same
``site_summary``/``from_summaries`` pair.

The fitted state (:meth:`state`) is saved in the model bundle and reused at prediction time and by
every federated site, so all sites share one feature space.

Site summaries are plain dicts of numpy arrays, lists, dicts and ints whose arrays have a gene (or
column) axis and never a patient axis; see :meth:`OmicsNormaliser.site_summary` and
:meth:`ClinicalNormaliser.site_summary` for the fields.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from data_specs.cohort import OmicsSource, detect_orientation

log = logging.getLogger(__name__)


_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d{6,})\.\d+(_PAR_Y)?$")


def harmonise_gene_ids(ids: list[str] | pd.Index) -> list[str]:
    """Strip whitespace and Ensembl version suffixes (keeping ``_PAR_Y``) and upper-case symbols.

    Example: ``["ENSG00000141510.16", " tp53", "ENSG00000002586.20_PAR_Y"]`` ->
    ``["ENSG00000141510", "TP53", "ENSG00000002586_PAR_Y"]``.
    """
    out = []
    for g in ids:
        s = str(g).strip().upper()
        m = _ENSEMBL_VERSION.match(s)
        out.append(m.group(1) + (m.group(2) or "") if m else s)
    return out


def _merge_duplicate_genes(x: np.ndarray, genes: list[str], file: Path) -> tuple[np.ndarray, list[str]]:
    counts = Counter(genes)
    dups = {g: n for g, n in counts.items() if n > 1}
    if not dups:
        return x, genes
    order = list(dict.fromkeys(genes))
    col = {g: k for k, g in enumerate(order)}
    codes = np.array([col[g] for g in genes])
    # nan-aware mean of the colliding columns: (P, G_in) -> (P, G_out)
    valid = ~np.isnan(x)
    tot = np.zeros((x.shape[0], len(order)))
    cnt = np.zeros((x.shape[0], len(order)))
    np.add.at(tot.T, codes, np.where(valid, x, 0.0).T)
    np.add.at(cnt.T, codes, valid.T.astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        merged = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    eg = ", ".join(f"{g} x{n}" for g, n in list(dups.items())[:5])
    log.warning(
        "%s: %d gene identifier(s) occur more than once after harmonisation (%d columns); merged by their "
        "mean (e.g. %s)",
        file,
        len(dups),
        sum(dups.values()),
        eg,
    )
    return merged.astype(np.float32), order


def _read_table(src: OmicsSource, patient_ids: list[str] | None) -> tuple[np.ndarray, list[str], list[str]]:
    """CSV/TSV -> ``(x [P, G] float, patient ids, raw gene ids)`` in the declared or detected orientation."""
    fmt = src.resolved_format()
    df = pd.read_csv(src.path, sep="\t" if fmt == "tsv" else ",", index_col=0, dtype={0: str})
    df.index = df.index.astype(str).str.strip()
    df.columns = df.columns.astype(str).str.strip()
    gene_col = src.gene_column
    data_cols = [c for c in df.columns if c != gene_col]
    orient = detect_orientation(list(df.index), data_cols, patient_ids, src.orientation, str(src.path))
    gene_ids: list[str] | None = None
    if gene_col is not None:
        if orient != "genes_by_patients":
            raise ValueError(
                f"{src.path}: gene_column '{gene_col}' applies to a genes-by-patients table (one row per gene); "
                "this table has one row per patient"
            )
        if gene_col == df.index.name:
            gene_ids = list(df.index)
        elif gene_col in df.columns:
            gene_ids = df[gene_col].astype(str).tolist()
            df = df.drop(columns=[gene_col])
        else:
            raise ValueError(f"{src.path}: gene_column '{gene_col}' not in header {[df.index.name, *df.columns]}")
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        c = bad[0]
        r = df.index[pd.to_numeric(df[c], errors="coerce").isna() & df[c].notna()]
        what = "gene" if orient == "patients_by_genes" else "patient"
        other = "patient" if orient == "patients_by_genes" else "gene"
        v = df.loc[r[0], c] if len(r) else None
        raise ValueError(
            f"{src.path}: {what} column '{c}' is not numeric ({other} '{r[0] if len(r) else '?'}': {v!r})"
            + ("; name it as gene_column if it holds gene identifiers" if orient == "genes_by_patients" else "")
        )
    x = df.to_numpy(np.float64)
    if orient == "patients_by_genes":
        return x, list(df.index), list(df.columns)
    return x.T, list(df.columns), gene_ids if gene_ids is not None else list(df.index)


def read_omics(src: OmicsSource, patient_ids: list[str] | None = None):  # -> anndata.AnnData (patients x genes)
    """Read an omics file as AnnData with patients as ``obs_names`` and harmonised genes as ``var_names``.

    Args:
        src: the cohort's omics section (path, format, orientation, values, gene_column, impute).
        patient_ids: the cohort's patient ids, used to detect the orientation when it is ``auto``.

    ``X`` is float32 ``[P, G]``; with ``impute: mean`` it may hold NaN (filled at transform time with the
    cohort-level training mean). Raises ``ValueError`` naming the file, patient, gene and value.
    """
    import anndata as ad

    fmt = src.resolved_format()
    if fmt == "h5ad":
        a = ad.read_h5ad(src.path)
        obs, var = [str(i) for i in a.obs_names], [str(g) for g in a.var_names]
        orient = detect_orientation(obs, var, patient_ids, src.orientation, str(src.path))
        x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
        x = np.asarray(x, np.float64)
        if src.gene_column is not None:
            frame = a.var if orient == "patients_by_genes" else a.obs
            if src.gene_column not in frame.columns:
                where = "var" if orient == "patients_by_genes" else "obs"
                raise ValueError(
                    f"{src.path}: gene_column '{src.gene_column}' is not a {where} column (have {list(frame.columns)})"
                )
            ids = frame[src.gene_column].astype(str).tolist()
            var, obs = (ids, obs) if orient == "patients_by_genes" else (var, ids)
        if orient == "genes_by_patients":
            x, obs, var = x.T, var, obs
        pids, raw_genes = obs, var
    else:
        x, pids, raw_genes = _read_table(src, patient_ids)
    pids = [str(p).strip() for p in pids]
    genes = harmonise_gene_ids(raw_genes)
    if np.isinf(x).any():
        i, j = np.argwhere(np.isinf(x))[0]
        raise ValueError(f"{src.path}: infinite value for patient '{pids[i]}', gene '{raw_genes[j]}'")
    miss = np.isnan(x)
    if miss.any():
        rows, cols = np.flatnonzero(miss.any(1)), np.flatnonzero(miss.any(0))
        msg = (
            f"{src.path}: {int(miss.sum())} missing value(s) in {len(rows)} patient(s) (e.g. "
            f"{[pids[i] for i in rows[:3]]}) and {len(cols)} gene(s) (e.g. {[raw_genes[j] for j in cols[:3]]})"
        )
        if src.impute == "none":
            raise ValueError(msg + "; set impute: mean or impute: zero in the cohort's omics section")
        log.warning("%s; imputed with the %s", msg, "training mean" if src.impute == "mean" else "value 0")
        if src.impute == "zero":
            x = np.where(miss, 0.0, x)
    if src.values == "counts" and (x < 0).any():
        i, j = np.argwhere(x < 0)[0]
        raise ValueError(
            f"{src.path}: negative count {x[i, j]} for patient '{pids[i]}', gene "
            f"'{raw_genes[j]}' (values: counts); set values: log for already-log data"
        )
    x, genes = _merge_duplicate_genes(x, genes, src.path)
    if len(set(pids)) != len(pids):
        dup = [p for p, n in Counter(pids).items() if n > 1]
        raise ValueError(f"{src.path}: patient id(s) listed more than once: {dup[:5]}")
    return ad.AnnData(
        X=np.asarray(x, np.float32), obs=pd.DataFrame(index=pd.Index(pids)), var=pd.DataFrame(index=pd.Index(genes))
    )


def log_normalise(adata, values: str) -> np.ndarray:
    """Per-patient normalisation ``[P, G]`` float64: counts -> ``normalize_total(1e4)`` + ``log1p``; log -> as is.

    Missing values (NaN) stay missing; library sizes are taken over the observed genes.
    """
    import scanpy as sc

    x = np.asarray(adata.X, np.float64)
    if values != "counts":
        return x
    miss = np.isnan(x)
    a = adata.copy()
    a.X = np.where(miss, 0.0, x)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    out = np.asarray(a.X, np.float64)
    out[miss] = np.nan
    return out


def read_panel(path: Path | str) -> list[str]:
    """A gene panel file: one gene per line (``#`` comments allowed); identifiers harmonised."""
    genes = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not genes:
        raise ValueError(f"{path}: gene panel file lists no genes")
    return list(dict.fromkeys(harmonise_gene_ids(genes)))


def read_gmt(path: Path | str) -> dict[str, list[str]]:
    """A GMT gene-set file (``name<TAB>description<TAB>gene1<TAB>gene2...`` per line) -> name -> genes."""
    sets: dict[str, list[str]] = {}
    for k, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            raise ValueError(f"{path}, line {k}: expected name, description and at least one gene separated by tabs")
        name = parts[0].strip()
        if name in sets:
            raise ValueError(f"{path}, line {k}: gene set '{name}' defined twice")
        sets[name] = list(dict.fromkeys(harmonise_gene_ids([g for g in parts[2:] if g.strip()])))
    if not sets:
        raise ValueError(f"{path}: GMT file defines no gene sets")
    return sets
