"""Omics normalisation, and the cohort statistics fitted from site summaries (no patient values pooled).

Owns :class:`OmicsNormaliser` (gene panel, HVG selection, per-gene mean/sd, pathway tokens) and the two
functions every run uses for cohort-level statistics, embedded and deployed alike: :func:`site_summaries`
(what one site shares about its training patients) and :func:`fit_normalisers` (the cohort-level omics and
clinical normalisers from those summaries).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import data_specs.summaries as ds
from data_specs.summaries import MIN_SUMMARY_PATIENTS, OmicsSiteSummary, SiteSummary
from pipeline.omics.clinical import ClinicalNormaliser
from pipeline.omics.readers import log_normalise, read_gmt, read_panel

log = logging.getLogger(__name__)


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


@dataclass
class OmicsNormaliser:
    """Gene panel, per-gene mean/sd and optional pathway tokens, fitted from training-patient summaries.

    Attributes:
        genes: the standardised gene panel ``[G]`` (harmonised identifiers).
        mean, std: ``[G]`` float64 cohort-level training mean and population sd of the log expression (sd 1: constant).
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
    ) -> OmicsSiteSummary:
        """Per-gene sufficient statistics of one site's training patients; no per-patient value.

        Returns an :class:`OmicsSiteSummary`: ``values``, ``genes [G]``, ``n_patients`` and ``[G]``
        float64/int64 arrays over the log-normalised expression ``x`` (missing
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
        return OmicsSiteSummary(
            values=values,
            genes=list(map(str, adata.var_names)),
            n_patients=len(ids),
            n=ok.sum(0).astype(np.int64),
            sum=x0.sum(0),
            sumsq=(x0**2).sum(0),
            sum_expm1=e0.sum(0),
            sumsq_expm1=(e0**2).sum(0),
        )

    @classmethod
    def from_summaries(
        cls,
        summaries: list[OmicsSiteSummary],
        panel: list[str] | None = None,
        n_top_genes: int | None = None,
        gene_sets: dict[str, list[str]] | None = None,
        min_pathway_genes: int = 1,
    ) -> OmicsNormaliser:
        """The cohort-level normaliser from sites' :meth:`site_summary` summaries.

        Args:
            summaries: one per site (at least one).
            panel: restrict to these genes (all must be present at every site).
            n_top_genes: keep this many highly variable genes (scanpy seurat rule) among the candidates.
            gene_sets: name -> genes (e.g. :func:`read_gmt`): features become pathway tokens; genes are
                the union of the sets' members present among the candidates.
            min_pathway_genes: gene sets with fewer members present are dropped (with a warning).
        """
        genes, tot = _pooled_totals(summaries)
        cand = _candidates(genes, tot, panel, n_top_genes)
        sel = np.flatnonzero(cand)
        kept: dict[str, list[str]] = {}
        if gene_sets is not None:
            kept = _kept_gene_sets({genes[i] for i in sel}, gene_sets, min_pathway_genes)
            used = set().union(*kept.values())
            sel = np.array([i for i in sel if genes[i] in used], dtype=int)
        if len(sel) == 0:
            raise ValueError("no gene left in the omics panel")
        nn = tot["n"][sel].astype(np.float64)
        mean = tot["sum"][sel] / nn
        var = np.maximum(tot["sumsq"][sel] / nn - mean**2, 0.0)
        sd = np.sqrt(var)
        out = cls(
            [genes[i] for i in sel],
            mean,
            np.where(sd > 1e-6, sd, 1.0),
            summaries[0].values,
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

    def log_expression(self, z: np.ndarray) -> np.ndarray:
        """The log-normalised expression ``[P, G]`` float32 behind standardised genes ``z [P, G]`` (as from
        :meth:`transform_genes`; a missing value comes back as the training mean): ``z * std + mean``, with
        the rounding below 0 of ``log1p`` counts clipped."""
        assert self.mean is not None and self.std is not None, "fit() first"
        x = np.asarray(z, np.float64) * self.std + self.mean
        return (np.maximum(x, 0.0) if self.values == "counts" else x).astype(np.float32)

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


def _pooled_totals(summaries: list[OmicsSiteSummary]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Genes measured at every site (first site's order) and the sites' summed ``[G]`` statistics."""
    if not summaries:
        raise ValueError("no site summaries to fit the omics normalisation on")
    for k, s in enumerate(summaries):
        if not isinstance(s, OmicsSiteSummary):
            raise ValueError(f"summary {k}: not an omics site summary ({type(s).__name__})")
    vals = {s.values for s in summaries}
    if len(vals) > 1:
        raise ValueError(f"sites disagree on omics values: {sorted(vals)}; every site must declare the same")
    common = set(summaries[0].genes).intersection(*(s.genes for s in summaries[1:]))
    observed = {g for s in summaries for g, n in zip(s.genes, np.asarray(s.n), strict=True) if n > 0}
    if common - observed:  # every site suppressed them (fewer than k patients with a value at each)
        log.warning(
            "%d gene(s) have a value at no site after small-count suppression: left out", len(common - observed)
        )
    genes = [g for g in summaries[0].genes if g in common and g in observed]
    dropped = len(set().union(*(s.genes for s in summaries))) - len(genes)
    if dropped:
        log.warning("%d gene(s) are not measured at every site and are left out of the panel", dropped)
    tot: dict[str, np.ndarray] = {}
    for s in summaries:
        pos = {g: k for k, g in enumerate(s.genes)}
        ix = np.array([pos[g] for g in genes], dtype=int)
        for key in ("n", "sum", "sumsq", "sum_expm1", "sumsq_expm1"):
            tot[key] = tot.get(key, 0) + np.asarray(getattr(s, key), np.float64)[ix]
    return genes, tot


