"""The linear model family: a Cox (or discrete-time) model that is linear in every modality.

``log_hz = w_s . z(mean of the bag's tiles) + w_g . omics + w_c . clinical``, where ``z`` standardises the
mean-pooled tile features with a mean and scale fitted on the training slides (from per-site summaries, by
the caller: :meth:`LinearSurvival.set_slide_norm`). The inputs and the output (:class:`SurvivalOutput`) are the
network's, so it trains through the same centralised and federated code. The L2 (ridge) penalty is the
optimiser's weight decay; there is no intercept (a Cox model has none) except one bias per bin for a
discrete-time head (``n_bins = K``: every bin's logit is ``bias_k + log_hz``, survival ``cumprod(1 - hazards)``,
and the ranking score ``-sum_k S_k``, as in :mod:`models.survival`).

A missing modality contributes 0: omics and clinical inputs are standardised upstream, so 0 is the training
mean; a patient without tiles gets ``z = 0`` likewise. The tile "attention" returned is uniform over the real
tiles (``1 / N_i``): that is exactly the weight mean pooling gives each tile.

Example::

    m = LinearSurvival(feature_dim=512, n_genes=300, n_clinical=4)
    m.set_slide_norm(mean, scale)  # [512] each, from the training slides
    out = m(features, mask, omics, omics_mask, clinical, clinical_mask)  # out.log_hz [B]
"""

from __future__ import annotations

import torch
from torch import nn

from models.losses import survival_from_logits
from models.survival import SurvivalOutput


class LinearSurvival(nn.Module):
    """Linear Cox / discrete-time model over mean-pooled tile features, omics and clinical covariates.

    Args:
        feature_dim: tile feature size D (0: no slides).
        n_genes: G (0: no omics).
        n_clinical: C (0: no clinical covariates).
        n_bins: 0 for a Cox head, K > 0 for a discrete-time head with K bins.

    Weights start at 0 (the null model: every patient has the same risk), so training is deterministic given
    the data order. Raises ``ValueError`` for no modality or a negative ``n_bins``.
    """

    def __init__(self, feature_dim: int = 0, n_genes: int = 0, n_clinical: int = 0, n_bins: int = 0):
        super().__init__()
        if feature_dim <= 0 and n_genes <= 0 and n_clinical <= 0:
            raise ValueError("LinearSurvival needs at least one modality (feature_dim, n_genes or n_clinical > 0)")
        if n_bins < 0:
            raise ValueError(f"n_bins must be >= 0 (0 = Cox head), got {n_bins}")
        self.feature_dim, self.n_bins = max(0, feature_dim), n_bins
        self.slide_linear = _zero_linear(feature_dim)
        self.omics_linear = _zero_linear(n_genes)
        self.clinical_linear = _zero_linear(n_clinical)
        # standardisation of the mean-pooled tile features; set from the training slides, saved in the state dict
        self.register_buffer("slide_mean", torch.zeros(self.feature_dim))
        self.register_buffer("slide_scale", torch.ones(self.feature_dim))
        self.bin_bias = nn.Parameter(torch.zeros(n_bins)) if n_bins > 0 else None
        if n_bins > 0:
            self.register_buffer("bin_edges", torch.arange(n_bins + 1, dtype=torch.float32))

    def forward(
        self,
        features: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        omics: torch.Tensor | None = None,
        omics_mask: torch.Tensor | None = None,
        clinical: torch.Tensor | None = None,
        clinical_mask: torch.Tensor | None = None,
    ) -> SurvivalOutput:
        """Args:
        features: ``[B, N, D]`` tile features; mask ``[B, N]`` bool (True = real tile).
        omics: ``[B, G]`` standardised expression; omics_mask ``[B]`` bool (True = present).
        clinical: ``[B, C]`` covariates; clinical_mask ``[B]`` bool.
        """
        terms: list[torch.Tensor] = []
        attn = None
        if self.slide_linear is not None:
            assert features is not None and mask is not None, "model has a slide term: pass features and mask"
            z, attn = self.slide_z(features, mask)
            terms.append(self.slide_linear(z))
        for lin, x, present, what in (
            (self.omics_linear, omics, omics_mask, "omics"),
            (self.clinical_linear, clinical, clinical_mask, "clinical"),
        ):
            if lin is not None:
                assert x is not None and present is not None, f"model has a {what} term: pass {what} and its mask"
                terms.append(lin(x.masked_fill(~present.unsqueeze(1), 0.0)))
        lh = torch.stack(terms).sum(0).squeeze(-1)  # (B,)
        if self.bin_bias is None:
            return SurvivalOutput(lh, attn)
        logits = lh.unsqueeze(1) + self.bin_bias  # (B, K)
        hazards, survival, risk = survival_from_logits(logits)
        return SurvivalOutput(risk, attn, logits=logits, hazards=hazards, survival=survival)

    def slide_z(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
            raise ValueError("set_slide_norm: this model has no slide term (feature_dim=0)")
        if mean.shape != (self.feature_dim,) or scale.shape != (self.feature_dim,):
            raise ValueError(
                f"set_slide_norm: expected mean and scale of shape ({self.feature_dim},), got "
                f"{tuple(mean.shape)} and {tuple(scale.shape)}"
            )
        if not bool((scale > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("set_slide_norm: scale must be > 0 and mean finite")
        self.get_buffer("slide_mean").copy_(mean.to(torch.float32))
        self.get_buffer("slide_scale").copy_(scale.to(torch.float32))

    def set_bin_edges(self, edges: torch.Tensor) -> None:
        """Store the discrete-time bin edges ``[K + 1]`` (from :func:`models.losses.discrete_time_edges`)."""
        if self.n_bins == 0:
            raise ValueError("set_bin_edges: this model has a Cox head (n_bins=0)")
        if edges.shape != (self.n_bins + 1,):
            raise ValueError(f"set_bin_edges: expected {self.n_bins + 1} edges, got shape {tuple(edges.shape)}")
        buf = self.get_buffer("bin_edges")
        buf.copy_(edges.to(buf.dtype))


def _zero_linear(n_in: int) -> nn.Linear | None:
    """``n_in -> 1`` without bias, weights 0; None for an absent modality."""
    if n_in <= 0:
        return None
    lin = nn.Linear(n_in, 1, bias=False)
    nn.init.zeros_(lin.weight)
    return lin
