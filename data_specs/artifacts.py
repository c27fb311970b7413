"""Typed artifacts: what a features file, a model file and a run folder hold, checked when read.

- :class:`FeatureAttrs`: the attributes of a features ``.h5`` that readers check (encoder identity, tile
  geometry); ``from_h5_attrs`` takes the file's raw attribute dict and keeps what it knows.
- :class:`ModelCard`: everything a model file holds besides its weights (config, input sizes, normaliser
  states, cut-points, baseline, splits); stored as JSON beside the weights by ``pipeline.training.bundle``.
- :class:`RunFiles`: the names of the files of a run folder, one place for every reader and writer.

The site summaries of the statistics exchange are typed in :mod:`data_specs.summaries`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from data_specs.config import RunConfig

MODEL_FORMAT = "histofuse-model/3"  # /3: safetensors weights + JSON card; /1 and /2 were pickles


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeatureAttrs(_Frozen):
    """The identity of a features file: which encoder made the embeddings, from which tiles.

    ``encoder``/``weights``/``tile_px``/``target_mpp`` must match between a model and the features it is
    given (:meth:`identity`); ``dim`` is the embedding width ``D``.
    """

    encoder: str
    weights: str | None = None
    feature_kind: str = ""
    dim: int = Field(ge=0)
    tile_px: int = Field(ge=1)
    target_mpp: float = Field(gt=0)

    @classmethod
    def from_h5_attrs(cls, attrs: dict[str, Any]) -> FeatureAttrs:
        """From a features file's raw attributes (other attributes of the file are ignored)."""
        known = {k: attrs[k] for k in cls.model_fields if k in attrs}
        return cls.model_validate(known)

    def identity(self) -> dict[str, Any]:
        """The attributes every features file read for this model must carry, as ``{name: value}``."""
        return {k: getattr(self, k) for k in ("encoder", "weights", "tile_px", "target_mpp")}

    def same_encoder(self, other: FeatureAttrs) -> bool:
        return (self.encoder, self.weights, self.dim) == (other.encoder, other.weights, other.dim)


class Cutpoints(_Frozen):
    """Risk-group cut-points on ``log_hz``, fixed on the training patients."""

    median: float = 0.0
    tertiles: list[float] = []


class TensorSpec(_Frozen):
    shape: list[int]
    dtype: str


class ModelCard(_Frozen):
    """Everything a model file holds besides the weights.

    Attributes:
        config: the resolved run config the model was trained with.
        model_dims: ``{"feature_dim", "n_genes", "n_clinical"}``, the input sizes the network was built for.
        features: the features-file identity (None for a model without slides).
        omics, clinical: normaliser states (``OmicsNormaliser.state()`` / ``ClinicalNormaliser.state()``).
        time_bins: discrete-time bin edges ``[K + 1]`` (None for Cox heads).
        baseline: Breslow baseline state (Cox heads with events in training).
        split_digest: SHA-256 of the training cohort's sorted ``patient_id<TAB>split`` lines: prediction on
            the same cohort re-derives its splits and checks them against it; no patient id is stored.
        splits: legacy files only (``patient_id -> split``); a new card never holds patient ids.
        tensors: name -> shape/dtype of every weight tensor; weights_sha256: digest of the weights
            (:func:`pipeline.training.bundle.weights_digest`), checked on load.
    """

    format: str = MODEL_FORMAT
    config: RunConfig
    model_dims: dict[str, int]
    features: FeatureAttrs | None = None
    omics: dict[str, Any] | None = None
    clinical: dict[str, Any] | None = None
    sites: list[str] = []
    time_bins: list[float] | None = None
    cutpoints: Cutpoints = Cutpoints()
    horizons: list[float] = []
    baseline: dict[str, Any] | None = None
    train_info: dict[str, Any] = {}
    split_digest: str = ""
    splits: dict[str, str] = {}
    tensors: dict[str, TensorSpec] = {}
    weights_sha256: str = ""


