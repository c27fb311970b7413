"""Gene expression and clinical covariates: read, align to the cohort, normalise with training statistics.

Omics: counts -> ``scanpy.pp.normalize_total`` + ``log1p`` per patient (no fitted state), then each gene
standardised with the mean and sd of the *training* patients. The gene panel (a panel file, or every
gene, or the most variable genes on training patients) is fixed at fit time, saved with the model and
required again at prediction time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_specs.cohort import ClinicalSource, OmicsSource

log = logging.getLogger(__name__)


def read_omics(src: OmicsSource):  # -> anndata.AnnData (patients x genes)
    """Read an omics file as AnnData with patients as ``obs_names`` and genes as ``var_names``."""
    import anndata as ad

    fmt = src.resolved_format()
    if fmt == "h5ad":
        adata = ad.read_h5ad(src.path)
    else:
        df = pd.read_csv(src.path, sep="\t" if fmt == "tsv" else ",", index_col=0)
        bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            col = bad[0]
            row = df.index[pd.to_numeric(df[col], errors="coerce").isna()][0]
            raise ValueError(f"{src.path}: gene column '{col}' is not numeric (patient '{row}': {df.loc[row, col]!r})")
        adata = ad.AnnData(
            X=df.to_numpy(np.float32),
            obs=pd.DataFrame(index=df.index.astype(str)),
            var=pd.DataFrame(index=df.columns.astype(str)),
        )
    adata.obs_names = adata.obs_names.astype(str)
    if not adata.var_names.is_unique:
        raise ValueError(
            f"{src.path}: duplicate gene names, e.g. {adata.var_names[adata.var_names.duplicated()][:3].tolist()}"
        )
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    if not np.isfinite(x).all():
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(
            f"{src.path}: missing or infinite value for patient '{adata.obs_names[i]}', gene '{adata.var_names[j]}'"
        )
    if src.values == "counts" and (x < 0).any():
        i, j = np.argwhere(x < 0)[0]
        raise ValueError(
            f"{src.path}: negative count {x[i, j]} for patient '{adata.obs_names[i]}', gene "
            f"'{adata.var_names[j]}' (values: counts); set values: log for already-log data"
        )
    adata.X = x.astype(np.float32)
    return adata


def _log_normalise(adata, values: str) -> np.ndarray:
    import scanpy as sc

    a = adata.copy()
    if values == "counts":
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    return np.asarray(a.X, dtype=np.float32)


@dataclass
class OmicsNormaliser:
    """Gene panel + per-gene mean/sd fitted on training patients. ``state()`` round-trips through checkpoints."""

    genes: list[str] = field(default_factory=list)
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    values: str = "counts"

    def fit(
        self,
        adata,
        train_ids: list[str],
        panel: list[str] | None = None,
        max_genes: int | None = None,
        values: str = "counts",
    ) -> OmicsNormaliser:
        have_ids, have_genes = set(adata.obs_names), set(adata.var_names)
        ids = [i for i in train_ids if i in have_ids]
        if len(ids) < 2:
            raise ValueError(f"need omics for at least 2 training patients to fit normalisation, found {len(ids)}")
        self.values = values
        genes = list(adata.var_names) if panel is None else list(panel)
        missing = [g for g in genes if g not in have_genes]
        if missing:
            raise ValueError(f"{len(missing)} panel gene(s) absent from the omics file, e.g. {missing[:5]}")
        x = _log_normalise(adata[ids], values)
        x = pd.DataFrame(x, columns=list(adata.var_names))[genes].to_numpy()
        if max_genes is not None and max_genes < len(genes):
            top = np.argsort(-x.var(axis=0), kind="stable")[:max_genes]
            top.sort()
            genes, x = [genes[i] for i in top], x[:, top]
        self.genes = genes
        self.mean = x.mean(axis=0)
        self.std = np.where(x.std(axis=0) > 1e-6, x.std(axis=0), 1.0)
        return self

    def transform(self, adata, patient_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Standardised ``omics [P, G]`` and ``present [P]`` for ``patient_ids`` (zeros where absent)."""
        assert self.mean is not None and self.std is not None, "fit() first"
        have_genes = set(adata.var_names)
        missing = [g for g in self.genes if g not in have_genes]
        if missing:
            raise ValueError(f"omics file lacks {len(missing)} gene(s) of the model's panel, e.g. {missing[:5]}")
        x = pd.DataFrame(
            _log_normalise(adata, self.values), index=list(adata.obs_names), columns=list(adata.var_names)
        )[self.genes]
        out = np.zeros((len(patient_ids), len(self.genes)), np.float32)
        present = np.array([p in x.index for p in patient_ids])
        if present.any():
            rows = x.loc[[p for p in patient_ids if p in x.index]].to_numpy()
            out[present] = ((rows - self.mean) / self.std).astype(np.float32)
        return out, present

    def state(self) -> dict:
        return {"genes": self.genes, "mean": self.mean, "std": self.std, "values": self.values}

    @classmethod
    def from_state(cls, s: dict) -> OmicsNormaliser:
        return cls(list(s["genes"]), np.asarray(s["mean"]), np.asarray(s["std"]), s["values"])


