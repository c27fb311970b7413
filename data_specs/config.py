"""The run config: one frozen object per run, resolved from defaults <- YAML <- CLI overrides.

Overrides are dotted ``key=value`` strings (``train.lr=3e-4``, ``extract.encoder=resnet18``); values
are parsed as YAML scalars. The resolved config is saved beside the outputs and inside checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


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
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    device: str = "auto"


class OmicsConfig(_Frozen):
    """Omics feature space, fitted on training patients from per-site summaries (see pipeline.omics)."""

    gene_panel: Path | None = None  # one gene per line; default: every gene in the file
    max_genes: int | None = Field(None, ge=1)  # highly variable genes (scanpy seurat rule) on training patients
    gene_sets: Path | None = None  # GMT file: features become pathway tokens (mean of standardised genes)
    min_pathway_genes: int = Field(3, ge=1)  # gene sets with fewer genes present are dropped


class ModelConfig(_Frozen):
    mil: Literal["gated_attention"] = "gated_attention"
    fusion: Literal["concat"] = "concat"
    hidden: int = Field(128, ge=4)  # attention / modality embedding width
    omics_hidden: int = Field(64, ge=4)
    clinical_hidden: int = Field(16, ge=2)
    dropout: float = Field(0.25, ge=0, lt=1)


class TrainConfig(_Frozen):
    loss: Literal["cox"] = "cox"
    ties: Literal["efron", "breslow"] = "efron"
    epochs: int = Field(60, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(16, ge=2)  # patients per step; the Cox risk set lives inside a batch
    max_tiles: int = Field(512, ge=1)  # tiles sampled per patient per training step
    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.25, ge=0, lt=1)
    seed: int = 0


class FederatedConfig(_Frozen):
    enabled: bool = True
    strategy: Literal["fedavg"] = "fedavg"
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(2, ge=1)
    min_sites: int = Field(1, ge=1)


class RunConfig(_Frozen):
    cohort: Path | None = None
    out: Path = Path("runs/latest")
    extract: ExtractConfig = ExtractConfig()
    omics: OmicsConfig = OmicsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federated: FederatedConfig = FederatedConfig()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def digest(self, section: str | None = None) -> str:
        """Short, stable hash of the config (or one section), for naming and checking artifacts."""
        d = self.to_dict() if section is None else self.to_dict()[section]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


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
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form section.key=value")
        k, v = ov.split("=", 1)
        _set_dotted(data, k.strip(), yaml.safe_load(v))
    for k, v in top.items():
        if v is not None:
            data[k] = v
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in er['loc'])} = {er.get('input')!r}: {er['msg']}" for er in e.errors()
        )
        src = f" in {yaml_path}" if yaml_path else ""
        raise ConfigError(f"invalid config{src}: {msgs}") from e
