"""Clinical covariates: read the clinical CSV (with the cohort's shared CSV reader) and turn it into
``clinical [P, C]``: numeric columns standardised, categorical columns one-hot, missing indicators, all
fitted from per-site summaries (:class:`ClinicalNormaliser`)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_specs.cohort import ClinicalSource
from data_specs.summaries import MIN_SUMMARY_PATIENTS, ClinicalNumericStats, ClinicalSiteSummary
from data_specs.tables import is_number, read_csv_frame

log = logging.getLogger(__name__)


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
        df = read_csv_frame(src.path)  # the cohort's CSV reader: BOM, `;` or `,`, repeated names refused
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
            is_num = vals.map(is_number)
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
    def site_summary(
        df: pd.DataFrame, train_ids: list[str], min_patients: int = MIN_SUMMARY_PATIENTS
    ) -> ClinicalSiteSummary:
        """Per-column sufficient statistics of one site's training patients; no per-patient value.

        Returns a :class:`ClinicalSiteSummary`: ``n_patients``, ``columns`` (every column, in order),
        ``numeric`` (``columns [C]``, ``n [C]`` int64, ``sum``/``sumsq [C]`` over observed values),
        ``categorical`` (column -> {category: count}) and ``missing`` (column -> count).
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
        return ClinicalSiteSummary(
            n_patients=len(ids),
            columns=list(map(str, d.columns)),
            numeric=ClinicalNumericStats(
                columns=list(map(str, num)), n=ok.sum(0).astype(np.int64), sum=x0.sum(0), sumsq=(x0**2).sum(0)
            ),
            categorical={
                str(c): {str(k): int(v) for k, v in d[c].value_counts().items()} for c in d.columns if c not in num
            },
            missing={str(c): int(d[c].isna().sum()) for c in d.columns},
        )

    @classmethod
    def from_summaries(cls, summaries: list[ClinicalSiteSummary]) -> ClinicalNormaliser:
        """The cohort-level clinical normaliser from sites' :meth:`site_summary` summaries."""
        if not summaries:
            raise ValueError("no site summaries to fit the clinical normalisation on")
        for k, s in enumerate(summaries):
            if not isinstance(s, ClinicalSiteSummary):
                raise ValueError(f"summary {k}: not a clinical site summary ({type(s).__name__})")
        cols = summaries[0].columns
        for k, s in enumerate(summaries[1:], start=1):
            if s.columns != cols:
                raise ValueError(f"site summary {k} has clinical columns {s.columns}, site 0 has {cols}")
        kinds = [set(s.numeric.columns) for s in summaries]
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
            pos = {c: k for k, c in enumerate(s.numeric.columns)}
            ix = np.array([pos[c] for c in numeric], dtype=int)
            n += np.asarray(s.numeric.n, np.float64)[ix]
            sm += np.asarray(s.numeric.sum, np.float64)[ix]
            sq += np.asarray(s.numeric.sumsq, np.float64)[ix]
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
                counts.update(s.categorical.get(c, {}))
            if not counts:
                raise ValueError(f"categorical clinical column '{c}' has no value in any training patient")
            cats[c] = sorted(k for k, v in counts.items() if v > 0)
        missing = [c for c in cols if sum(s.missing.get(c, 0) for s in summaries) > 0]
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
