"""Training: one LightningModule whose ``training_step`` is the unit that local and federated training share.

The backbone (``models.MultimodalSurvival``) is injected. The loss is the Cox partial likelihood
(Efron ties by default) stratified by site. The best epoch by validation C-index is kept and saved as
a self-contained bundle (weights, resolved config, gene panel and normalisation, feature attributes,
risk cut-point) by :func:`save_bundle`.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from data_specs.config import RunConfig
from models import build_model, cox_loss
from models.survival import MultimodalSurvival
from pipeline.data import CohortData, make_loader, model_inputs
from pipeline.evaluate import harrell_cindex

log = logging.getLogger(__name__)
for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):  # one Trainer per site-round: keep it quiet
    logging.getLogger(_name).setLevel(logging.WARNING)
BUNDLE_FORMAT = "histofuse-model/1"

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*exists and is not empty.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*have no `val_dataloader`.*")  # federated local fits validate at the server


class SurvivalModule(L.LightningModule):
    """Cox training of an injected survival backbone.

    Args:
        model: maps the batch's model inputs to ``SurvivalOutput(log_hz [B], attn)``.
        lr, weight_decay: AdamW settings.
        ties: ``efron`` or ``breslow``.
        stratify: stratify the partial likelihood by site (baseline hazards differ between hospitals).
    """

    def __init__(
        self,
        model: MultimodalSurvival,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        ties: str = "efron",
        stratify: bool = True,
    ):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self._val: list[tuple[torch.Tensor, ...]] = []

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(**model_inputs(batch))

    def loss(self, batch: dict[str, torch.Tensor], log_hz: torch.Tensor) -> torch.Tensor:
        strata = batch["site"] if self.hparams.stratify else None
        return cox_loss(log_hz, batch["event"], batch["time"], strata, self.hparams.ties)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        loss = self.loss(batch, out.log_hz)
        self.log("train_loss", loss, batch_size=len(batch["time"]), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch)
        self._val.append((out.log_hz.detach(), batch["event"], batch["time"], batch["site"]))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        log_hz, event, time, site = (torch.cat(x) for x in zip(*self._val, strict=True))
        self._val.clear()
        loss = self.loss({"event": event, "time": time, "site": site}, log_hz)
        c = harrell_cindex(time.numpy(), event.numpy(), log_hz.float().numpy())
        self.log("val_loss", loss, batch_size=len(time))
        self.log("val_cindex", float(c) if np.isfinite(c) else 0.5, batch_size=len(time))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class KeepBest(L.Callback):
    """Keeps the state dict of the epoch with the lowest validation Cox loss (smoother than a small-sample C)."""

    def __init__(self) -> None:
        self.best: tuple[float, float] | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch = -1

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val_cindex" not in trainer.callback_metrics:
            return
        score = (-float(trainer.callback_metrics["val_loss"]), float(trainer.callback_metrics["val_cindex"]))
        if self.best is None or score > self.best:
            self.best, self.epoch = score, trainer.current_epoch
            self.state = copy.deepcopy(module.model.state_dict())


def make_trainer(
    epochs: int, callbacks: list[L.Callback] | None = None, progress: bool = False, validate: bool = True
) -> L.Trainer:
    """The one Trainer recipe used by local and federated training (CPU unless a GPU is present)."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
        limit_val_batches=1.0 if validate else 0,
    )


def new_model(data: CohortData, cfg: RunConfig) -> MultimodalSurvival:
    """A freshly initialised backbone (seeded by ``cfg.train.seed``) sized for the cohort's modalities."""
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    return build_model(
        **data.model_dims(),
        hidden=m.hidden,
        omics_hidden=m.omics_hidden,
        clinical_hidden=m.clinical_hidden,
        dropout=m.dropout,
        fusion=m.fusion,
    )


def new_module(model: MultimodalSurvival, cfg: RunConfig) -> SurvivalModule:
    t = cfg.train
    return SurvivalModule(model, lr=t.lr, weight_decay=t.weight_decay, ties=t.ties)


def fit_local(
    data: CohortData,
    cfg: RunConfig,
    train_idx: np.ndarray | None = None,
    val_idx: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[SurvivalModule, dict]:
    """Centralised training on ``train_idx`` (default: the train split), best epoch by validation C-index."""
    t = cfg.train
    train_idx = data.splits["train"] if train_idx is None else train_idx
    val_idx = data.splits["val"] if val_idx is None else val_idx
    module = new_module(new_model(data, cfg), cfg)
    L.seed_everything(t.seed, workers=True, verbose=False)
    keep = KeepBest()
    trainer = make_trainer(t.epochs, [keep], progress=progress, validate=len(val_idx) > 0)
    loaders = [make_loader(data, train_idx, t.batch_size, True, t.seed, t.max_tiles)]
    if len(val_idx):
        loaders.append(make_loader(data, val_idx, 64, False))
    trainer.fit(module, *loaders)
    if keep.state is not None:
        module.model.load_state_dict(keep.state)
    return module, {
        "best_epoch": keep.epoch,
        "best_val_loss": -keep.best[0] if keep.best else None,
        "best_val_cindex": keep.best[1] if keep.best else None,
    }


@torch.inference_mode()
def predict_log_hz(
    model: MultimodalSurvival, data: CohortData, idx: np.ndarray, with_attention: bool = False
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """``log_hz [len(idx)]`` in ``idx`` order, and each patient's tile attention (unpadded) if asked."""
    model.eval()
    out, attn = [], []
    for batch in make_loader(data, idx, 32, train=False):
        o = model(**model_inputs(batch))
        out.append(o.log_hz.float().cpu().numpy())
        if with_attention and o.attn is not None:
            for a, m in zip(o.attn, batch["mask"], strict=True):
                attn.append(a[m].cpu().numpy())
    return (np.concatenate(out) if out else np.zeros(0)), (attn if with_attention else None)


def save_bundle(path: Path, model: MultimodalSurvival, data: CohortData, cfg: RunConfig, extra: dict) -> None:
    """A self-contained model file: weights + everything needed to predict on a new cohort. Atomic."""
    train_lh, _ = predict_log_hz(model, data, data.splits["train"])
    bundle = {
        "format": BUNDLE_FORMAT,
        "config": cfg.to_dict(),
        "model_dims": data.model_dims(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "features": data.feature_attrs or None,
        "omics": data.omics_norm.state() if data.omics_norm else None,
        "clinical": data.clinical_norm.state() if data.clinical_norm else None,
        "sites": data.sites,
        "cutpoints": {
            "median": float(np.median(train_lh)) if len(train_lh) else 0.0,
            "tertiles": [float(v) for v in np.quantile(train_lh, [1 / 3, 2 / 3])] if len(train_lh) else [],
        },
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(bundle, tmp)
    tmp.replace(path)


def load_bundle(path: Path) -> tuple[MultimodalSurvival, dict]:
    """Rebuild the model from a bundle; returns ``(model in eval mode, bundle)``."""
    b = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(b, dict) or b.get("format") != BUNDLE_FORMAT:
        raise ValueError(
            f"{path}: not a histofuse model bundle (format {b.get('format') if isinstance(b, dict) else '?'})"
        )
    m = b["config"]["model"]
    model = build_model(
        **b["model_dims"],
        hidden=m["hidden"],
        omics_hidden=m["omics_hidden"],
        clinical_hidden=m["clinical_hidden"],
        dropout=m["dropout"],
        fusion=m["fusion"],
    )
    model.load_state_dict(b["state_dict"])
    return model.eval(), b
