"""CPU encoder paths side by side: eager vs jit-traced + frozen, fp32 vs bf16 autocast, float vs uint8 resize.

    python scripts/bench_encoder_paths.py [--encoders efficientnet_lite0_imagenet resnet50] [--batch 64]
                                          [--repeats 3]

For each encoder (random weights where no local weights exist: speed only), on one batch of real H&E tiles
(channels-last, 224 px): tiles/s of the model alone (median of ``--repeats`` after two warm-up calls, paths
timed in rotated order) and each path's largest per-tile relative L2 error against eager fp32. Then the
batched preprocessing of 448 px tiles to 224 px (what a 0.25 um/px slide read for 0.5 um/px tiles needs):
resizing the float conversion vs resizing the uint8 pixels first (what ``TileEncoder.preprocess`` does).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tiles(n: int, side: int) -> torch.Tensor:
    """``[n, 3, side, side]`` uint8 crops of the real carcinoma H&E image."""
    from importlib import resources

    he = np.asarray(Image.open(str(resources.files("pipeline.cohorts.demo_assets") / "tumor_target_he.png")))
    he = he[..., :3]
    out = []
    for i in range(n):
        y, x = (i * 37) % (he.shape[0] - side), (i * 53) % (he.shape[1] - side)
        out.append(torch.from_numpy(he[y : y + side, x : x + side].copy()).permute(2, 0, 1))
    return torch.stack(out)


def _time(fns: dict, n: int, repeats: int) -> dict[str, float]:
    """Tiles/s of each callable: two warm-up calls, then ``repeats`` rounds in rotated order; medians."""
    names = list(fns)
    for k in names:
        fns[k]()
        fns[k]()
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            rates[k].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def encoder_paths(name: str, batch: int, repeats: int) -> None:
    from models import build_encoder
    from pipeline.slides.encode import relative_error, trace_frozen

    enc = build_encoder(name, random_weights=name != "efficientnet_lite0_imagenet")
    x = enc.preprocess(_tiles(batch, 224))  # [B, 3, 224, 224] float, channels-last
    eager = enc.model.eval().to(memory_format=torch.channels_last)
    traced = trace_frozen(eager, x[:2])
    with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        bf_traced = torch.jit.freeze(torch.jit.trace(copy.deepcopy(eager), x[:2], check_trace=False))

    def bf(m):
        def go():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(x)

        return go

    fns = {"eager fp32": lambda: eager(x), "traced fp32": lambda: traced(x), "eager bf16": bf(eager)}
    fns["traced bf16"] = bf(bf_traced)
    with torch.inference_mode():
        ref = eager(x)
        errs = {k: relative_error(f().float(), ref) for k, f in fns.items()}
        rates = _time(fns, batch, repeats)
    base = rates["eager fp32"]
    for k in fns:
        print(f"{name:28s} {k:12s} {rates[k]:7.1f} tiles/s ({rates[k] / base:.2f}x)  max rel err {errs[k]:.1e}")


def resize_paths(batch: int, repeats: int) -> None:
    from models import build_encoder

    enc = build_encoder("efficientnet_lite0_imagenet")
    t = _tiles(batch, 448).contiguous(memory_format=torch.channels_last)
    size = (224, 224)

    def float_first():
        y = torch.nn.functional.interpolate(t.float(), size=size, mode="bicubic", antialias=True).clamp_(0, 255)
        return y

    with torch.inference_mode():
        rates = _time({"float resize": float_first, "uint8 resize": lambda: enc.preprocess(t)}, batch, repeats)
    for k, v in rates.items():
        print(f"preprocess {batch} tiles 448 -> 224 px, {k:12s}: {v:8.1f} tiles/s ({batch / v * 1e3:.0f} ms/batch)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", default=["efficientnet_lite0_imagenet", "resnet50"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch marks TorchScript deprecated
    torch.set_num_threads(os.cpu_count() or 1)
    from pipeline.slides.encode import cpu_has_native_bf16

    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, native bf16: {cpu_has_native_bf16()}; load {load}")
    for name in args.encoders:
        encoder_paths(name, args.batch, args.repeats)
    resize_paths(args.batch, args.repeats)
    print(f"load at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