@dataclass
class ClinicalNormaliser:
    """Numeric clinical covariates standardised on training patients; missing values -> training mean."""

    columns: list[str] = field(default_factory=list)
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @staticmethod
    def read(src: ClinicalSource) -> pd.DataFrame:
        df = pd.read_csv(src.path, dtype={src.id_column: str})
        df = df.set_index(src.id_column)
        cols = list(src.columns) if src.columns else list(df.columns)
        absent = [c for c in cols if c not in df.columns]
        if absent:
            raise ValueError(f"{src.path}: clinical column(s) {absent} not in header {list(df.columns)}")
        df = df[cols]
        for c in cols:
            num = pd.to_numeric(df[c], errors="coerce")
            bad = num.isna() & df[c].notna()
            if bad.any():
                pid = df.index[bad][0]
                row = int(np.flatnonzero(bad.to_numpy())[0]) + 1
                raise ValueError(
                    f"{src.path}, row {row}: field '{c}' = {df.loc[pid, c]!r} (patient '{pid}') is "
                    "not numeric; encode categories as numbers or one-hot columns"
                )
            df[c] = num.astype(np.float64)
        return df

    def fit(self, df: pd.DataFrame, train_ids: list[str]) -> ClinicalNormaliser:
        x = df.loc[[i for i in train_ids if i in df.index]].to_numpy(np.float64)
        if len(x) < 2:
            raise ValueError(f"need clinical data for at least 2 training patients, found {len(x)}")
        self.columns = list(df.columns)
        self.mean = np.nanmean(x, axis=0)
        sd = np.nanstd(x, axis=0)
        self.std = np.where(sd > 1e-9, sd, 1.0)
        return self

    def transform(self, df: pd.DataFrame, patient_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        assert self.mean is not None and self.std is not None, "fit() first"
        absent = [c for c in self.columns if c not in df.columns]
        if absent:
            raise ValueError(f"clinical data lacks the model's column(s) {absent}")
        out = np.zeros((len(patient_ids), len(self.columns)), np.float32)
        present = np.array([p in df.index for p in patient_ids])
        if present.any():
            x = df.loc[[p for p in patient_ids if p in df.index], self.columns].to_numpy(np.float64)
            x = np.where(np.isnan(x), self.mean, x)
            out[present] = ((x - self.mean) / self.std).astype(np.float32)
        return out, present

    def state(self) -> dict:
        return {"columns": self.columns, "mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, s: dict) -> ClinicalNormaliser:
        return cls(list(s["columns"]), np.asarray(s["mean"]), np.asarray(s["std"]))


def read_panel(path: Path) -> list[str]:
    genes = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not genes:
        raise ValueError(f"{path}: gene panel file lists no genes")
    return genes
