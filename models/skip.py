"""The linear skip term of the network (``model.skip=linear``): a ridge-Cox-shaped term inside the network.

``skip(x) = w_s . z(mean of the bag's tiles) / sqrt(D) + w_g . omics / sqrt(G) + w_c . clinical / sqrt(C)``,
where ``z`` standardises the mean-pooled tile features with a mean and scale fitted on the training slides (from
per-site summaries, by the caller: :meth:`LinearSkip.set_slide_norm`). Weights start at 0. The network adds it to
its log hazard and scales its own (attention / MLP / fusion) output by a learnable gate that starts at 0
(:class:`models.survival.MultimodalSurvival`), so at initialisation the network *is* this linear model and the
nonlinear branch enters only as far as training moves the gate: it must earn its place.

Each modality block is divided by the square root of its width so that the curvature of the Cox loss in the
block's weights is bounded by the largest eigenvalue of the inputs' correlation matrix over the width (<= 1),
whatever the number of tile features or genes: one learning rate fits every cohort, and gradient descent from 0
with the epoch (or federated round) chosen on validation acts as the ridge penalty.

A missing modality contributes 0 (inputs are standardised upstream, so 0 is the training mean; an empty bag
gets ``z = 0``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SlideStandardised(nn.Module):
    """Base of the linear terms over mean-pooled tile features (:class:`LinearSkip`,
    :class:`models.linear.LinearSurvival`): the training slides' mean and scale ``[D]`` (buffers ``slide_mean`` and
    ``slide_scale``, saved in the state dict) and each bag's standardised mean.

    Args:
        feature_dim: tile feature size D (0: no slides).
        no_slide: how an error names the missing slide part.
    """

    def __init__(self, feature_dim: int, no_slide: str = "this model has no slide term"):
        super().__init__()
        self.feature_dim, self._no_slide = max(0, feature_dim), no_slide
        self.register_buffer("slide_mean", torch.zeros(self.feature_dim))
        self.register_buffer("slide_scale", torch.ones(self.feature_dim))

    def standardised_mean(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised mean of each bag's real tiles ``[B, D]`` (0 for an empty bag) and the uniform
        per-tile weights ``[B, N]`` the mean gives (0 on padding)."""
        w = mask.to(features.dtype)  # (B, N)
        n = w.sum(1, keepdim=True)  # (B, 1)
        attn = w / n.clamp(min=1.0)
        mean = torch.einsum("bn,bnd->bd", attn, features)  # (B, D)
        z = (mean - self.get_buffer("slide_mean")) / self.get_buffer("slide_scale")
        return z.masked_fill(n == 0, 0.0), attn

    def set_slide_norm(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        """Store the mean ``[D]`` and scale ``[D]`` (> 0) of the training slides' mean-pooled tile features."""
        if self.feature_dim == 0:
            raise ValueError(f"set_slide_norm: {self._no_slide} (feature_dim=0)")
        if mean.shape != (self.feature_dim,) or scale.shape != (self.feature_dim,):
            raise ValueError(
                f"set_slide_norm: expected mean and scale of shape ({self.feature_dim},), got "
                f"{tuple(mean.shape)} and {tuple(scale.shape)}"
            )
        if not bool((scale > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("set_slide_norm: scale must be > 0 and mean finite")
        self.get_buffer("slide_mean").copy_(mean.to(torch.float32))
        self.get_buffer("slide_scale").copy_(scale.to(torch.float32))


class LinearSkip(SlideStandardised):
    """Linear log-hazard term over the standardised mean-pooled tile features, omics and clinical covariates.

    Args:
        feature_dim: tile feature size D (0: no slides).
        n_genes: G (0: no omics).
        n_clinical: C (0: no clinical covariates).

    Raises:
        ValueError: no modality.
    """

    def __init__(self, feature_dim: int = 0, n_genes: int = 0, n_clinical: int = 0):
        if feature_dim <= 0 and n_genes <= 0 and n_clinical <= 0:
            raise ValueError("LinearSkip needs at least one modality (feature_dim, n_genes or n_clinical > 0)")
        super().__init__(feature_dim, "this skip term has no slide part")  # slide standardisation buffers
        self.slide = zero_linear(feature_dim)
        self.omics = zero_linear(n_genes)
        self.clinical = zero_linear(n_clinical)

    def forward(
        self,
        features: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        omics: torch.Tensor | None = None,
        omics_mask: torch.Tensor | None = None,
        clinical: torch.Tensor | None = None,
        clinical_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The term ``[B]``. Args: ``features [B, N, D]`` with ``mask [B, N]`` (True = real tile);
        ``omics [B, G]`` with ``omics_mask [B]``; ``clinical [B, C]`` with ``clinical_mask [B]``."""
        terms: list[torch.Tensor] = []
        if self.slide is not None:
            assert features is not None and mask is not None, "skip has a slide term: pass features and mask"
            terms.append(self.slide(self.slide_z(features, mask)))
        for lin, x, present, what in (
            (self.omics, omics, omics_mask, "omics"),
            (self.clinical, clinical, clinical_mask, "clinical"),
        ):
            if lin is not None:
                assert x is not None and present is not None, f"skip has a {what} term: pass {what} and its mask"
                x = x.masked_fill(~present.unsqueeze(1), 0.0) / math.sqrt(x.shape[1])
                terms.append(lin(x))
        return torch.stack(terms).sum(0).squeeze(-1)  # (B,)

    def slide_z(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Standardised mean of each bag's real tiles over ``sqrt(D)``: ``[B, D]`` (0 for an empty bag)."""
        return self.standardised_mean(features, mask)[0] / math.sqrt(self.feature_dim)


def zero_linear(n_in: int) -> nn.Linear | None:
    """``n_in -> 1`` without bias, weights 0; None for an absent modality."""
    if n_in <= 0:
        return None
    lin = nn.Linear(n_in, 1, bias=False)
    nn.init.zeros_(lin.weight)
    return lin
