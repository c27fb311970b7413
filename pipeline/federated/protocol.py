"""TODO federated.protocol."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

Arrays = dict[str, np.ndarray]


STRATEGIES = ("fedsgd", "fedavg", "fedprox", "fedadam", "fedyogi")


DEFAULT_SERVER_LR = {"fedsgd": 0.1, "fedavg": 1.0, "fedprox": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


@dataclass
class Update:
    """The only thing a site sends after local training.

    ``arrays``: per trainable parameter, the weight delta (local - global) or, for FedSGD, the gradient of
    the local loss; float32, same shapes as the parameters. ``num_examples``: the update's weight.
    """

    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    """The only thing a site sends after evaluating the global model on its validation patients."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def trainable_arrays(model: torch.nn.Module) -> Arrays:
    return {k: p.detach().cpu().numpy().copy() for k, p in model.named_parameters() if p.requires_grad}


def load_arrays(model: torch.nn.Module, arrays: Arrays) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in arrays.items():
            params[k].copy_(torch.from_numpy(np.asarray(v)))


def clip_l2(arrays: Arrays, max_norm: float) -> tuple[Arrays, float]:
    """Scale the whole update so its global L2 norm is at most ``max_norm``; returns (clipped, norm before)."""
    norm = math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays.values()))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: (a * scale).astype(np.float32) for k, a in arrays.items()}, norm


SECAGG_QUANTISATION = 2**26  # with modulus 2**32, up to 64 sites sum without overflow


STATS_KEY = "histofuse.cohort_statistics"


def _dumps(obj) -> str:
    """JSON with numpy arrays/scalars as tagged lists (summaries and normaliser states: no patient axis)."""

    def enc(o):
        if isinstance(o, np.ndarray):
            return {"__ndarray__": o.tolist(), "dtype": str(o.dtype)}
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"cannot encode {type(o).__name__}")

    return json.dumps(obj, default=enc)


def _loads(text: str):
    return json.loads(text, object_hook=lambda d: np.asarray(d["__ndarray__"], d["dtype"]) if "__ndarray__" in d else d)
