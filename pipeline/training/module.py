"""Training: one LightningModule whose ``training_step`` is the unit that local and federated training share.

The backbone (``models.MultimodalSurvival``) is injected. The loss is the Cox partial likelihood
(Efron ties by default) stratified by site, optionally with a memory bank of recent patients for small
batches, or the discrete-time hazards NLL (``train.loss=nll``; bins from quantiles of the training event
times, stored in the model). The epoch kept is chosen by :mod:`pipeline.training.selection` (validation
loss by default, or C-index) and saved as a self-contained model file (weights, resolved config, gene panel and
normalisation, feature attributes, time bins, risk cut-points) by :func:`pipeline.training.bundle.save_bundle`;
:func:`pipeline.training.predict.predict` gives risk scores and, for discrete-time models, per-patient hazards
and survival curves.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import lightning as L
import numpy as np
import torch

from data_specs.config import ModelConfig, RunConfig, TrainConfig
from models import CoxMemoryBank, build_model, cox_loss, discrete_time_edges, nll_loss, time_to_bin
from models.survival import MultimodalSurvival, SurvivalOutput
from pipeline.stats.metrics import harrell_cindex
from pipeline.training.data import CohortData, make_loader, model_inputs
from pipeline.training.linear_fit import fit_linear_centralised
from pipeline.training.selection import Selector
from pipeline.training.skip_auto import residual_penalty, resolve_skip
from pipeline.training.slide_norm import prepare_slide_norm


def _adamw(params: Any, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _sgd(params: Any, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=momentum > 0)


# train.optimizer -> builder(params, lr, weight_decay, momentum)
OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd}

log = logging.getLogger(__name__)


class SurvivalModule(L.LightningModule):
    """Survival training of an injected backbone: Cox partial likelihood or discrete-time NLL.

    Args:
        model: maps the batch's model inputs to ``SurvivalOutput`` (``log_hz [B]``; ``logits [B, K]`` for
            a discrete-time head, whose ``bin_edges`` buffer holds the time bins).
        lr, weight_decay: optimiser settings (AdamW: decoupled weight decay; SGD: L2 penalty).
        optimizer: ``adamw`` or ``sgd`` (Nesterov momentum ``momentum``).
        ties: ``efron`` or ``breslow`` (Cox).
        stratify: stratify the partial likelihood by site (baseline hazards differ between hospitals).
        loss: ``cox`` or ``nll``.
        nll_alpha: weight of the uncensored term of the NLL.
        memory_bank: Cox only: recent patients (detached ``log_hz``) added to each training batch's risk set
            (:class:`models.CoxMemoryBank`); 0 = the batch alone. Emptied at the start of every fit.
        residual_penalty: in training mode, ``residual_penalty * mean(residual ** 2)`` is added to the loss, where
            ``residual [B]`` is the gated residual branch's log hazard (``model.skip`` linear / fitted).

    A frozen offset (``model.skip=fitted``: parameters named ``offset.*``) is left out of the optimiser.
    """

    def __init__(
        self,
        model: MultimodalSurvival,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        ties: str = "efron",
        stratify: bool = True,
        loss: str = "cox",
        nll_alpha: float = 0.0,
        memory_bank: int = 0,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        residual_penalty: float = 0.0,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{optimizer}': valid names are {sorted(OPTIMIZERS)}")
        if loss not in ("cox", "nll"):
            raise ValueError(f"unknown loss '{loss}': valid names are ['cox', 'nll']")
        if loss == "nll" and model.n_bins == 0:
            raise ValueError("loss 'nll' needs a discrete-time model (build it with n_bins > 0)")
        if loss == "cox" and model.n_bins > 0:
            raise ValueError(f"loss 'cox' needs a Cox head; the model has a discrete-time head (n_bins={model.n_bins})")
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self.bank = CoxMemoryBank(memory_bank if loss == "cox" else 0)
        self._val: list[tuple[torch.Tensor, ...]] = []  # validation batches (ValidatedSurvivalModule)
        self.val_scores: tuple[float, float] | None = None  # (C-index, loss) of the last validation epoch

    def forward(self, batch: dict[str, torch.Tensor]) -> SurvivalOutput:
        return self.model(**model_inputs(batch))

    def loss(
        self, batch: dict[str, torch.Tensor], out: SurvivalOutput | torch.Tensor, use_bank: bool = False
    ) -> torch.Tensor:
        """The configured loss of a batch. ``out``: the model's output (a bare ``log_hz`` tensor is accepted
        for Cox). ``use_bank``: Cox with the memory bank (training steps), which also pushes the batch in."""
        if self.hparams.loss == "nll":
            if not isinstance(out, SurvivalOutput) or out.logits is None:
                raise ValueError("loss 'nll' needs the model output with logits, not a bare log_hz")
            edges = self.model.get_buffer("bin_edges")
            return nll_loss(out.logits, batch["event"], time_to_bin(batch["time"], edges), self.hparams.nll_alpha)
        log_hz = out.log_hz if isinstance(out, SurvivalOutput) else out
        strata = batch["site"] if self.hparams.stratify else None
        if use_bank and self.bank.size:
            loss = self.bank.loss(log_hz, batch["event"], batch["time"], strata, batch.get("index"), self.hparams.ties)
        else:
            loss = cox_loss(log_hz, batch["event"], batch["time"], strata, self.hparams.ties)
        res = out.residual if isinstance(out, SurvivalOutput) else None
        if self.training and res is not None and self.hparams.residual_penalty > 0:
            loss = loss + self.hparams.residual_penalty * res.pow(2).mean()
        return loss

    def on_fit_start(self) -> None:
        self.bank.reset()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        loss = self.loss(batch, out, use_bank=True)
        self.log("train_loss", loss, batch_size=len(batch["time"]), on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        params = [p for name, p in self.model.named_parameters() if not name.startswith("offset.")]
        return OPTIMIZERS[h.optimizer](params, h.lr, h.weight_decay, h.momentum)


class ValidatedSurvivalModule(SurvivalModule):
    """:class:`SurvivalModule` with a validation loop (``val_loss``, ``val_cindex`` over the whole validation
    set), for fits given validation patients (:func:`fit_local`). Fits without them (federated local rounds)
    use the plain module, so Lightning is never handed a ``validation_step`` without a validation loader."""

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch)
        logits = out.logits.detach() if out.logits is not None else out.log_hz.detach()[:, None]
        self._val.append((out.log_hz.detach(), logits, batch["event"], batch["time"], batch["site"]))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        log_hz, logits, event, time, site = (torch.cat(x) for x in zip(*self._val, strict=True))
        self._val.clear()
        out = SurvivalOutput(log_hz, logits=logits if self.hparams.loss == "nll" else None)
        loss = self.loss({"event": event, "time": time, "site": site}, out)
        if self.hparams.loss == "cox" and not bool(event.any()):
            loss = torch.tensor(float("nan"))  # the Cox loss of no event is a policy zero, not a score
        c = harrell_cindex(time.numpy(), event.numpy(), log_hz.float().numpy())
        self.val_scores = (float(c), float(loss))  # read by KeepBest (callbacks' epoch-end hooks run before ours)
        self.log("val_loss", loss, batch_size=len(time))
        self.log("val_cindex", float(c), batch_size=len(time))  # NaN without a comparable pair (Selector)


class KeepBest(L.Callback):
    """Keeps the state dict of the epoch the :class:`~pipeline.training.selection.Selector` picks
    (``train.select``: validation loss by default, or validation C-index; trailing ``train.select_window``)."""

    def __init__(self, selector: Selector | None = None) -> None:
        self.selector = selector if selector is not None else Selector(where="centralised training")
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch = -1
        self.history: list[dict[str, float]] = []  # per epoch: epoch, val_cindex, val_loss

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Not on_validation_epoch_end: Lightning calls the callbacks' hook before the module's, so the metrics
        # there are the previous epoch's (paired with this epoch's weights, and epoch 0 never scored).
        scores = getattr(module, "val_scores", None)
        if trainer.sanity_checking or scores is None:
            return
        module.val_scores = None
        c, loss = scores
        self.history.append({"epoch": trainer.current_epoch, "val_cindex": c, "val_loss": loss})
        if self.selector.update(trainer.current_epoch, c, loss):
            self.epoch = trainer.current_epoch
            self.state = copy.deepcopy(module.model.state_dict())


def make_trainer(
    epochs: int, callbacks: list[L.Callback] | None = None, progress: bool = False, validate: bool = True
) -> L.Trainer:
    """The one Trainer recipe used by local and federated training (CPU unless a GPU is present).

    A federated run builds one Trainer per site and round: Lightning's per-Trainer INFO lines (accelerator,
    "fit stopped") are lowered to WARNING here, when a Trainer is made, not at import.
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
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


