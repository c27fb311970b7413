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
from models.skip import SlideStandardised, zero_linear
from models.survival import SurvivalOutput


class LinearSurvival(SlideStandardised):
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
        if feature_dim <= 0 and n_genes <= 0 and n_clinical <= 0:
            raise ValueError("LinearSurvival needs at least one modality (feature_dim, n_genes or n_clinical > 0)")
        if n_bins < 0:
            raise ValueError(f"n_bins must be >= 0 (0 = Cox head), got {n_bins}")
        super().__init__(feature_dim)  # slide standardisation buffers, set from the training slides
        self.n_bins = n_bins
        self.slide_linear = zero_linear(feature_dim)
        self.omics_linear = zero_linear(n_genes)
        self.clinical_linear = zero_linear(n_clinical)
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
        """:meth:`standardised_mean`: ``z [B, D]`` and the uniform tile weights ``[B, N]``."""
        return self.standardised_mean(features, mask)

    def terms(self) -> list[nn.Linear]:
        """The linear terms present, in coefficient order: slides, omics, clinical."""
        return [lin for lin in (self.slide_linear, self.omics_linear, self.clinical_linear) if lin is not None]

    def coefficients(self) -> torch.Tensor:
        """All weights as one vector ``[F]`` (slides' D, then genes' G, then clinical C; absent modalities
        skipped): ``log_hz = x . coefficients()`` for the design row ``x`` of :meth:`design_rows`."""
        return torch.cat([lin.weight.detach()[0] for lin in self.terms()])

    def set_coefficients(self, beta: torch.Tensor) -> None:
        """Load a coefficient vector ``[F]`` (order of :meth:`coefficients`), e.g. from a full-batch fit."""
        sizes = [lin.in_features for lin in self.terms()]
        if beta.shape != (sum(sizes),) or not bool(torch.isfinite(beta).all()):
            raise ValueError(
                f"set_coefficients: expected {sum(sizes)} finite coefficients, got shape {tuple(beta.shape)}"
            )
        with torch.no_grad():
            for lin, part in zip(self.terms(), torch.split(beta, sizes), strict=True):
                lin.weight.copy_(part.to(lin.weight.dtype).unsqueeze(0))

    def design_rows(
        self,
        slide_means: torch.Tensor | None,
        has_tiles: torch.Tensor | None,
        omics: torch.Tensor | None = None,
        omics_mask: torch.Tensor | None = None,
        clinical: torch.Tensor | None = None,
        clinical_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The design matrix ``X [B, F]`` (float64) with ``log_hz = X @ coefficients()``.

        Args:
            slide_means: ``[B, D]`` each bag's mean tile feature (not yet standardised); has_tiles ``[B]`` bool.
            omics, omics_mask, clinical, clinical_mask: as in :meth:`forward`.
        """
        cols: list[torch.Tensor] = []
        if self.slide_linear is not None:
            assert slide_means is not None and has_tiles is not None, "model has a slide term: pass slide means"
            mean, scale = self.get_buffer("slide_mean").double(), self.get_buffer("slide_scale").double()
            z = (slide_means.double() - mean) / scale
            cols.append(z.masked_fill(~has_tiles.unsqueeze(1), 0.0))
        for lin, x, present, what in (
            (self.omics_linear, omics, omics_mask, "omics"),
            (self.clinical_linear, clinical, clinical_mask, "clinical"),
        ):
            if lin is not None:
                assert x is not None and present is not None, f"model has a {what} term: pass {what} and its mask"
                cols.append(x.double().masked_fill(~present.unsqueeze(1), 0.0))
        return torch.cat(cols, 1)

    def set_bin_edges(self, edges: torch.Tensor) -> None:
        """Store the discrete-time bin edges ``[K + 1]`` (from :func:`models.losses.discrete_time_edges`)."""
        if self.n_bins == 0:
            raise ValueError("set_bin_edges: this model has a Cox head (n_bins=0)")
        if edges.shape != (self.n_bins + 1,):
            raise ValueError(f"set_bin_edges: expected {self.n_bins + 1} edges, got shape {tuple(edges.shape)}")
        buf = self.get_buffer("bin_edges")
        buf.copy_(edges.to(buf.dtype))


def cox_nll_sum(log_hz: torch.Tensor, event: torch.Tensor, time: torch.Tensor, ties: str = "efron") -> torch.Tensor:
    """Negative Cox partial log-likelihood of one stratum, summed over its events (not averaged), exact in
    float64 and differentiable: the full-batch objective of the linear family's fit.

    Args:
        log_hz: ``[n]`` log hazards; event ``[n]`` bool; time ``[n]``.
        ties: ``efron`` or ``breslow``.

    With no event the sum is 0. Equals :func:`models.losses.cox_loss` times the number of events.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"unknown ties '{ties}': valid names are ['breslow', 'efron']")
    event = event.bool()
    if not bool(event.any()):
        return (log_hz * 0.0).sum()
    _, group = torch.unique(time, sorted=True, return_inverse=True)  # group g: the g-th distinct time
    n_groups = int(group.max()) + 1
    shift = log_hz.detach().max()
    w = torch.exp(log_hz - shift)
    zeros = torch.zeros(n_groups, dtype=log_hz.dtype)
    at = zeros.index_add(0, group, w)  # sum of exp over the patients at each time
    risk = torch.flip(torch.cumsum(torch.flip(at, [0]), 0), [0])  # over everyone with time >= t_g
    ev = event.to(log_hz.dtype)
    d = zeros.index_add(0, group, ev)  # events at each time
    dead = zeros.index_add(0, group, w * ev)
    has = d > 0
    risk, d, dead = risk[has], d[has], dead[has]
    if ties == "breslow":
        log_terms = d * torch.log(risk)
    else:
        r = torch.arange(int(d.max()), dtype=log_hz.dtype)  # (R,)
        use = r[None, :] < d[:, None]  # (G, R)
        frac = torch.where(use, r[None, :] / d[:, None], torch.zeros_like(use, dtype=log_hz.dtype))
        inner = (risk[:, None] - frac * dead[:, None]).clamp_min(torch.finfo(log_hz.dtype).tiny)
        log_terms = torch.where(use, torch.log(inner), torch.zeros_like(inner)).sum(1)
    return -((log_hz * ev).sum() - log_terms.sum() - d.sum() * shift)
