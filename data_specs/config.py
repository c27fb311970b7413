"""The run config: one frozen object per run, resolved from defaults <- YAML <- CLI overrides.

Overrides are dotted ``key=value`` strings (``train.lr=3e-4``, ``extract.encoder=resnet18``); values
are parsed as YAML scalars. The resolved config is saved beside the outputs (``to_yaml``, written by
``pipeline``) and inside model files. This module does no I/O beyond reading a config file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExtractConfig(_Frozen):
    """Slides -> tiles -> features."""

    encoder: str = "efficientnet_lite0_imagenet"  # a name in models.encoders, any timm name, or hf-hub:ID
    weights: str | None = None  # local .pth/.safetensors for a timm architecture
    random_weights: bool = False  # allowed only when asked (with a warning)
    target_mpp: float = Field(0.5, gt=0)  # microns per pixel of the tiles fed to the encoder
    tile_px: int = Field(224, ge=16)
    thumbnail_px: int = Field(1024, ge=64)  # longest side of the thumbnail the tissue mask is computed on
    min_tissue: float = Field(0.5, ge=0, le=1)  # minimum tissue fraction for a tile to be kept
    min_piece_um2: float = Field(500.0, ge=0)  # tissue pieces smaller than this (square microns) are dropped
    fill_holes_um2: float = Field(500.0, ge=0)  # holes in tissue smaller than this (square microns) are filled
    overlap_px: int = Field(0, ge=0)  # overlap of neighbouring tiles, in tile pixels (< tile_px)
    remove_pen: bool = False  # drop blue/green/black pen ink from the tissue mask
    max_background: float = Field(0.9, gt=0, le=1)  # reject a read tile with more near-white/black pixels (1: off)
    # None: the device's default, 32 on CPU (flat peak RSS at equal speed, docs/benchmarks.md), 64 on a GPU;
    # "auto": the largest that fits on the GPU (as None on CPU)
    batch_size: int | Literal["auto"] | None = None
    num_workers: int = Field(0, ge=0)  # DataLoader workers per slide, each with its own slide handle
    prefetch_factor: int = Field(4, ge=1)  # batches each worker reads ahead
    read_ahead: int = Field(2, ge=0)  # with num_workers=0: batches a reader thread reads ahead of the encoder (0: off)
    # with num_workers=0: threads that read each batch's tiles together (contiguous runs of the batch, each thread
    # its own slide handle and tile cache); with read_ahead=0 the encoder waits while every core reads the batch
    read_threads: int = Field(1, ge=1)
    # "auto": an Aperio / generic tiled TIFF level is decoded directly (tifffile + imagecodecs), used only where
    # its pixels equal OpenSlide's on check tiles (~4x less CPU per tile); "openslide": always read_region
    tile_reader: Literal["auto", "openslide"] = "auto"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: the encoder's own on GPU, fp32 on CPU
    channels_last: bool = True
    compile: bool = False  # torch.compile the encoder (pays off on GPUs for long runs)
    # CPU encoder graph: "trace" = torch.jit.trace + freeze in fp32 (batch norm folded into convolutions),
    # checked against eager on a test batch; "inductor" = also a torch.compile inductor graph with freezing for
    # full batches (needs a C++ compiler; compiles for tens of seconds per run); "auto" = trace on CPU in fp32
    # unless compile, falling back to eager if the trace fails or disagrees, plus inductor where a run is
    # expected to encode >= 20,000 tiles and it times faster; "none" = eager.
    optimize: Literal["auto", "none", "trace", "inductor"] = "auto"
    slide_mpp: float | None = Field(None, gt=0)  # microns per pixel for slides whose metadata lacks it
    shard: str | None = None  # "K/N": process the K-th of N parts of the cohort (1 <= K <= N)
    retry_failed: bool = False  # retry slides recorded as failed by an earlier run

    @model_validator(mode="after")
    def _one_graph_optimizer(self) -> ExtractConfig:
        if self.optimize in ("trace", "inductor") and self.compile:
            raise ValueError(
                f"extract.optimize={self.optimize} and extract.compile=true exclude each other: choose one"
            )
        if self.optimize in ("trace", "inductor") and self.precision not in ("auto", "fp32"):
            raise ValueError(f"extract.optimize={self.optimize} is fp32 only, got extract.precision={self.precision}")
        return self


class OmicsConfig(_Frozen):
    """Omics feature space, fitted on training patients from per-site summaries (see pipeline.omics)."""

    gene_panel: Path | None = None  # one gene per line; default: every gene in the file
    max_genes: int | None = Field(None, ge=1)  # highly variable genes (scanpy seurat rule) on training patients
    gene_sets: Path | None = None  # GMT file: features become pathway tokens (mean of standardised genes)
    min_pathway_genes: int = Field(3, ge=1)  # gene sets with fewer genes present are dropped


class ModelConfig(_Frozen):
    """The survival model: the network (models.MultimodalSurvival) or the linear family (models.LinearSurvival)."""

    # network: MIL + encoders + fusion (the fields below); linear: log_hz linear in the standardised mean-pooled
    # tile features, genes and clinical covariates (L2 penalty = train.weight_decay; the fields below are unused)
    family: Literal["network", "linear"] = "network"
    # tile pooling: ABMIL, ABMIL + the mean of the tile embeddings, or a transformer. gated_attention stays the
    # default: the mean term was ahead on the demo's held-out folds at 240 patients but behind at 120
    mil: Literal["gated_attention", "gated_attention_mean", "transmil"] = "gated_attention"
    mil_layers: int = Field(2, ge=1)  # transmil blocks
    mil_heads: int = Field(4, ge=1)  # transmil and co-attention heads; must divide hidden
    fusion: Literal["concat", "bilinear", "coattention"] = "concat"  # coattention needs slides and omics
    omics_encoder: Literal["mlp", "linear"] = "mlp"  # linear: genes enter the log hazard as a linear term
    omics_groups: int = Field(6, ge=1)  # genomic tokens for coattention (contiguous gene groups)
    hidden: int = Field(128, ge=4)  # attention / modality embedding width
    omics_hidden: int = Field(64, ge=4)
    clinical_hidden: int = Field(16, ge=2)
    dropout: float = Field(0.25, ge=0, lt=1)
    # linear: a linear log-hazard term over the standardised mean-pooled tile features, genes and clinical
    # covariates, the fused network branch scaled by a learnable gate that starts at 0 (models.skip); fitted: the
    # linear family fitted first (train.linear_fit=cv; federated: summed site gradients, penalty by federated CV) as
    # a frozen offset, plus the gated fused branch (models.survival; Cox loss; no DP or SecAgg+); auto (default):
    # fitted where it can run, else none, resolved once per run (pipeline.training.skip_auto.resolve_skip: the saved
    # config holds the value used; a Flower deployment: none)
    skip: Literal["auto", "none", "linear", "fitted"] = "auto"
    # model.family=linear (full-batch fit, train.linear_fit=cv): the slide term over the top-r principal components
    # of the tile features (from per-site second moments of the non-test patients' tiles, each patient weighted
    # once: "tiles"; or of their mean tiles: "patients"), each score standardised; 0: every standardised dimension
    linear_slide_pcs: int = Field(10, ge=0)
    linear_slide_moments: Literal["tiles", "patients"] = "tiles"
    # the linear family's slide term (needs linear_slide_pcs > 0): pcs, the projected scores above; composition, the
    # standardised fractions of the slide's tiles in each of linear_slide_clusters tile phenotypes (k-means of the
    # tiles' projected scores by Lloyd iterations over per-site cluster sums; pipeline.training.slide_clusters);
    # both: the scores and the fractions. K = 8 was fixed a priori
    linear_slide: Literal["pcs", "composition", "both"] = "pcs"
    linear_slide_clusters: int = Field(8, ge=2)

    @model_validator(mode="after")
    def _composition_needs_pcs(self) -> ModelConfig:
        if self.linear_slide != "pcs" and self.linear_slide_pcs == 0:
            raise ValueError(
                f"model.linear_slide={self.linear_slide} clusters the tiles' projected scores: "
                "model.linear_slide_pcs must be > 0"
            )
        return self

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if (self.mil == "transmil" or self.fusion == "coattention") and self.hidden % self.mil_heads:
            raise ValueError(f"model.hidden={self.hidden} must be divisible by model.mil_heads={self.mil_heads}")
        if self.fusion == "coattention" and self.omics_encoder != "mlp":
            raise ValueError("model.fusion=coattention embeds genes as tokens: model.omics_encoder must be 'mlp'")
        return self


class TrainConfig(_Frozen):
    """Optimisation and the survival loss."""

    loss: Literal["cox", "nll"] = "cox"  # Cox partial likelihood, or discrete-time hazards NLL
    ties: Literal["efron", "breslow"] = "efron"  # Cox ties
    stratify: bool = True  # Cox: stratify the partial likelihood by site
    memory_bank: int = Field(0, ge=0)  # Cox: recent patients (detached) added to each batch's risk set
    n_bins: int = Field(4, ge=1)  # nll: time bins from quantiles of training event times
    nll_alpha: float = Field(0.0, ge=0, le=1)  # nll: extra weight on uncensored patients
    epochs: int = Field(60, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    # the network's optimiser: AdamW (decoupled weight decay), or SGD with Nesterov momentum (L2 = weight_decay)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    batch_size: int = Field(16, ge=1)  # patients per step; 1 needs loss=nll or a Cox memory_bank
    max_tiles: int = Field(512, ge=1)  # tiles sampled per patient per training step
    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.25, ge=0, lt=1)
    test_sites: tuple[str, ...] = ()  # sites held out as test only: not trained on, not in the federation
    seed: int = 0
    # epoch (centralised) / round (federated) kept: lowest validation loss or highest validation C-index (pooled
    # pairs across sites), averaged over a trailing window; see pipeline.training.selection. "loss" stays the
    # default: on the demo's validation folds "cindex" was not better by the margin fixed beforehand
    select: Literal["cindex", "loss"] = "loss"
    select_window: int = Field(1, ge=1)  # epochs / rounds the validation score is averaged over
    without_validation: Literal["last", "error"] = "last"  # no usable validation: keep the last (warning) or fail
    # model.family=linear with the Cox loss: "cv" fits the ridge-penalised stratified Cox likelihood to its optimum
    # (full batch, L-BFGS; federated: summed site gradients), the penalty by K-fold CV on the training and validation
    # patients (pipeline.training.linear_fit); "sgd": mini-batches and AdamW weight decay like the network
    linear_fit: Literal["cv", "sgd"] = "cv"
    linear_cv_folds: int = Field(5, ge=2)  # folds each site splits its non-test patients into
    # the linear fit's elastic net, c * (l1_ratio * |beta|_1 + (1 - l1_ratio) / 2 * |beta|^2) per patient
    # (scikit-survival Coxnet's parametrisation), c by the K-fold CV; 0 = ridge; "auto" (default): the mix chosen by
    # the same CV, jointly with c, among 0 and 0.5 (pipeline.training.linear_fit.L1_RATIO_GRID; docs/benchmarks.md)
    linear_l1_ratio: float | Literal["auto"] = "auto"
    # the relaxed elastic net (pipeline.training.linear_relaxed, glmnet's relax): gamma * the elastic-net fit +
    # (1 - gamma) * the refit on its active set with a ridge of 1e-3 only; 1 = not relaxed; "auto": gamma chosen by
    # the same CV, jointly with c and the mix, among 0, 0.25, 0.5, 1. Ridge (l1_ratio 0) has no active set
    linear_relax: float | Literal["auto"] = 1.0
    # what the linear fit's K-fold CV maximises to choose c (and the mix, gamma): "loglik", the cross-validated partial
    # likelihood (Verweij & van Houwelingen); "cindex", the out-of-fold concordance (pairs within a site) from the same
    # site answers, as scikit-survival's Coxnet is tuned in the run's baselines (ties: the larger penalty)
    linear_cv_criterion: Literal["loglik", "cindex"] = "loglik"
    # model.skip=linear/fitted: weight of the mean square of the gated residual branch's log hazard, added to the
    # training loss (pulls the network towards its linear part); auto: 1 with model.skip=fitted (chosen on the
    # demo's validation folds for runs without validation, within 0.005 of 0 with it), else 0
    residual_penalty: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _cox_needs_a_risk_set(self) -> TrainConfig:
        if self.loss == "cox" and self.batch_size < 2 and self.memory_bank < 1:
            raise ValueError(
                "train.batch_size=1 gives the Cox loss no risk set: set train.memory_bank (e.g. 32) or train.loss=nll"
            )
        return self

    @field_validator("linear_l1_ratio", "linear_relax", mode="before")
    @classmethod
    def _unit_or_auto(cls, v: Any, info: ValidationInfo) -> Any:
        ok = v == "auto" or (isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1)
        if not ok:
            raise ValueError(f"train.{info.field_name} must be a number in [0, 1] or 'auto', got {v!r}")
        return v

    @model_validator(mode="after")
    def _relax_needs_an_active_set(self) -> TrainConfig:
        if self.linear_relax != 1 and self.linear_l1_ratio == 0:
            raise ValueError(
                f"train.linear_relax={self.linear_relax} relaxes an elastic net's active set: "
                "train.linear_l1_ratio=0 (ridge) has none (set train.linear_l1_ratio > 0 or 'auto')"
            )
        return self


class FederatedConfig(_Frozen):
    """Federated training across the cohort's sites (one Flower ClientApp/ServerApp for both runtimes).

    Strategies: ``fedsgd`` (one full-batch local gradient per round, server SGD), ``fedavg``, ``fedprox``
    (local loss + mu/2 ||w - w_global||^2), ``fedadam`` / ``fedyogi`` (server Adam/Yogi on the mean
    pseudo-gradient, Reddi et al. 2021). DP (``dp_noise`` > 0): each site clips its update to ``dp_clip``
    (L2), the server adds Gaussian noise ``dp_noise * 2 * dp_clip / n_sites`` to the equal-weight mean.
    SecAgg+ (``secagg``): by default every site holds a share of every other site's secrets and a strict
    majority of the shares is needed to reconstruct them: the server learns a site's update only by colluding
    with at least half of the other sites (a minority of colluders cannot). ``min_count`` is the disclosure
    policy's k (see ``pipeline.federated.policy``).
    """

    enabled: bool = True
    strategy: Literal["fedsgd", "fedavg", "fedprox", "fedadam", "fedyogi"] = "fedavg"
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(2, ge=1)
    min_sites: int | None = Field(None, ge=1)  # None: every site; a round with fewer answering sites fails the run
    weighting: Literal["examples", "events"] = "examples"  # weight of a site's update in the mean
    server_lr: float | None = Field(None, gt=0)  # None: 1.0 (fedavg/fedprox), 0.1 (fedsgd), 0.01 (fedadam/yogi)
    proximal_mu: float = Field(0.01, ge=0)  # FedProx
    beta1: float = Field(0.9, ge=0, lt=1)  # FedAdam/FedYogi
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity (epsilon) of FedAdam/FedYogi
    secagg: bool = False  # Flower SecAgg+ (masks + secret sharing): the server sees only the sum
    # SecAgg+ shares per site's secrets; None: every site (capped at the number of sites in any case)
    secagg_shares: int | None = Field(None, ge=3)
    # shares needed to reconstruct a site's secrets; None: a strict majority of the shares (shares // 2 + 1), so
    # the server colluding with fewer than half of the sites holding a site's shares cannot unmask its update,
    # and up to shares - threshold sites may drop out of a round
    secagg_threshold: int | None = Field(None, ge=2)
    secagg_clip: float = Field(1.0, gt=0)  # SecAgg+ quantisation range [-clip, clip] of weight/max_weight * update
    secagg_max_weight: float = Field(1000.0, gt=0)  # largest site weight SecAgg+ expects (patients or events)
    dp_noise: float = Field(0.0, ge=0)  # Gaussian noise multiplier (0: no DP)
    dp_clip: float = Field(1.0, gt=0)  # L2 clipping norm of each site's update
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    # local DP: each site adds the noise to its clipped update before sending (std dp_noise * 2 * dp_clip, no
    # trusted server needed; the mean carries sqrt(n_sites) times the central noise); False: the server adds it
    dp_local: bool = False
    round_timeout: float | None = Field(None, gt=0)  # seconds; a site answering later is dropped from the round
    # k of the disclosure policy: no aggregate over fewer than k patients or events leaves a site (updates, site
    # summaries, validation replies, histograms); smaller sites are left out, smaller cells suppressed (warning)
    min_count: int = Field(10, ge=2)
    # evaluation replies under SecAgg+: False (default) sends no plain reply; each round's validation goes as a
    # secure sum (k on the totals); True sends the replies plain instead. Under DP none is ever sent
    secagg_eval_plain: bool = False


class EvaluateConfig(_Frozen):
    """Risk groups, survival horizons and metric settings (predict / evaluate)."""

    risk_groups: Literal["median", "tertiles"] = "median"  # cut-points fixed on the training patients' risks
    horizons: list[float] | None = None  # survival probability / td-AUC times; None: training event-time quartiles
    bootstrap: int = Field(200, ge=0)  # patient resamples for confidence intervals (0: none)
    seed: int = 0


class AttributeConfig(_Frozen):
    """Tile and gene attributions, phenotypes, biomarker table, faithfulness (attribute / report)."""

    max_heatmaps: int = Field(6, ge=0)  # slides with heatmaps, GeoJSON and galleries (highest/lowest risk)
    gallery_k: int = Field(6, ge=1)  # top- and bottom-k tiles per slide, cut at full resolution
    ig_steps: int = Field(32, ge=2)  # integrated-gradients interpolation steps
    top_genes: int = Field(20, ge=1)  # genes carried into the biomarker table
    phenotypes: bool = True  # Leiden clusters of tile embeddings (scanpy)
    leiden_resolution: float = Field(0.5, gt=0)
    max_phenotype_tiles: int = Field(20000, ge=100)  # tile subsample for the neighbour graph
    deletion_steps: int = Field(10, ge=2)  # points on each deletion curve
    seed: int = 0


class RunConfig(_Frozen):
    cohort: Path | None = None
    out: Path = Path("runs/latest")
    extract: ExtractConfig = ExtractConfig()
    omics: OmicsConfig = OmicsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federated: FederatedConfig = FederatedConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    attribute: AttributeConfig = AttributeConfig()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def digest(self, section: str | None = None) -> str:
        """Short, stable hash of the config (or one section), for naming and checking artifacts."""
        d = self.to_dict() if section is None else self.to_dict()[section]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        """The config as YAML text (what a run folder's ``config.yaml`` holds; written by the caller)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: list[str] | None) -> RunConfig:
        """This config with dotted ``section.key=value`` overrides applied, validated again.

        Every section is kept (a saved model's config, changed only where ``overrides`` say).
        Raises ``ConfigError`` naming the override or field that is wrong.
        """
        if not overrides:
            return self
        data = self.to_dict()
        apply_overrides(data, overrides)
        return validate_config(data, "overrides " + " ".join(overrides))


class ConfigError(ValueError):
    pass


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Set each ``section.key=value`` (value parsed as a YAML scalar) in the nested dict ``data``."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form section.key=value")
        k, v = ov.split("=", 1)
        _set_dotted(data, k.strip(), yaml.safe_load(v))


def validate_config(data: dict[str, Any], source: str | None = None) -> RunConfig:
    """``RunConfig`` from a nested dict; ``ConfigError`` listing every bad field (and ``source``)."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in er['loc'])} = {er.get('input')!r}: {er['msg']}" for er in e.errors()
        )
        src = f" in {source}" if source else ""
        raise ConfigError(f"invalid config{src}: {msgs}") from e


def resolve_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None, **top: Any) -> RunConfig:
    """Defaults <- YAML file <- dotted overrides <- keyword arguments for top-level keys."""
    data: dict[str, Any] = {}
    if yaml_path is not None:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    apply_overrides(data, overrides or [])
    for k, v in top.items():
        if v is not None:
            data[k] = v
    return validate_config(data, str(yaml_path) if yaml_path else None)
