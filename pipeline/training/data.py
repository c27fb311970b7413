"""Patients as bags: tile features, omics and clinical vectors, outcome, site; splits; batching.

``build_data`` turns a validated cohort plus its features folder into a :class:`CohortData` (all
modalities aligned to the cohort's patient order, omics/clinical standardised with statistics fitted
on the training patients only). ``load_bags`` reads the features files once into :class:`Bags`, which
``build_data`` can reuse (cross-validation builds one ``CohortData`` per fold from the same bags).
``make_loader`` pads bags into ``features [B, N, D]`` + ``mask [B, N]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_specs.artifacts import FeatureAttrs
from data_specs.cohort import Cohort
from data_specs.config import RunConfig
from pipeline.omics.clinical import ClinicalNormaliser
from pipeline.omics.normalise import OmicsNormaliser, fit_normalisers, site_summaries
from pipeline.omics.readers import read_omics
from pipeline.slides.features import features_dir, load_features, slide_id_of
from pipeline.training.splits import assign_splits

log = logging.getLogger(__name__)


@dataclass
class CohortData:
    """Everything the model sees, in cohort order. Index arrays (``splits``) select patients.

    Attributes:
        bags: per patient ``features [N_i, D]`` float32 (all slides concatenated; ``N_i`` may be 0).
        tiles: per patient ``[(slide_id, x, y), ...]`` aligned with ``bags``.
        omics: ``[P, G]`` float32; omics_present ``[P]`` bool. clinical/clinical_present likewise.
            With gene sets, ``G`` is the number of pathway tokens ``T`` and ``genes`` their names.
        genes: names of the omics columns (genes, or pathway tokens).
        pathways: pathway token names ``[T]`` (empty without gene sets); pathway_genes: per token, its
            member genes (standardised genes averaged into the token).
        time ``[P]`` float32, event ``[P]`` bool, site ``[P]`` int (index into ``sites``).
    """

    patient_ids: list[str]
    sites: list[str]
    site: np.ndarray
    time: np.ndarray
    event: np.ndarray
    splits: dict[str, np.ndarray]
    bags: list[np.ndarray] | None = None
    tiles: list[list[tuple[str, int, int]]] | None = None
    feature_dim: int = 0
    feature_attrs: FeatureAttrs | None = None
    omics: np.ndarray | None = None
    omics_present: np.ndarray | None = None
    genes: list[str] = field(default_factory=list)
    pathways: list[str] = field(default_factory=list)
    pathway_genes: list[list[str]] = field(default_factory=list)
    clinical: np.ndarray | None = None
    clinical_present: np.ndarray | None = None
    clinical_columns: list[str] = field(default_factory=list)
    omics_norm: OmicsNormaliser | None = None
    clinical_norm: ClinicalNormaliser | None = None

    @property
    def n_genes(self) -> int:
        return 0 if self.omics is None else self.omics.shape[1]

    @property
    def n_clinical(self) -> int:
        return 0 if self.clinical is None else self.clinical.shape[1]

    def model_dims(self) -> dict[str, int]:
        return {"feature_dim": self.feature_dim, "n_genes": self.n_genes, "n_clinical": self.n_clinical}

    def subset_sites(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {s: idx[self.site[idx] == k] for k, s in enumerate(self.sites)}


@dataclass(frozen=True)
class Bags:
    """Each patient's tiles as read from the features files of its slides, in cohort order.

    Attributes:
        features: per patient ``[N_i, D]`` float32 (all slides concatenated; ``N_i`` may be 0).
        tiles: per patient ``[(slide_id, x, y), ...]`` aligned with ``features``.
        attrs: the features-file attributes shared by every slide (encoder identity, ``dim``).
    """

    features: list[np.ndarray]
    tiles: list[list[tuple[str, int, int]]]
    attrs: FeatureAttrs

    @property
    def dim(self) -> int:
        return self.attrs.dim


def build_data(
    cohort: Cohort,
    features_dir: Path | None,
    splits: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.25,
    gene_panel: Path | list[str] | None = None,
    max_genes: int | None = None,
    omics_norm: OmicsNormaliser | None = None,
    clinical_norm: ClinicalNormaliser | None = None,
    expect_features: FeatureAttrs | None = None,
    gene_sets: Path | dict[str, list[str]] | None = None,
    min_pathway_genes: int = 3,
    bags: Bags | None = None,
    test_sites: tuple[str, ...] | list[str] = (),
    min_count: int | None = None,
) -> CohortData:
    """Align every modality to the cohort. ``expect_features``: the encoder identity every features file must carry.

    ``bags``: tile features already read by :func:`load_bags` for this cohort (the features files are then
    not opened again); without them they are read from ``features_dir``. ``test_sites``: sites whose patients
    are test only (:func:`~pipeline.training.splits.assign_splits`; used when ``splits`` is not given).

    Normalisers are given (prediction reuses the model's) or fitted on the train split the way a
    federation fits them: each site summarises its own training patients
    (:meth:`OmicsNormaliser.site_summary`, :meth:`ClinicalNormaliser.site_summary`) and the cohort-level
    statistics come from those summaries only; raw values are never pooled across sites. A site with
    fewer than 2 training patients for a modality contributes no summary (a warning): a one-patient
    summary would be that patient's values. A site without training patients (a test-only site) contributes
    nothing to the statistics. ``min_count``: a federated run's k; summary cells under k suppressed, as a site does.
    """
    pids = [p.patient_id for p in cohort.patients]
    sites = cohort.sites
    site = np.array([sites.index(p.site) for p in cohort.patients])
    splits = splits if splits is not None else assign_splits(cohort, val_fraction, test_fraction, seed, test_sites)
    data = CohortData(
        pids,
        sites,
        site,
        np.array([p.time for p in cohort.patients], np.float32),
        np.array([p.event for p in cohort.patients], bool),
        splits,
    )
    if bags is None and any(p.slides for p in cohort.patients):
        if features_dir is None:
            raise ValueError("the cohort has slides: give the features folder (run `histofuse extract` first)")
        bags = load_bags(cohort, Path(features_dir), expect_features)
    if bags is not None:
        if len(bags.features) != len(pids):
            raise ValueError(f"bags: {len(bags.features)} patients given for a cohort of {len(pids)}")
        data.bags, data.tiles = list(bags.features), list(bags.tiles)
        data.feature_dim, data.feature_attrs = bags.dim, bags.attrs
    per_site = data.subset_sites(np.asarray(splits["train"], int)).items()
    site_train = {s: [pids[i] for i in idx] for s, idx in per_site if len(idx)}  # test-only sites: no summary
    if cohort.omics is not None:
        _add_omics(data, cohort, site_train, omics_norm, gene_panel, max_genes, gene_sets, min_pathway_genes, min_count)
    if cohort.clinical is not None:
        _add_clinical(data, cohort, site_train, clinical_norm, min_count)
    return data


def load_bags(cohort: Cohort, fdir: Path, expect: FeatureAttrs | None = None) -> Bags:
    """Each patient's tiles from the features files of its slides, each file read once.

    A missing file: that slide is left out (warned). ``expect``: the encoder identity every file must carry.

    Raises:
        ValueError: no features file at all, or slides encoded by different encoders.
    """
    bags, tiles = [], []
    ref: FeatureAttrs | None = None
    for p in cohort.patients:
        feats, tl = [], []
        for s in p.slides:
            sid = slide_id_of(s)
            fpath = fdir / f"{sid}.h5"
            if not fpath.is_file():
                log.warning("patient %s: no features for slide %s (%s); slide left out", p.patient_id, sid, fpath)
                continue
            f, c, raw = load_features(fpath, expect.identity() if expect else None)
            attrs = FeatureAttrs.from_h5_attrs(raw)
            if ref is None:
                ref = attrs
            elif not attrs.same_encoder(ref):
                raise ValueError(
                    f"{fpath}: encoder {attrs.encoder}/{attrs.weights} differs from "
                    f"{ref.encoder}/{ref.weights} used by other slides"
                )
            feats.append(f)
            tl += [(sid, int(x), int(y)) for x, y in c]
        bags.append(np.concatenate(feats) if feats else None)
        tiles.append(tl)
    if ref is None:
        raise ValueError(f"no features file found in {fdir} for any slide of the cohort")
    return Bags([b if b is not None else np.zeros((0, ref.dim), np.float32) for b in bags], tiles, ref)


def _add_omics(
    data: CohortData,
    cohort: Cohort,
    site_train: dict[str, list[str]],
    omics_norm: OmicsNormaliser | None,
    gene_panel: Path | list[str] | None,
    max_genes: int | None,
    gene_sets: Path | dict[str, list[str]] | None,
    min_pathway_genes: int,
    min_count: int | None = None,
) -> None:
    """Standardised omics ``[P, G]`` (normaliser given, or fitted from per-site training summaries)."""
    assert cohort.omics is not None
    adata = read_omics(cohort.omics, data.patient_ids)
    if omics_norm is None:
        summaries = [
            site_summaries(s, ids, adata, cohort.omics.values, min_count=min_count) for s, ids in site_train.items()
        ]
        omics_norm, _ = fit_normalisers(summaries, gene_panel, max_genes, gene_sets, min_pathway_genes, ("omics",))
    assert omics_norm is not None
    data.omics, data.omics_present = omics_norm.transform(adata, data.patient_ids)
    data.genes, data.omics_norm = omics_norm.features, omics_norm
    data.pathways = list(omics_norm.pathways)
    data.pathway_genes = [[omics_norm.genes[k] for k in m] for m in omics_norm.pathway_members]


def _add_clinical(
    data: CohortData,
    cohort: Cohort,
    site_train: dict[str, list[str]],
    clinical_norm: ClinicalNormaliser | None,
    min_count: int | None = None,
) -> None:
    """Standardised / one-hot clinical ``[P, C]`` (normaliser given, or fitted from per-site summaries)."""
    assert cohort.clinical is not None
    df = ClinicalNormaliser.read(cohort.clinical)
    if clinical_norm is None:
        summaries = [site_summaries(s, ids, clinical=df, min_count=min_count) for s, ids in site_train.items()]
        _, clinical_norm = fit_normalisers(summaries, require=("clinical",))
    assert clinical_norm is not None
    data.clinical, data.clinical_present = clinical_norm.transform(df, data.patient_ids)
    data.clinical_columns, data.clinical_norm = clinical_norm.columns, clinical_norm


class _Patients(torch.utils.data.Dataset):
    def __init__(self, data: CohortData, idx: np.ndarray):
        self.data, self.idx = data, np.asarray(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> int:
        return int(self.idx[i])


class Collate:
    """Gathers patients into a padded batch dict; samples at most ``max_tiles`` tiles per bag when training."""

    def __init__(self, data: CohortData, max_tiles: int | None, seed: int):
        self.data, self.max_tiles = data, max_tiles
        self.rng = np.random.default_rng(seed)

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        d = self.data
        idx = np.asarray(rows)
        batch: dict[str, torch.Tensor] = {
            "index": torch.as_tensor(idx),
            "time": torch.as_tensor(d.time[idx]),
            "event": torch.as_tensor(d.event[idx]),
            "site": torch.as_tensor(d.site[idx]),
        }
        if d.bags is not None:
            bags = []
            for i in idx:
                b = d.bags[i]
                if self.max_tiles is not None and len(b) > self.max_tiles:
                    b = b[np.sort(self.rng.choice(len(b), self.max_tiles, replace=False))]
                bags.append(b)
            n = max(1, max(len(b) for b in bags))
            feats = np.zeros((len(idx), n, d.feature_dim), np.float32)  # (B, N, D)
            mask = np.zeros((len(idx), n), bool)  # (B, N)
            for k, b in enumerate(bags):
                feats[k, : len(b)], mask[k, : len(b)] = b, True
            batch["features"], batch["mask"] = torch.from_numpy(feats), torch.from_numpy(mask)
        if d.omics is not None:
            batch["omics"] = torch.from_numpy(d.omics[idx])
            batch["omics_mask"] = torch.from_numpy(d.omics_present[idx])
        if d.clinical is not None:
            batch["clinical"] = torch.from_numpy(d.clinical[idx])
            batch["clinical_mask"] = torch.from_numpy(d.clinical_present[idx])
        return batch


MODEL_INPUTS = ("features", "mask", "omics", "omics_mask", "clinical", "clinical_mask")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def make_loader(
    data: CohortData, idx: np.ndarray, batch_size: int, train: bool, seed: int = 0, max_tiles: int | None = None
) -> torch.utils.data.DataLoader:
    """Training loaders shuffle (seeded) and drop a trailing batch of one patient (no Cox risk set)."""
    g = torch.Generator().manual_seed(seed)
    n = len(idx)
    drop_last = train and n > batch_size and n % batch_size == 1
    return torch.utils.data.DataLoader(
        _Patients(data, idx),
        batch_size=batch_size,
        shuffle=train,
        generator=g if train else None,
        collate_fn=Collate(data, max_tiles if train else None, seed),
        drop_last=drop_last,
    )


def load_run_data(cohort: Cohort, cfg: RunConfig, out: Path | None = None, **normalisers: Any) -> CohortData:
    """The cohort's data as the run config asks (splits, gene panel/HVG/pathways); features from ``out``
    (default ``cfg.out``). ``normalisers``: ``omics_norm`` / ``clinical_norm`` fitted elsewhere (e.g. from the
    federation's site summaries), passed on to ``build_data``."""
    fdir = features_dir(out or cfg.out, cfg.extract) if any(p.slides for p in cohort.patients) else None
    t = cfg.train
    return build_data(
        cohort,
        fdir,
        seed=t.seed,
        val_fraction=t.val_fraction,
        test_fraction=t.test_fraction,
        gene_panel=cfg.omics.gene_panel,
        max_genes=cfg.omics.max_genes,
        gene_sets=cfg.omics.gene_sets,
        min_pathway_genes=cfg.omics.min_pathway_genes,
        test_sites=t.test_sites,
        min_count=cfg.federated.min_count if cfg.federated.enabled else None,  # the sites' summaries under k
        **normalisers,
    )
