"""The tile encoder placed for inference: device, precision, batch size, and the batched forward pass.

:class:`EncoderRunner` turns uint8 tile batches as the reader yields them into ``[B, D]`` float32 features
(preprocessing on the device, autocast, channels-last, optional ``torch.compile``, pinned asynchronous copies
on CUDA); :func:`choose_batch_size` finds the largest batch that fits on a GPU.

On the CPU the encoder runs, by default (``extract.optimize=auto``), as a traced and frozen TorchScript graph
(:func:`trace_frozen`: batch norm folded into the convolutions, constants inlined), in fp32 only. The graph is
accepted only if its features on a check batch (another batch size than the traced one) equal eager fp32
within :data:`RTOL` (relative L2 error per tile); otherwise the eager model is used, with a warning.

``extract.optimize=inductor`` adds a graph compiled by ``torch.compile``'s inductor with freezing (weights
folded as constants, C++ kernels; it needs a C++ compiler) for batches of exactly ``batch_size`` tiles, checked
against eager fp32 the same way; the encode loop regroups a slide's kept tiles into full batches
(:func:`full_batches`) and the traced graph takes each slide's last, shorter one. Its compile costs tens of
seconds per process, so ``auto`` tries it only for a run expected to encode at least
:data:`AUTO_INDUCTOR_TILES` tiles, and keeps it only where it timed faster than the traced graph on the check
batch. Measured on 2 cores (docs/benchmarks.md) the gain depends on the model and the allocator: with the
process's allocator setting (:mod:`pipeline.allocator`) efficientnet-lite0 1.33x and resnet50 1.00x the traced
graph; with glibc's defaults resnet50 1.3-1.5x, efficientnet-lite0 0.9x.

``precision=auto`` is fp32 on the CPU: bf16 autocast runs (eager) only when asked for, with a warning on a CPU
without native bf16 (AVX512-BF16 / AMX), where it is emulated and slow.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from data_specs.config import ExtractConfig
from models.encoders import TileEncoder

log = logging.getLogger(__name__)


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest accepted relative L2 error ||f - f_eager|| / ||f_eager|| of any tile's features, traced vs eager fp32
# (measured ~1e-6 on real H&E tiles). Tracing is fp32 only: traced under bf16 autocast, efficientnet-lite0's
# features on real tiles moved by up to 47% per tile (eager bf16: 3-16%).
RTOL = 1e-4
# Tiles a run is expected to encode (its first slide's grid times its slides) from which extract.optimize=auto
# also tries the inductor graph on the CPU: compiling, checking and timing it costs ~20-40 s on 2 cores for
# resnet50, paid whether it is kept or not; at ~10-20 tiles/s that is under 5% of a 20,000-tile run (one to four
# resection slides at 0.5 um/px; a biopsy holds a few hundred tiles). Measured on 2 cores with the process's
# allocator setting (pipeline.allocator), inductor did not beat the traced graph for resnet50 or lite0.
AUTO_INDUCTOR_TILES = 20_000
# auto keeps the inductor graph only where it is at least this much faster than the traced one (timing noise)
_INDUCTOR_GAIN = 1.05


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products in hardware (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query
        return False


def trace_frozen(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``torch.jit.trace`` + ``torch.jit.freeze`` of an eval-mode model, fp32 (batch norm folded, weights inlined).

    torch marks TorchScript deprecated in favour of ``torch.compile``, which on the CPU needs a C++ compiler at
    run time; the deprecation warning is silenced here and a failing trace falls back to eager (see the module).

    Args:
        example: ``[b, 3, H, W]`` float input of the shape and memory format the model will see.
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.freeze(torch.jit.trace(model.eval(), example, check_trace=False))


CPU_BATCH, GPU_BATCH = 32, 64  # extract.batch_size's device defaults (None, and "auto" on a CPU)


def device_batch_size(setting: int | str | None, device: torch.device) -> int:
    """Tiles per encoder batch for ``extract.batch_size`` on ``device`` before any GPU probing: a number as given;
    None or ``auto``: 32 on a CPU (at 64 the heap's peak grew with the slide's tile count under the CLI's
    allocator setting, 1.04-1.33x at 4x area, where 32 stayed within 0.94-1.06x at equal speed: docs/benchmarks.md),
    64 on a GPU (``auto`` then probes for the largest that fits)."""
    if setting is None or setting == "auto":
        return CPU_BATCH if device.type == "cpu" else GPU_BATCH
    return int(setting)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU (``$CXX``, else g++, c++ or clang++ on the PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def full_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, int]], size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Regroup the reader's ``(x [K, ...], index [K], rejected)`` batches into batches of exactly ``size`` tiles.

    For an encoder graph compiled for one batch shape: only the last batch is shorter (possibly empty, carrying
    the last rejected count). A batch that is already full passes through without a copy; the others are
    joined in grid order (one copy of their uint8 tiles).
    """
    xs: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    n = dropped = 0
    none: tuple[torch.Tensor, torch.Tensor] | None = None  # an empty batch of the reader's shape
    for x, idx, rejected in batches:
        none = none or (x[:0], idx[:0])
        dropped += rejected
        if not xs and len(idx) == size:
            yield x, idx, dropped
            dropped = 0
            continue
        if len(idx):
            xs.append(x)
            ids.append(idx)
            n += len(idx)
        while n >= size:
            x_all, i_all = torch.cat(xs), torch.cat(ids)
            yield x_all[:size], i_all[:size], dropped
            dropped, n = 0, n - size
            xs, ids = ([x_all[size:]], [i_all[size:]]) if n else ([], [])
    if xs:
        yield torch.cat(xs), torch.cat(ids), dropped
    elif dropped and none is not None:
        yield none[0], none[1], dropped


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-row ``||got - ref|| / ||ref||`` of ``[B, D]`` features (0 when they are equal)."""
    num = (got.float() - ref.float()).norm(dim=1)
    return float((num / ref.float().norm(dim=1).clamp_min(1e-12)).max())


def _freezing():
    """Inductor's freezing (weights as constants, batch norm folded) for the compile this context triggers."""
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


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

    ``runner(tiles)`` maps uint8 tiles, ``[B, 3, h, w]`` or as the reader yields them ``[B, h, w, 3]`` (RGB, a
    channels-last view at no copy; ``[B, h, w, 4]`` RGBA has its alpha dropped on the device), to ``[B, D]``
    float32 features on the CPU. On CUDA, the device-to-host copy
    of one batch overlaps the next (``submit`` / ``collect``).
    """

    def __init__(self, enc: TileEncoder, cfg: ExtractConfig, expected_tiles: int = 0):
        """``expected_tiles``: how many tiles this run is expected to encode (0: unknown), for ``optimize=auto``."""
        self.enc = enc
        self.device = _autodevice(cfg.device)
        prec = cfg.precision if cfg.precision != "auto" else (enc.precision if self.device.type == "cuda" else "fp32")
        if prec == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            prec = "fp16"
        if prec == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("extract.precision=bf16 on a CPU without native bf16: emulated, expect it to be slow")
        self.precision = prec
        self.amp_dtype = _PRECISIONS[prec]
        model = enc.model.to(self.device).eval()
        self.channels_last = cfg.channels_last
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        # fixed: the inductor graph for batches of exactly batch_size (optimize=inductor), else None
        self.fixed: nn.Module | None = None
        self.batch_size = device_batch_size(cfg.batch_size, self.device)
        self.model, self.optimize = self._optimized(model, cfg.optimize)
        if self.optimize in ("inductor", "auto"):
            self.fixed, self.optimize = self._inductor(model, self.optimize == "inductor", expected_tiles)
        if cfg.batch_size == "auto" and self.device.type == "cuda":
            self.batch_size = self._auto_batch()
        self.pin = self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile size: let cuDNN pick its fastest kernels

    def _optimized(self, model: nn.Module, optimize: str) -> tuple[nn.Module, str]:
        """The model to run and how it was optimised (``trace`` or ``none``), by ``extract.optimize``.

        Returns ``optimize`` itself (``auto`` / ``inductor``) with the traced model where the inductor graph is
        still to be tried (:meth:`_inductor`).
        """
        if optimize == "none" or hasattr(model, "_orig_mod"):  # _orig_mod: torch.compile'd, optimised already
            return model, "none"
        if self.device.type != "cpu":
            if optimize == "auto":
                return model, "none"
            raise ValueError(f"extract.optimize={optimize} is the CPU path; on {self.device} use extract.compile=true")
        if self.precision != "fp32":
            if optimize == "auto":
                return model, "none"
            raise ValueError(f"extract.optimize={optimize} is fp32 only, got extract.precision={self.precision}")
        _, h, w = self.enc.input_size
        gen = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        example = torch.randn(2, 3, h, w, generator=gen).contiguous(memory_format=fmt)
        check = torch.randn(3, 3, h, w, generator=gen).contiguous(memory_format=fmt)  # another batch size
        try:
            traced = trace_frozen(model, example)
            with torch.inference_mode():
                ref = model(check)
                got = traced(check)
                got = traced(check)  # the second call runs the optimised graph
            err = relative_error(got, ref)
        except Exception as e:  # tracing fails in many ways (data-dependent control flow, unsupported ops)
            if optimize != "auto":
                raise ValueError(f"encoder '{self.enc.name}': extract.optimize={optimize} failed to trace ({e})") from e
            log.warning(
                "encoder '%s' could not be traced (%s: %s); running it eager", self.enc.name, type(e).__name__, e
            )
            return model, "none"
        if err > RTOL:
            msg = f"encoder '{self.enc.name}': traced features differ from eager fp32 by {err:.2g} > {RTOL}"
            if optimize != "auto":
                raise ValueError(msg)
            log.warning("%s; running it eager", msg)
            return model, "none"
        log.info("encoder '%s' traced and frozen (relative error %.1e vs eager fp32)", self.enc.name, err)
        return traced, "trace" if optimize == "trace" else optimize

    def _inductor(self, model: nn.Module, asked: bool, expected_tiles: int) -> tuple[nn.Module | None, str]:
        """The inductor graph for batches of ``batch_size`` and the resulting ``optimize`` (see the module).

        ``asked`` (``optimize=inductor``): a failure to compile, or features off eager fp32 by more than
        :data:`RTOL`, raises. Under ``auto`` it is tried only for runs of at least :data:`AUTO_INDUCTOR_TILES`
        expected tiles with a C++ compiler present, and kept only if faster than the traced graph on the check
        batch; otherwise the traced graph runs alone (``trace``).
        """
        name = self.enc.name
        if not asked and (expected_tiles < AUTO_INDUCTOR_TILES or cxx_compiler() is None):
            return None, "trace"
        if asked and cxx_compiler() is None:
            raise ValueError("extract.optimize=inductor needs a C++ compiler (g++ or clang++; or set CXX)")
        _, h, w = self.enc.input_size
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.randn(self.batch_size, 3, h, w, generator=torch.Generator().manual_seed(1))
        x = x.contiguous(memory_format=fmt)
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(model, dynamic=False)
            with torch.inference_mode():
                ref = model(x)
                with _freezing():
                    got = compiled(x)  # compiles
                    start = time.perf_counter()
                    got = compiled(x)
                    t_fixed = time.perf_counter() - start
            err = relative_error(got, ref)
        except Exception as e:  # no working compiler, an op inductor cannot lower, ...
            if asked:
                raise ValueError(f"encoder '{name}': extract.optimize=inductor failed to compile ({e})") from e
            log.warning("encoder '%s': inductor failed (%s: %s); running it traced", name, type(e).__name__, e)
            return None, "trace"
        if err > RTOL:
            msg = f"encoder '{name}': inductor features differ from eager fp32 by {err:.2g} > {RTOL}"
            if asked:
                raise ValueError(msg)
            log.warning("%s; running it traced", msg)
            return None, "trace"
        built = time.perf_counter() - t0
        if not asked:
            with torch.inference_mode():
                self.model(x)  # the traced graph's first call at this batch size re-specialises it
                start = time.perf_counter()
                self.model(x)
                t_traced = time.perf_counter() - start
            if t_traced < _INDUCTOR_GAIN * t_fixed:
                log.info(
                    "encoder '%s': inductor %.2fs vs traced %.2fs per batch; running it traced", name, t_fixed, t_traced
                )
                return None, "trace"
            log.info("encoder '%s': inductor %.2fs vs traced %.2fs per batch", name, t_fixed, t_traced)
        log.info(
            "encoder '%s' compiled by inductor for batches of %d in %.0fs (relative error %.1e vs eager fp32)",
            name,
            self.batch_size,
            built,
            err,
        )
        return compiled, "inductor"

    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            tiles = tiles.to(self.device, non_blocking=True)
            if tiles.shape[1] != 3:  # [B, H, W, 3|4] from the reader -> [B, 3, H, W] channels-last view
                tiles = tiles.permute(0, 3, 1, 2)[:, :3]
            x = self.enc.preprocess(tiles)  # [B, 3, H, W] float
            if not self.channels_last:
                x = x.contiguous()
            if self.fixed is not None and len(x) == self.batch_size:
                with _freezing():
                    return self.fixed(x)  # [B, D]
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