class RunFiles(_Frozen):
    """The files of a run folder: ``RunFiles(root=out).model`` etc. Names are class constants.

    Every reader and writer of a run folder names its files through this class, so a file is renamed in
    one place. Paths under ``attributions/`` hang off :attr:`attributions`; per-slide, per-split and
    per-fold names are methods.
    """

    root: Path

    CONFIG: ClassVar[str] = "config.yaml"
    MODEL: ClassVar[str] = "model.safetensors"
    TRAIN_SUMMARY: ClassVar[str] = "train_summary.json"
    FEDERATED: ClassVar[str] = "federated"  # folder: round checkpoints and history of a federated run
    PRIVACY_LEDGER: ClassVar[str] = "privacy_ledger.jsonl"  # federated runs: what each site sent (no values)
    RISK_SCORES: ClassVar[str] = "risk_scores.csv"
    SURVIVAL_CURVES: ClassVar[str] = "survival_curves.csv"
    METRICS: ClassVar[str] = "metrics.json"
    REPORT: ClassVar[str] = "report.html"
    TRUTH_CHECK: ClassVar[str] = "truth_check.json"  # demo runs only
    DEMO_COHORT: ClassVar[str] = "cohort"  # folder: the cohort `histofuse demo` builds
    FOLDS: ClassVar[str] = "folds.csv"  # cross-validation runs: the fold of each patient
    CV_RISK_SCORES: ClassVar[str] = "cv_risk_scores.csv"
    CV_RESULTS: ClassVar[str] = "cv_results.json"
    CV_SUMMARY: ClassVar[str] = "cv_summary.json"  # over folds and seeds: mean +- sd, baselines, per site
    SEEDS_SUMMARY: ClassVar[str] = "seeds_summary.json"  # `run --seeds N`: each metric's mean +- sd over seeds
    ATTRIBUTIONS: ClassVar[str] = "attributions"
    TILES: ClassVar[str] = "tiles.csv"  # under ATTRIBUTIONS, as are the names below
    GENES: ClassVar[str] = "genes.csv"
    GENE_IG: ClassVar[str] = "gene_ig.csv"
    GENE_H5AD: ClassVar[str] = "gene_attributions.h5ad"
    BIOMARKERS: ClassVar[str] = "biomarkers.csv"
    BIOMARKERS_INFO: ClassVar[str] = "biomarkers.json"
    PHENOTYPES_PNG: ClassVar[str] = "phenotypes.png"
    PHENOTYPE_FRACTIONS: ClassVar[str] = "phenotype_fractions.csv"
    FAITHFULNESS: ClassVar[str] = "faithfulness.json"
    DELETION_PNG: ClassVar[str] = "deletion.png"
    HEATMAPS: ClassVar[str] = "heatmaps"  # folders of per-slide files
    GEOJSON: ClassVar[str] = "geojson"
    GALLERIES: ClassVar[str] = "galleries"

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    def shard_config(self, shard: str | None) -> Path:
        """The config copy of extract shard ``"K/N"`` (``config.shard-K-of-N.yaml``); :attr:`config` for None."""
        return self.config if not shard else self.root / f"config.shard-{shard.replace('/', '-of-')}.yaml"

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def train_summary(self) -> Path:
        return self.root / self.TRAIN_SUMMARY

    @property
    def federated(self) -> Path:
        return self.root / self.FEDERATED

    @property
    def privacy_ledger(self) -> Path:
        return self.root / self.PRIVACY_LEDGER

    def site_privacy_ledger(self, site: str) -> Path:
        """A deployed SuperNode's own ledger (``privacy_ledger.<site>.jsonl``: nodes may share one folder)."""
        return self.root / f"{Path(self.PRIVACY_LEDGER).stem}.{site}.jsonl"

    @property
    def risk_scores(self) -> Path:
        return self.root / self.RISK_SCORES

    @property
    def survival_curves(self) -> Path:
        return self.root / self.SURVIVAL_CURVES

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    def km_plot(self, split: str, by_site: bool = False) -> Path:
        """Kaplan-Meier curves by risk group of ``split`` (``km_<split>.png``; ``km_<split>_sites.png`` per site)."""
        return self.root / (f"km_{split}_sites.png" if by_site else f"km_{split}.png")

    def td_auc_plot(self, split: str) -> Path:
        return self.root / f"td_auc_{split}.png"

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @property
    def truth_check(self) -> Path:
        return self.root / self.TRUTH_CHECK

    @property
    def demo_cohort(self) -> Path:
        return self.root / self.DEMO_COHORT

    @property
    def folds(self) -> Path:
        return self.root / self.FOLDS

    @property
    def cv_risk_scores(self) -> Path:
        return self.root / self.CV_RISK_SCORES

    @property
    def cv_results(self) -> Path:
        return self.root / self.CV_RESULTS

    def fold(self, f: int) -> RunFiles:
        """The run folder of cross-validation fold ``f`` (``fold_<f>/``)."""
        return RunFiles(root=self.root / f"fold_{f}")

    @property
    def cv_summary(self) -> Path:
        return self.root / self.CV_SUMMARY

    @property
    def seeds_summary(self) -> Path:
        return self.root / self.SEEDS_SUMMARY

    def seed(self, k: int) -> RunFiles:
        """The run folder of seed ``k`` of a repeated run or cross-validation (``seed-<k>/``)."""
        return RunFiles(root=self.root / f"seed-{k}")

    @property
    def attributions(self) -> Path:
        return self.root / self.ATTRIBUTIONS

    @property
    def tiles(self) -> Path:
        return self.attributions / self.TILES

    @property
    def genes(self) -> Path:
        return self.attributions / self.GENES

    @property
    def gene_ig(self) -> Path:
        return self.attributions / self.GENE_IG

    @property
    def gene_h5ad(self) -> Path:
        return self.attributions / self.GENE_H5AD

    @property
    def biomarkers(self) -> Path:
        return self.attributions / self.BIOMARKERS

    @property
    def biomarkers_info(self) -> Path:
        return self.attributions / self.BIOMARKERS_INFO

    @property
    def phenotypes_png(self) -> Path:
        return self.attributions / self.PHENOTYPES_PNG

    @property
    def phenotype_fractions(self) -> Path:
        return self.attributions / self.PHENOTYPE_FRACTIONS

    @property
    def faithfulness(self) -> Path:
        return self.attributions / self.FAITHFULNESS

    @property
    def deletion_png(self) -> Path:
        return self.attributions / self.DELETION_PNG

    @property
    def heatmaps(self) -> Path:
        return self.attributions / self.HEATMAPS

    @property
    def geojson_dir(self) -> Path:
        return self.attributions / self.GEOJSON

    @property
    def galleries(self) -> Path:
        return self.attributions / self.GALLERIES

    def heatmap(self, slide_id: str, ig: bool = False) -> Path:
        """A slide's attention heatmap (``<slide_id>.png``; integrated gradients: ``<slide_id>_ig.png``)."""
        return self.heatmaps / (f"{slide_id}_ig.png" if ig else f"{slide_id}.png")

    def gallery(self, slide_id: str, ig: bool = False) -> Path:
        """A slide's top/bottom tiles by attention (``<slide_id>.png``) or by IG (``<slide_id>_ig.png``)."""
        return self.galleries / (f"{slide_id}_ig.png" if ig else f"{slide_id}.png")

    def geojson(self, slide_id: str) -> Path:
        return self.geojson_dir / f"{slide_id}.geojson"
