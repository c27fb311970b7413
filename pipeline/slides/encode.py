"""The tile encoder placed for inference: device, precision, batch size, and the batched forward pass.

:class:`EncoderRunner` turns uint8 tile batches as the reader yields them into ``[B, D]`` float32 features
(preprocessing on the device, autocast, channels-last, optional ``torch.compile``, pinned asynchronous copies
on CUDA); :func:`choose_batch_size` finds the largest batch that fits on a GPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from data_specs.config import ExtractConfig
from models.encoders import TileEncoder

log = logging.getLogger(__name__)


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autodevice(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def choose_batch_size(fits, start: int = 32, cap: int = 2048) -> int:
    """Largest power-of-two batch in ``[start, cap]`` for which ``fits(b)`` runs without running out of memory.

    ``fits`` raises :class:`torch.OutOfMemoryError` when a batch does not fit. Returns ``start // 2`` (at
    least 1) when not even ``start`` fits.
    """
    best, b = 0, start
    while b <= cap:
        try:
            fits(b)
        except torch.OutOfMemoryError:
            break
        best, b = b, b * 2
    return best or max(1, start // 2)


class EncoderRunner:
    """The encoder placed for inference: device, autocast precision, channels-last, optional ``torch.compile``.

    ``runner(tiles)`` maps uint8 tiles, ``[B, 3, h, w]`` or as the reader yields them ``[B, h, w, 4]`` (RGBA;
    alpha dropped on the device), to ``[B, D]`` float32 features on the CPU. On CUDA, the device-to-host copy
    of one batch overlaps the next (``submit`` / ``collect``).
    """

    def __init__(self, enc: TileEncoder, cfg: ExtractConfig):
        self.enc = enc
        self.device = _autodevice(cfg.device)
        prec = cfg.precision if cfg.precision != "auto" else (enc.precision if self.device.type == "cuda" else "fp32")
        if prec == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            prec = "fp16"
        self.precision = prec
        self.amp_dtype = _PRECISIONS[prec]
        model = enc.model.to(self.device).eval()
        self.channels_last = cfg.channels_last
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        self.model = model
        if cfg.batch_size == "auto":
            self.batch_size = self._auto_batch() if self.device.type == "cuda" else 64
        else:
            self.batch_size = int(cfg.batch_size)
        self.pin = self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile size: let cuDNN pick its fastest kernels

    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            tiles = tiles.to(self.device, non_blocking=True)
            if tiles.shape[1] != 3:  # [B, H, W, 3|4] from the reader -> [B, 3, H, W] channels-last view
                tiles = tiles.permute(0, 3, 1, 2)[:, :3]
            x = self.enc.preprocess(tiles)  # [B, 3, H, W] float
            if not self.channels_last:
                x = x.contiguous()
            amp = self.amp_dtype != torch.float32
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp):
                return self.model(x)  # [B, D]

    def _auto_batch(self) -> int:
        _, h, w = self.enc.input_size

        def fits(b: int) -> None:
            self._forward(torch.zeros(b, 3, h, w, dtype=torch.uint8))
            torch.cuda.synchronize(self.device)

        b = choose_batch_size(fits)
        torch.cuda.empty_cache()
        b = max(1, b // 2)  # headroom for the other process-level allocations
        log.info("batch size %d chosen for %s on %s", b, self.enc.name, self.device)
        return b

    def submit(self, tiles: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Queue one batch; returns a handle for :meth:`collect`. On CUDA this returns before the GPU is done."""
        out = self._forward(tiles).float()
        if self.device.type == "cuda":
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return host, done
        return out, None

    def collect(self, pending: tuple[torch.Tensor, object]) -> np.ndarray:
        """Wait for that batch only (later batches keep the GPU busy meanwhile): ``[B, D]`` float32."""
        host, done = pending
        if done is not None:
            done.synchronize()  # type: ignore[attr-defined]
        return host.numpy()

    def __call__(self, tiles: torch.Tensor) -> np.ndarray:
        return self.collect(self.submit(tiles))
