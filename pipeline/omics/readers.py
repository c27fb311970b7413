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

from data_specs.cohort import OmicsSource
from data_specs.tables import read_expression

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


def read_omics(src: OmicsSource, patient_ids: list[str] | None = None):  # -> anndata.AnnData (patients x genes)
    """Read an omics file as AnnData with patients as ``obs_names`` and harmonised genes as ``var_names``.

    Args:
        src: the cohort's omics section (path, format, orientation, values, gene_column, impute).
        patient_ids: the cohort's patient ids, used to detect (or check) the orientation.

    The file is read and its values checked by :func:`data_specs.tables.read_expression`, the same reader
    ``histofuse validate`` uses; gene identifiers repeated in the file (exactly, or after
    :func:`harmonise_gene_ids`) are merged by their mean with a warning. ``X`` is float32 ``[P, G]``; with
    ``impute: mean`` it may hold NaN (filled at transform time with the cohort-level training mean). With
    ``extra_rows: ignore`` (a file shared with other cohorts) rows of patients not in ``patient_ids`` are
    dropped, logging how many and from which file.
    Raises ``ValueError`` naming the file, patient, gene and value.
    """
    import anndata as ad

    t = read_expression(src, patient_ids)
    x, genes = _merge_duplicate_genes(t.x, harmonise_gene_ids(t.gene_ids), src.path)
    pids = list(t.patient_ids)
    if patient_ids is not None and src.extra_rows == "ignore":
        cohort = set(patient_ids)
        keep = np.array([p in cohort for p in pids], bool)
        if not keep.all():
            log.info("%s: dropped %d of %d rows, patients not in the cohort (omics.extra_rows: ignore)",
                     src.path, int((~keep).sum()), len(pids))  # fmt: skip
            x, pids = x[keep], [p for p, k in zip(pids, keep, strict=True) if k]
    return ad.AnnData(
        X=np.asarray(x, np.float32),
        obs=pd.DataFrame(index=pd.Index(pids)),
        var=pd.DataFrame(index=pd.Index(genes)),
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
