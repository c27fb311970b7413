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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_specs.cohort import ClinicalSource, OmicsSource, detect_orientation

log = logging.getLogger(__name__)

OMICS_SUMMARY = "histofuse-omics-summary/1"
CLINICAL_SUMMARY = "histofuse-clinical-summary/1"
MIN_SUMMARY_PATIENTS = 2  # a summary of one patient is that patient's values: refuse it
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d{6,})\.\d+(_PAR_Y)?$")


# --------------------------------------------------------------------------------------------------
# omics: reading and harmonising


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


def seurat_hvg(n: np.ndarray, mean: np.ndarray, var: np.ndarray, n_top_genes: int, n_bins: int = 20) -> np.ndarray:
    """scanpy's ``highly_variable_genes(flavor="seurat", n_top_genes=...)`` rule from gene-level statistics.

    Args:
        n: ``[G]`` patients per gene (only used to guard against genes without data).
        mean, var: ``[G]`` mean and unbiased (ddof=1) variance of ``expm1(log-normalised expression)``.
        n_top_genes: how many genes to keep (more on ties at the cut-off, as scanpy does).

    Returns ``[G]`` bool. Dispersion ``var / mean`` is log-transformed, genes are binned into ``n_bins``
    equal-width bins of ``log1p(mean)``, and dispersions are z-scored within their bin (a bin holding a
    single gene gets normalised dispersion 1); the ``n_top_genes`` highest normalised dispersions win.
    """
    mean = np.where(mean == 0, 1e-12, mean.astype(np.float64))
    disp = var / mean
    disp[disp == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(disp)
    lmean = np.log1p(mean)
    df = pd.DataFrame({"means": lmean, "dispersions": disp})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    one = stats["dev"].isnull()
    stats.loc[one, "dev"] = stats.loc[one, "avg"]
    stats.loc[one, "avg"] = 0
    st = stats.loc[df["mean_bin"]].set_index(df.index)
    norm = ((df["dispersions"] - st["avg"]) / st["dev"]).to_numpy(np.float64)
    norm[n < 2] = np.nan
    finite = norm[~np.isnan(norm)]
    if len(finite) == 0:
        return np.zeros(len(norm), bool)
    k = min(n_top_genes, len(finite))
    cut = np.sort(finite)[::-1][k - 1]
    return np.nan_to_num(norm, nan=-np.inf) >= cut


# --------------------------------------------------------------------------------------------------
# omics: the cohort-level normaliser


def _as_array(v: Any, dtype: Any = np.float64) -> np.ndarray:
    return np.asarray(v, dtype=dtype)


@dataclass
class OmicsNormaliser:
    """Gene panel, per-gene mean/sd and optional pathway tokens, fitted from training-patient summaries.

    Attributes:
        genes: the standardised gene panel ``[G]`` (harmonised identifiers).
        mean, std: ``[G]`` float64 cohort-level training mean and population sd of the log-normalised
            expression (sd 1 where a gene is constant).
        values: ``counts`` or ``log`` (how the file's values are normalised per patient).
        pathways: pathway token names ``[T]`` (empty: one feature per gene).
        pathway_members: per token, indices into ``genes``.
    """

    genes: list[str] = field(default_factory=list)
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    values: str = "counts"
    pathways: list[str] = field(default_factory=list)
    pathway_members: list[list[int]] = field(default_factory=list)

    @property
    def features(self) -> list[str]:
        """Names of the model's omics inputs: pathway tokens when pathways are used, else genes."""
        return list(self.pathways) if self.pathways else list(self.genes)

    @staticmethod
    def site_summary(
        adata, train_ids: list[str], values: str = "counts", min_patients: int = MIN_SUMMARY_PATIENTS
    ) -> dict:
        """Per-gene sufficient statistics of one site's training patients; no per-patient value.

        Returns a dict with ``kind``, ``values`` (str), ``genes`` (list[str], ``G``), ``n_patients``
        (int) and ``[G]`` float64/int64 arrays over the log-normalised expression ``x`` (missing
        values skipped): ``n`` (patients with a value), ``sum`` and ``sumsq`` of ``x`` and
        ``sum_expm1``/``sumsq_expm1`` of ``expm1(x)`` (what scanpy's seurat HVG rule needs).
        Raises ``ValueError`` when fewer than ``min_patients`` training patients have omics.
        """
        have = set(adata.obs_names)
        ids = [i for i in train_ids if i in have]
        if len(ids) < min_patients:
            raise ValueError(
                f"omics summary needs at least {min_patients} training patients with omics, found {len(ids)}"
            )
        x = log_normalise(adata[ids], values)  # (P_site, G)
        ok = ~np.isnan(x)
        x0 = np.where(ok, x, 0.0)
        e0 = np.where(ok, np.expm1(x0), 0.0)
        return {
            "kind": OMICS_SUMMARY,
            "values": values,
            "genes": list(map(str, adata.var_names)),
            "n_patients": len(ids),
            "n": ok.sum(0).astype(np.int64),
            "sum": x0.sum(0),
            "sumsq": (x0**2).sum(0),
            "sum_expm1": e0.sum(0),
            "sumsq_expm1": (e0**2).sum(0),
        }

    @classmethod
    def from_summaries(
        cls,
        summaries: list[dict],
        panel: list[str] | None = None,
        n_top_genes: int | None = None,
        gene_sets: dict[str, list[str]] | None = None,
        min_pathway_genes: int = 1,
    ) -> OmicsNormaliser:
        """The cohort-level normaliser from sites' :meth:`site_summary` dicts.

        Args:
            summaries: one dict per site (at least one).
            panel: restrict to these genes (all must be present at every site).
            n_top_genes: keep this many highly variable genes (scanpy seurat rule) among the candidates.
            gene_sets: name -> genes (e.g. :func:`read_gmt`): features become pathway tokens; genes are
                the union of the sets' members present among the candidates.
            min_pathway_genes: gene sets with fewer members present are dropped (with a warning).
        """
        if not summaries:
            raise ValueError("no site summaries to fit the omics normalisation on")
        for k, s in enumerate(summaries):
            if s.get("kind") != OMICS_SUMMARY:
                raise ValueError(f"summary {k}: not an omics site summary (kind {s.get('kind')!r})")
        vals = {s["values"] for s in summaries}
        if len(vals) > 1:
            raise ValueError(f"sites disagree on omics values: {sorted(vals)}; every site must declare the same")
        common = set(summaries[0]["genes"]).intersection(*(s["genes"] for s in summaries[1:]))
        genes = [g for g in summaries[0]["genes"] if g in common]
        dropped = len(set().union(*(s["genes"] for s in summaries))) - len(genes)
        if dropped:
            log.warning("%d gene(s) are not measured at every site and are left out of the panel", dropped)
        tot: dict[str, np.ndarray] = {}
        for s in summaries:
            pos = {g: k for k, g in enumerate(s["genes"])}
            ix = np.array([pos[g] for g in genes], dtype=int)
            for key in ("n", "sum", "sumsq", "sum_expm1", "sumsq_expm1"):
                tot[key] = tot.get(key, 0) + _as_array(s[key])[ix]
        n = tot["n"]
        cand = np.ones(len(genes), bool)
        if panel is not None:
            pos = {g: k for k, g in enumerate(genes)}
            missing = [g for g in panel if g not in pos]
            if missing:
                raise ValueError(f"{len(missing)} panel gene(s) absent from the omics data, e.g. {missing[:5]}")
            cand = np.zeros(len(genes), bool)
            cand[[pos[g] for g in panel]] = True
        few = cand & (n < 2)
        if few.any():
            log.warning("%d gene(s) have fewer than 2 training values and are left out", int(few.sum()))
            cand &= ~few
        if n_top_genes is not None and n_top_genes < int(cand.sum()):
            c = np.flatnonzero(cand)
            nn = n[c].astype(np.float64)
            m = tot["sum_expm1"][c] / nn
            v = (tot["sumsq_expm1"][c] - nn * m**2) / (nn - 1)
            hv = seurat_hvg(nn, m, np.maximum(v, 0.0), n_top_genes)
            cand = np.zeros(len(genes), bool)
            cand[c[hv]] = True
        sel = np.flatnonzero(cand)
        kept: dict[str, list[str]] = {}
        if gene_sets is not None:
            selected = {genes[i] for i in sel}
            too_small: list[str] = []
            for name, gs in gene_sets.items():
                present = [g for g in gs if g in selected]
                if len(present) >= min_pathway_genes:
                    kept[name] = present
                else:
                    too_small.append(name)
            if too_small:
                log.warning(
                    "%d gene set(s) have fewer than %d genes in the data and are dropped, e.g. %s",
                    len(too_small),
                    min_pathway_genes,
                    too_small[:5],
                )
            if not kept:
                raise ValueError(f"no gene set has at least {min_pathway_genes} gene(s) present in the omics data")
            used = set().union(*kept.values())
            sel = np.array([i for i in sel if genes[i] in used], dtype=int)
        if len(sel) == 0:
            raise ValueError("no gene left in the omics panel")
        nn = n[sel].astype(np.float64)
        mean = tot["sum"][sel] / nn
        var = np.maximum(tot["sumsq"][sel] / nn - mean**2, 0.0)
        sd = np.sqrt(var)
        out = cls(
            [genes[i] for i in sel],
            mean,
            np.where(sd > 1e-6, sd, 1.0),
            summaries[0]["values"],
        )
        if gene_sets is not None:
            pos = {g: k for k, g in enumerate(out.genes)}
            out.pathways = list(kept)
            out.pathway_members = [[pos[g] for g in kept[p]] for p in out.pathways]
        return out

    def fit(
        self,
        adata,
        train_ids: list[str],
        panel: list[str] | None = None,
        max_genes: int | None = None,
        values: str = "counts",
        gene_sets: dict[str, list[str]] | None = None,
        min_pathway_genes: int = 1,
    ) -> OmicsNormaliser:
        """Fit on the pooled training patients of one AnnData (a single site's summary)."""
        s = self.site_summary(adata, train_ids, values)
        f = self.from_summaries([s], panel, max_genes, gene_sets, min_pathway_genes)
        self.__dict__.update(f.__dict__)
        return self

    def transform_genes(self, adata, patient_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Standardised genes ``[P, G]`` float32 and ``present [P]`` (zeros for absent patients; missing
        values get the training mean, i.e. 0)."""
        assert self.mean is not None and self.std is not None, "fit() first"
        pos = {g: k for k, g in enumerate(map(str, adata.var_names))}
        missing = [g for g in self.genes if g not in pos]
        if missing:
            raise ValueError(f"omics data lack {len(missing)} gene(s) of the model's panel, e.g. {missing[:5]}")
        rowpos = {p: k for k, p in enumerate(map(str, adata.obs_names))}
        present = np.array([p in rowpos for p in patient_ids])
        out = np.zeros((len(patient_ids), len(self.genes)), np.float32)
        if present.any():
            rows = [rowpos[p] for p in patient_ids if p in rowpos]
            x = log_normalise(adata[rows], self.values)[:, [pos[g] for g in self.genes]]
            z = (x - self.mean) / self.std
            out[present] = np.nan_to_num(z, nan=0.0).astype(np.float32)
        return out, present

    def transform(self, adata, patient_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``omics [P, F]`` float32 (``F`` = genes, or pathway tokens as the mean of their standardised
        genes) and ``present [P]`` bool for ``patient_ids``."""
        z, present = self.transform_genes(adata, patient_ids)
        if not self.pathways:
            return z, present
        tokens = np.stack([z[:, m].mean(1) for m in self.pathway_members], axis=1)  # (P, T)
        return tokens.astype(np.float32), present

    def state(self) -> dict:
        return {
            "genes": self.genes,
            "mean": self.mean,
            "std": self.std,
            "values": self.values,
            "pathways": self.pathways,
            "pathway_members": self.pathway_members,
        }

    @classmethod
    def from_state(cls, s: dict) -> OmicsNormaliser:
        return cls(
            list(s["genes"]),
            np.asarray(s["mean"]),
            np.asarray(s["std"]),
            s["values"],
            list(s.get("pathways", [])),
            [list(m) for m in s.get("pathway_members", [])],
        )


# --------------------------------------------------------------------------------------------------
# clinical


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


@dataclass
class ClinicalNormaliser:
    """Clinical covariates -> ``clinical [P, C]``: numeric standardised, categorical one-hot, missing indicators.

    Attributes:
        numeric: numeric column names; ``mean``/``std`` ``[len(numeric)]`` from training patients.
        categories: categorical column -> its categories (fixed from training, sorted).
        indicators: columns that get a ``<name>__missing`` 0/1 column (missing in training).
    """

    numeric: list[str] = field(default_factory=list)
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    categories: dict[str, list[str]] = field(default_factory=dict)
    indicators: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        """Output column names: numeric, then ``col=category`` one-hots, then ``col__missing``."""
        return (
            list(self.numeric)
            + [f"{c}={v}" for c, cats in self.categories.items() for v in cats]
            + [f"{c}__missing" for c in self.indicators]
        )

    @staticmethod
    def read(src: ClinicalSource) -> pd.DataFrame:
        """The clinical CSV indexed by patient id: numeric columns float64 (NaN = missing), categorical
        columns str (NaN = missing). Categorical columns are those named in ``src.categorical``; when
        that is not given, every column with a non-numeric value."""
        df = pd.read_csv(src.path, dtype=str, keep_default_na=True)
        if src.id_column not in df.columns:
            raise ValueError(f"{src.path}: id column '{src.id_column}' not in header {list(df.columns)}")
        df[src.id_column] = df[src.id_column].str.strip()
        df = df.set_index(src.id_column)
        cols = list(src.columns) if src.columns else list(df.columns)
        absent = [c for c in cols if c not in df.columns]
        if absent:
            raise ValueError(f"{src.path}: clinical column(s) {absent} not in header {list(df.columns)}")
        cat_decl = list(src.categorical) if src.categorical is not None else None
        if cat_decl is not None:
            bad = [c for c in cat_decl if c not in cols]
            if bad:
                raise ValueError(f"{src.path}: categorical column(s) {bad} are not among the clinical columns {cols}")
        df = df[cols].apply(lambda s: s.str.strip())
        auto_cat = []
        for c in cols:
            vals = df[c].dropna()
            is_num = vals.map(_is_number)
            if cat_decl is not None and c in cat_decl:
                continue
            if is_num.all():
                df[c] = pd.to_numeric(df[c]).astype(np.float64)
            elif cat_decl is not None:
                pid = vals.index[~is_num.to_numpy()][0]
                row = int(np.flatnonzero(df.index == pid)[0]) + 1
                raise ValueError(
                    f"{src.path}, row {row}: field '{c}' = {df.loc[pid, c]!r} (patient '{pid}') is not numeric "
                    "and the column is not listed in categorical"
                )
            else:
                auto_cat.append(c)
        if auto_cat:
            log.info("%s: categorical clinical column(s) (non-numeric values): %s", src.path, auto_cat)
        return df

    @staticmethod
    def site_summary(df: pd.DataFrame, train_ids: list[str], min_patients: int = MIN_SUMMARY_PATIENTS) -> dict:
        """Per-column sufficient statistics of one site's training patients; no per-patient value.

        Returns a dict with ``kind``, ``n_patients`` (int), ``columns`` (list[str]: every column, in
        order), ``numeric`` (``{"columns": [C], "n": [C] int64, "sum": [C], "sumsq": [C]}`` over observed
        values), ``categorical`` (column -> {category: count}) and ``missing`` (column -> count).
        """
        ids = [i for i in train_ids if i in df.index]
        if len(ids) < min_patients:
            raise ValueError(
                f"clinical summary needs at least {min_patients} training patients with clinical data, found {len(ids)}"
            )
        d = df.loc[ids]
        num = [c for c in d.columns if pd.api.types.is_numeric_dtype(d[c]) and not pd.api.types.is_bool_dtype(d[c])]
        x = d[num].to_numpy(np.float64)
        ok = ~np.isnan(x)
        x0 = np.where(ok, x, 0.0)
        return {
            "kind": CLINICAL_SUMMARY,
            "n_patients": len(ids),
            "columns": list(d.columns),
            "numeric": {"columns": num, "n": ok.sum(0).astype(np.int64), "sum": x0.sum(0), "sumsq": (x0**2).sum(0)},
            "categorical": {
                c: {str(k): int(v) for k, v in d[c].value_counts().items()} for c in d.columns if c not in num
            },
            "missing": {c: int(d[c].isna().sum()) for c in d.columns},
        }

    @classmethod
    def from_summaries(cls, summaries: list[dict]) -> ClinicalNormaliser:
        """The cohort-level clinical normaliser from sites' :meth:`site_summary` dicts."""
        if not summaries:
            raise ValueError("no site summaries to fit the clinical normalisation on")
        for k, s in enumerate(summaries):
            if s.get("kind") != CLINICAL_SUMMARY:
                raise ValueError(f"summary {k}: not a clinical site summary (kind {s.get('kind')!r})")
        cols = summaries[0]["columns"]
        for k, s in enumerate(summaries[1:], start=1):
            if s["columns"] != cols:
                raise ValueError(f"site summary {k} has clinical columns {s['columns']}, site 0 has {cols}")
        kinds = [set(s["numeric"]["columns"]) for s in summaries]
        numeric = [c for c in cols if all(c in k for k in kinds)]
        for c in cols:
            if c not in numeric and any(c in k for k in kinds):
                raise ValueError(
                    f"clinical column '{c}' is numeric at some sites and categorical at others; "
                    "list it in the clinical section's categorical to treat it as categorical everywhere"
                )
        n = np.zeros(len(numeric))
        sm = np.zeros(len(numeric))
        sq = np.zeros(len(numeric))
        for s in summaries:
            pos = {c: k for k, c in enumerate(s["numeric"]["columns"])}
            ix = np.array([pos[c] for c in numeric], dtype=int)
            n += _as_array(s["numeric"]["n"])[ix]
            sm += _as_array(s["numeric"]["sum"])[ix]
            sq += _as_array(s["numeric"]["sumsq"])[ix]
        empty = [c for c, k in zip(numeric, n, strict=True) if k == 0]
        if empty:
            raise ValueError(f"clinical column(s) {empty} have no value in any training patient")
        mean = sm / n
        sd = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
        cats: dict[str, list[str]] = {}
        for c in cols:
            if c in numeric:
                continue
            counts: Counter[str] = Counter()
            for s in summaries:
                counts.update(s["categorical"].get(c, {}))
            if not counts:
                raise ValueError(f"categorical clinical column '{c}' has no value in any training patient")
            cats[c] = sorted(k for k, v in counts.items() if v > 0)
        missing = [c for c in cols if sum(s["missing"].get(c, 0) for s in summaries) > 0]
        return cls(numeric, mean, np.where(sd > 1e-9, sd, 1.0), cats, missing)

    def fit(self, df: pd.DataFrame, train_ids: list[str]) -> ClinicalNormaliser:
        """Fit on the pooled training patients (a single summary)."""
        f = self.from_summaries([self.site_summary(df, train_ids)])
        self.__dict__.update(f.__dict__)
        return self

    def transform(self, df: pd.DataFrame, patient_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``clinical [P, C]`` float32 in :attr:`columns` order and ``present [P]`` bool."""
        assert self.mean is not None and self.std is not None, "fit() first"
        need = [*self.numeric, *self.categories]
        absent = [c for c in need if c not in df.columns]
        if absent:
            raise ValueError(f"clinical data lack the model's column(s) {absent}")
        present = np.array([p in df.index for p in patient_ids])
        out = np.zeros((len(patient_ids), len(self.columns)), np.float32)
        if not present.any():
            return out, present
        d = df.loc[[p for p in patient_ids if p in df.index]]
        parts = []
        if self.numeric:
            x = pd.DataFrame({c: pd.to_numeric(d[c], errors="coerce") for c in self.numeric}).to_numpy(np.float64)
            bad = np.isnan(x) & d[self.numeric].notna().to_numpy()
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise ValueError(
                    f"clinical field '{self.numeric[j]}' = {d.iloc[i][self.numeric[j]]!r} (patient "
                    f"'{d.index[i]}') is not numeric, but the model treats it as numeric"
                )
            for j in np.flatnonzero(np.isnan(x).any(0)):
                c = self.numeric[j]
                if c not in self.indicators:
                    log.warning(
                        "clinical column '%s': %d missing value(s) but none in training; imputed with the "
                        "training mean (the model has no missing indicator for it)",
                        c,
                        int(np.isnan(x[:, j]).sum()),
                    )
            parts.append(np.nan_to_num((x - self.mean) / self.std, nan=0.0))  # missing -> training mean
        for c, cats in self.categories.items():
            v = d[c].map(lambda s: s if pd.isna(s) else str(s))
            onehot = np.stack([(v == k).to_numpy() for k in cats], axis=1).astype(np.float64)
            unseen = v.notna() & ~v.isin(cats)
            if unseen.any():
                log.warning(
                    "clinical column '%s': %d patient(s) with a category unseen in training (e.g. %r): encoded "
                    "as all-zero",
                    c,
                    int(unseen.sum()),
                    v[unseen].iloc[0],
                )
            parts.append(onehot)
        if self.indicators:
            parts.append(np.stack([d[c].isna().to_numpy() for c in self.indicators], axis=1).astype(np.float64))
        out[present] = np.concatenate(parts, axis=1).astype(np.float32)
        return out, present

    def state(self) -> dict:
        return {
            "numeric": self.numeric,
            "mean": self.mean,
            "std": self.std,
            "categories": self.categories,
            "indicators": self.indicators,
            "columns": self.columns,
        }

    @classmethod
    def from_state(cls, s: dict) -> ClinicalNormaliser:
        numeric = list(s["numeric"]) if "numeric" in s else list(s["columns"])  # older bundles: numeric only
        return cls(
            numeric,
            np.asarray(s["mean"]),
            np.asarray(s["std"]),
            {k: list(v) for k, v in s.get("categories", {}).items()},
            list(s.get("indicators", [])),
        )