def _candidates(
    genes: list[str], tot: dict[str, np.ndarray], panel: list[str] | None, n_top_genes: int | None
) -> np.ndarray:
    """``[G]`` bool: the panel's genes (or all) with 2+ training values, then the top HVGs among them."""
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
    return cand


def _kept_gene_sets(
    selected: set[str], gene_sets: dict[str, list[str]], min_pathway_genes: int
) -> dict[str, list[str]]:
    """Gene sets with at least ``min_pathway_genes`` members among ``selected`` (their present members)."""
    kept: dict[str, list[str]] = {}
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
    return kept


def site_summaries(
    site: str,
    train_ids: list[str],
    adata=None,
    omics_values: str = "counts",
    clinical: pd.DataFrame | None = None,
    min_count: int | None = None,
) -> dict[str, SiteSummary]:
    """What one site shares about its own training patients: ``{"omics": ..., "clinical": ...}``.

    Args:
        site: the site's name (for messages).
        train_ids: the site's training patients.
        adata: its omics (AnnData, patients x genes), or None.
        omics_values: ``counts`` or ``log``.
        clinical: its clinical table (index = patient id, :meth:`ClinicalNormaliser.read`), or None.
        min_count: k (``federated.min_count``; None: a centralised run, 2 patients): a modality under k training
            patients is left out and every cell under k suppressed (:func:`data_specs.summaries.suppress_small_cells`).

    A modality with fewer than ``MIN_SUMMARY_PATIENTS`` (or k) training patients is left out, warning naming the site.
    """
    floor = max(MIN_SUMMARY_PATIENTS, min_count or 0)
    out: dict[str, SiteSummary] = {}
    for kind, have in (("omics", adata), ("clinical", clinical)):
        if have is None:
            continue
        index = set(map(str, have.obs_names)) if kind == "omics" else set(map(str, have.index))
        ids = [i for i in train_ids if i in index]
        if len(ids) < floor:
            if ids:
                msg = "site %s: %d training patient(s) with %s data, fewer than %d: its summary is left out"
                log.warning(msg, site, len(ids), kind, floor)
            continue
        if kind == "omics":
            summary: SiteSummary = OmicsNormaliser.site_summary(adata, ids, omics_values)
        else:
            summary = ClinicalNormaliser.site_summary(clinical, ids)
        if min_count is not None:
            summary, notes = ds.suppress_small_cells(summary, min_count)
            if notes:
                msg = "site %s: %d %s summary cell(s) of 1..%d patients suppressed (federated.min_count): %s"
                log.warning(msg, site, len(notes), kind, min_count - 1, ", ".join(notes[:10]))
        out[kind] = summary
    return out


def fit_normalisers(
    summaries: list[dict[str, SiteSummary]],
    gene_panel: Path | str | list[str] | None = None,
    max_genes: int | None = None,
    gene_sets: Path | str | dict[str, list[str]] | None = None,
    min_pathway_genes: int = 3,
    require: tuple[str, ...] = (),
) -> tuple[OmicsNormaliser | None, ClinicalNormaliser | None]:
    """The cohort-level normalisers from every site's :func:`site_summaries` (no patient values).

    Args:
        summaries: one dict per site (a site may lack a modality).
        gene_panel / gene_sets: a file (read here) or the list / mapping itself.
        max_genes, min_pathway_genes: as in :meth:`OmicsNormaliser.from_summaries`.
        require: modalities that must be fitted (``ValueError`` when no site summarised one).

    Returns ``(omics, clinical)``; None for a modality no site summarised.
    """
    omics: list[Any] = [s["omics"] for s in summaries if "omics" in s]  # each from_summaries checks the type
    clinical: list[Any] = [s["clinical"] for s in summaries if "clinical" in s]
    for kind, got in (("omics", omics), ("clinical", clinical)):  # a site under k sent none (see its warning)
        if kind in require and not got:
            raise ValueError(
                f"no site sent a {kind} summary, so it cannot be normalised: a site needs {MIN_SUMMARY_PATIENTS}+"
                f" training patients with {kind} data (federated runs: federated.min_count, default 10)"
            )
    o_norm = c_norm = None
    if omics:
        panel = read_panel(gene_panel) if isinstance(gene_panel, Path | str) else gene_panel
        sets = read_gmt(gene_sets) if isinstance(gene_sets, Path | str) else gene_sets
        o_norm = OmicsNormaliser.from_summaries(omics, panel, max_genes, sets, min_pathway_genes)
    if clinical:
        clinical, empty = ds.drop_empty_columns(clinical)  # suppressed (fewer than k patients) at every site
        if empty:
            log.warning("clinical column(s) %s: no value at any site after suppression: left out", empty)
        c_norm = ClinicalNormaliser.from_summaries(clinical)
    return o_norm, c_norm
