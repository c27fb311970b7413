"""What travels between a site and the server, and how: the Flower-free contract of a federated run.

Owns the message payloads (:class:`Update`, :class:`Evaluation`), the array helpers both halves use
(trainable weights in and out of a model, L2 clipping), the JSON encoding of site summaries and normaliser
states (:func:`encode_record` / :func:`decode_record`), and the mapping of Flower's run config
(``[tool.flwr.app.config]``, ``flwr run --run-config``) onto the histofuse :class:`RunConfig`
(:func:`run_config_from_flower`). Imports no Flower.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_specs.config import RunConfig, resolve_config

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


def secagg_shares_threshold(shares: int | None, threshold: int | None, n_sites: int) -> tuple[int, int]:
    """SecAgg+ ``(shares, reconstruction threshold)`` for ``n_sites``: by default every site holds a share of
    every site's secrets and a strict majority of the shares (``shares // 2 + 1``) reconstructs them, so the
    server colluding with any minority of the sites cannot unmask an update; at most ``shares - threshold``
    sites may drop out of a round. Both are capped so that Flower accepts them (threshold below the shares)."""
    n_shares = min(shares or n_sites, n_sites)
    t = threshold if threshold is not None else n_shares // 2 + 1
    return n_shares, max(2, min(t, n_shares - 1)) if n_shares > 2 else min(t, n_shares)


STATS_KEY = "histofuse.cohort_statistics"  # where a site keeps the cohort-level normalisers it was sent


def encode_record(obj: Any) -> str:
    """JSON with numpy arrays/scalars as tagged lists (summaries and normaliser states: no patient axis)."""

    def enc(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return {"__ndarray__": o.tolist(), "dtype": str(o.dtype)}
        if isinstance(o, np.generic):
            return o.item()
        if callable(getattr(o, "to_wire", None)):  # typed site summaries: plain JSON values
            return o.to_wire()
        raise TypeError(f"cannot encode {type(o).__name__}")

    return json.dumps(obj, default=enc)


def decode_record(text: str) -> Any:
    """The inverse of :func:`encode_record` (tagged lists back to numpy arrays of their dtype)."""
    return json.loads(text, object_hook=lambda d: np.asarray(d["__ndarray__"], d["dtype"]) if "__ndarray__" in d else d)


FLOWER_RUN_KEYS = ("config", "out", "resume")  # the run config's own keys; every other key is SECTION.KEY


def run_config_from_flower(run_config: Mapping[str, Any]) -> RunConfig:
    """The histofuse run config from Flower's run config (the same for the ServerApp and every ClientApp).

    ``config``: a histofuse YAML ("" = defaults); ``out``: the run folder; every other key is a histofuse
    setting ``SECTION.KEY`` (``[tool.flwr.app.config.federated]`` ``rounds`` arrives as
    ``federated.rounds``), applied over the YAML; ``""`` leaves the YAML's (or default) value. E.g.
    ``flwr run . CONNECTION --run-config 'federated.rounds=30 federated.strategy="fedadam"'``.
    """
    overrides = []
    for key, value in sorted(run_config.items()):
        if key in FLOWER_RUN_KEYS or value == "":
            continue
        if "." not in key:
            raise ValueError(
                f"Flower run config key {key!r}: expected SECTION.KEY (e.g. federated.rounds) "
                f"or one of {FLOWER_RUN_KEYS}"
            )
        overrides.append(f"{key}={json.dumps(value)}")
    yaml_path = str(run_config.get("config", "")) or None
    out = str(run_config.get("out", "")) or None
    return resolve_config(yaml_path, overrides, out=out)


REPEATING_ERRORS = (ValueError, FileNotFoundError)  # a site's data or files: the same error every round


class SiteDataError(RuntimeError):
    """A site failed for a reason that will repeat (invalid data, a missing file): the run stops, naming it.

    Raised at the site around its work (so Flower's error reply carries this class name and the message
    ``site NAME: ValueError: ...``) and again at the server when such a reply arrives.
    """


def site_data_error(site: str, e: BaseException) -> SiteDataError:
    """The :class:`SiteDataError` for ``e`` at ``site`` (message: ``site NAME: TYPE: text``)."""
    return SiteDataError(f"site {site}: {type(e).__name__}: {e}")


def is_repeating_failure(reason: str) -> bool:
    """Whether an error reply's reason is a :class:`SiteDataError` (embedded and deployed reply formats)."""
    return SiteDataError.__name__ in reason