def model_kwargs(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """``build_model`` keyword arguments: every ``model`` field as is, ``n_bins`` from the ``train`` section.

    A ``model.skip=auto`` that was not resolved by :func:`~pipeline.training.skip_auto.resolve_skip` (a
    deployment's ClientApp reads the run's YAML itself) builds the plain network: an offset only where a run fitted
    it."""
    kw = model_cfg.model_dump()
    if kw["skip"] == "auto":
        kw["skip"] = "none"
    return {**kw, "n_bins": train_cfg.n_bins if train_cfg.loss == "nll" else 0}


def new_model(data: CohortData, cfg: RunConfig) -> MultimodalSurvival:
    """A freshly initialised backbone (seeded by ``cfg.train.seed``) sized for the cohort's modalities.

    For ``train.loss=nll`` the time bins are the quantiles of the event times of ``data.splits["train"]``
    (every site of a simulated federation builds the same ones), stored in the model's ``bin_edges``.
    """
    torch.manual_seed(cfg.train.seed)
    model = build_model(**data.model_dims(), **model_kwargs(cfg.model, cfg.train))
    if model.n_bins:
        tr = data.splits["train"]
        try:
            edges = discrete_time_edges(torch.from_numpy(data.time[tr]), torch.from_numpy(data.event[tr]), model.n_bins)
        except ValueError as e:
            raise ValueError(f"train.loss=nll: {e}") from e
        model.set_bin_edges(edges)
    prepare_slide_norm(model, data)  # linear family or skip term: slide standardisation from site summaries
    if getattr(model, "offset", None) is not None:  # model.skip=fitted: the offset's own (fitted later)
        prepare_slide_norm(model.offset, data)
    return model


def new_module(model: MultimodalSurvival, cfg: RunConfig, validate: bool = False) -> SurvivalModule:
    """The training module of ``cfg.train`` around ``model``; ``validate``: with the validation loop
    (:class:`ValidatedSurvivalModule`, for fits given a validation loader)."""
    t = cfg.train
    return (ValidatedSurvivalModule if validate else SurvivalModule)(
        model,
        lr=t.lr,
        weight_decay=t.weight_decay,
        ties=t.ties,
        stratify=t.stratify,
        loss=t.loss,
        nll_alpha=t.nll_alpha,
        memory_bank=t.memory_bank,
        optimizer=t.optimizer,
        momentum=t.momentum,
        residual_penalty=residual_penalty(model_kwargs(cfg.model, t)["skip"], t.residual_penalty),
    )


def selector(cfg: RunConfig, where: str) -> Selector:
    """The epoch/round selection rule of ``cfg.train`` (the same object for centralised and federated runs)."""
    t = cfg.train
    return Selector(t.select, t.select_window, t.without_validation, where)


def fit_local(
    data: CohortData,
    cfg: RunConfig,
    train_idx: np.ndarray | None = None,
    val_idx: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[SurvivalModule, dict]:
    """Centralised training on ``train_idx`` (default: the train split), validated on ``val_idx`` (default: the
    val split). The epoch kept is the :class:`Selector`'s (``train.select``); with no validation patients,
    ``train.without_validation`` decides (``last``: the last epoch, with a warning; ``error``: raise).
    ``model.skip=auto`` is resolved here when the caller has not
    (:func:`~pipeline.training.skip_auto.resolve_skip`)."""
    cfg = resolve_skip(cfg, data, "centralised")[0]
    t = cfg.train
    train_idx = data.splits["train"] if train_idx is None else train_idx
    val_idx = data.splits["val"] if val_idx is None else val_idx
    if cfg.model.family == "linear" and t.loss == "cox" and t.linear_fit == "cv":  # full batch, penalty by CV
        model = new_model(data, cfg)
        info = fit_linear_centralised(model, data, np.concatenate([train_idx, val_idx]), cfg)
        return new_module(model.eval(), cfg), info
    keep = KeepBest(selector(cfg, "centralised training"))
    keep.selector.check_available(len(val_idx) > 0)
    module = new_module(new_model(data, cfg), cfg, validate=len(val_idx) > 0)
    offset = fit_offset(module.model, data, np.concatenate([train_idx, val_idx]), cfg)
    L.seed_everything(t.seed, workers=True, verbose=False)
    trainer = make_trainer(t.epochs, [keep], progress=progress, validate=len(val_idx) > 0)
    loaders = [make_loader(data, train_idx, t.batch_size, True, t.seed, t.max_tiles)]
    if len(val_idx):
        loaders.append(make_loader(data, val_idx, 64, False))
    trainer.fit(module, *loaders)
    if keep.state is not None:
        module.model.load_state_dict(keep.state)
    sel = keep.selector
    return module, {
        "select": t.select if sel.has_score else "last",
        "best_epoch": keep.epoch if keep.state is not None else t.epochs - 1,
        "best_val_loss": sel.best_loss if sel.has_score else None,
        "best_val_cindex": sel.best_cindex if sel.has_score else None,
        "val_history": keep.history,
        **({"offset_fit": offset} if offset is not None else {}),
    }


def offset_config(cfg: RunConfig) -> RunConfig:
    """The linear family's config for a ``model.skip=fitted`` network's offset (``ValueError`` where it cannot be
    fitted: the offset is the full-batch fit, ``train.linear_fit=cv``, of the Cox loss)."""
    if cfg.train.loss != "cox" or cfg.train.linear_fit != "cv":
        raise ValueError(
            f"model.skip=fitted needs train.loss=cox and train.linear_fit=cv (the linear fit to its optimum), got "
            f"train.loss={cfg.train.loss!r}, train.linear_fit={cfg.train.linear_fit!r}"
        )
    return cfg.with_overrides(["model.family=linear", "model.skip=none"])


def set_offset(model: torch.nn.Module, fitted: torch.nn.Module) -> None:
    """Copy a fitted linear-family model (weights and slide standardisation) into ``model``'s frozen offset."""
    offset = getattr(model, "offset", None)
    if offset is None:
        raise ValueError("set_offset: this model has no offset (model.skip is not 'fitted')")
    offset.load_state_dict(fitted.state_dict())


def fit_offset(model: torch.nn.Module, data: CohortData, idx: np.ndarray, cfg: RunConfig) -> dict | None:
    """Centralised: fit the linear family on the patients ``idx`` (its penalty by CV on them) and freeze it as
    ``model``'s offset (``model.skip=fitted``); returns the fit's record (None: the model has no offset)."""
    if getattr(model, "offset", None) is None:
        return None
    lin_cfg = offset_config(cfg)
    linear = new_model(data, lin_cfg)
    rec = fit_linear_centralised(linear, data, idx, lin_cfg)  # type: ignore[arg-type]
    set_offset(model, linear)
    log.info("model.skip=fitted: linear offset fitted on %d patients (penalty by CV)", len(idx))
    return rec.get("linear_fit", rec)
