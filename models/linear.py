"""The linear model family: a Cox (or discrete-time) model that is linear in every modality.

``log_hz = w_s . z(mean of the bag's tiles) + w_g . omics + w_c . clinical``, where ``z`` standardises the
mean-pooled tile features with a mean and scale fitted on the training slides (from per-site summaries, by
the caller: :meth:`LinearSurvival.set_slide_norm`). The inputs and the output (:class:`SurvivalOutput`) are the
network's, so it trains through the same centralised and federated code. The penalty is the fit's (ridge or
elastic net, full batch: :mod:`pipeline.training.linear_fit`; mini-batch: the optimiser's weight decay); there is
no intercept (a Cox model has none) except one bias per bin for a
discrete-time head (``n_bins = K``: every bin's logit is ``bias_k + log_hz``, survival ``cumprod(1 - hazards)``,
and the ranking score ``-sum_k S_k``, as in :mod:`models.survival`).

Slide projection (optional, ``slide_pcs = r > 0`` or :meth:`LinearSurvival.set_slide_projection`): the slide term
is then linear in ``u = (z @ components.T - pc_mean) / pc_scale [B, r]``, the standardised scores of ``z`` on ``r``
principal directions fitted from site aggregates of the training tiles (by the caller:
:mod:`pipeline.training.slide_norm`). ``components [r, D]``, ``pc_mean [r]`` and ``pc_scale [r]`` are buffers, saved
with the model; a state dict with a projection loads into a model built without one (its shapes are taken).

Tile-phenotype composition (optional, on top of a projection: :meth:`LinearSurvival.set_slide_clusters`): each tile's
scores ``t = z_tile @ components.T [r]`` (``z_tile`` the tile standardised like the mean) go to the nearest of ``K``
centroids ``slide_centroids [K, r]`` (k-means fitted by the caller: :mod:`pipeline.training.slide_clusters`); the
slide's fractions ``f [K]`` of its tiles in each cluster, standardised by ``slide_comp_mean [K]`` and
``slide_comp_scale [K]``, are the slide term's inputs, after the ``r`` scores when ``slide_comp_pcs`` is 1 (both) or
alone when it is 0 (composition). The assignment is a hard argmin (no gradient to the tiles), computed in float64
in :meth:`forward` and :meth:`design_rows` alike.

A missing modality contributes 0: omics and clinical inputs are standardised upstream, so 0 is the training
mean; a patient without tiles gets ``z = 0`` (``u = 0``) likewise. The tile "attention" returned is uniform over
the real tiles (``1 / N_i``): that is exactly the weight mean pooling gives each tile.

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
        slide_pcs: r > 0: the slide term over r projected scores (components 0 and scale 1 until
            :meth:`set_slide_projection`); 0: over the D standardised features.

    Weights start at 0 (the null model: every patient has the same risk), so training is deterministic given
    the data order. Raises ``ValueError`` for no modality or a negative ``n_bins``.
    """

    def __init__(
        self, feature_dim: int = 0, n_genes: int = 0, n_clinical: int = 0, n_bins: int = 0, slide_pcs: int = 0
    ):
        if feature_dim <= 0 and n_genes <= 0 and n_clinical <= 0:
            raise ValueError("LinearSurvival needs at least one modality (feature_dim, n_genes or n_clinical > 0)")
        if n_bins < 0:
            raise ValueError(f"n_bins must be >= 0 (0 = Cox head), got {n_bins}")
        if slide_pcs < 0 or (slide_pcs > 0 and slide_pcs > feature_dim):
            raise ValueError(f"slide_pcs must be in 0..feature_dim ({feature_dim}), got {slide_pcs}")
        super().__init__(feature_dim)  # slide standardisation buffers, set from the training slides
        self.n_bins = n_bins
        self.slide_linear = zero_linear(feature_dim)
        self._projection_buffers(slide_pcs)
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
        """The slide term's inputs ``[B, D]`` (:meth:`standardised_mean`), or ``[B, r]`` with a projection (0 for
        an empty bag), ``[B, r + K]`` / ``[B, K]`` with clusters, and the uniform tile weights ``[B, N]``."""
        z, attn = self.standardised_mean(features, mask)
        u = self.project(z, mask.any(1))
        if not self.slide_clusters:
            return u, attn
        return self._with_composition(u, self.slide_fractions(features, mask), mask.any(1)).to(u.dtype), attn

    def tile_shares(self, features: torch.Tensor) -> torch.Tensor:
        """Each tile's exact share ``[N]`` of one bag's slide term (log-hazard units), for ``features [N, D]``.

        The slide term is ``w . s(bag)`` where the inputs ``s`` (standardised mean, its projected scores, the
        standardised cluster fractions) are an affine function of the tiles' mean (fractions: the mean of the
        tiles' one-hot cluster memberships), so ``s(bag) = mean_i s({x_i})`` and tile i adds ``w . s({x_i}) / N``:
        the shares sum to the bag's slide term, with no baseline and no integration steps. Cox head only (a
        discrete-time head's risk is not additive in ``log_hz``); an empty bag gives an empty tensor.
        """
        if self.slide_linear is None:
            raise ValueError("tile_shares: this model has no slide term (feature_dim=0)")
        if self.bin_bias is not None:
            raise ValueError("tile_shares: a discrete-time head's risk is not a sum over tiles (Cox head only)")
        n = int(features.shape[0])
        if n == 0:
            return features.new_zeros(0)
        one = torch.ones(n, 1, dtype=torch.bool, device=features.device)
        s = self.slide_z(features.unsqueeze(1), one)[0]  # (N, width): each tile as a bag of one
        return self.slide_linear(s.to(self.slide_linear.weight.dtype))[:, 0] / n

    @property
    def slide_clusters(self) -> int:
        """K, the number of tile phenotypes in the slide term (0: none)."""
        cents = self.get_buffer("slide_centroids")
        return 0 if cents is None else int(cents.shape[0])

    def slide_fractions(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each bag's fractions of its real tiles nearest each centroid ``[B, K]`` (float64; 0 for an empty bag).

        Args:
            features: ``[B, N, D]``; mask ``[B, N]`` bool.
        """
        assert self.slide_clusters, "slide_fractions: the model has no tile clusters"
        mean, scale = self.get_buffer("slide_mean").double(), self.get_buffer("slide_scale").double()
        comps, cents = self.get_buffer("slide_components").double(), self.get_buffer("slide_centroids").double()
        t = ((features.double() - mean) / scale) @ comps.T  # (B, N, r)
        d2 = (t**2).sum(-1, keepdim=True) - 2 * t @ cents.T + (cents**2).sum(-1)  # (B, N, K)
        one_hot = torch.nn.functional.one_hot(d2.argmin(-1), cents.shape[0]).double()  # (B, N, K)
        w = mask.double()  # (B, N)
        return torch.einsum("bn,bnk->bk", w, one_hot) / w.sum(1, keepdim=True).clamp(min=1.0)

    def _with_composition(self, u: torch.Tensor, fractions: torch.Tensor, has_tiles: torch.Tensor) -> torch.Tensor:
        """The slide inputs from the projected scores ``u [B, r]`` and the raw ``fractions [B, K]`` (float64)."""
        mu, sd = self.get_buffer("slide_comp_mean").double(), self.get_buffer("slide_comp_scale").double()
        c = ((fractions.double() - mu) / sd).masked_fill(~has_tiles.unsqueeze(1), 0.0)  # (B, K)
        keep = bool(self.get_buffer("slide_comp_pcs")[0] > 0)
        return torch.cat([u.double(), c], 1) if keep else c

    def set_slide_clusters(
        self, centroids: torch.Tensor, comp_mean: torch.Tensor, comp_scale: torch.Tensor, keep_pcs: bool
    ) -> None:
        """Add the tile-phenotype composition to a projected slide term: ``centroids [K, r]`` in the projected tile
        score space, the fractions' mean ``[K]`` and scale ``[K]`` (> 0); ``keep_pcs``: keep the ``r`` scores
        beside the ``K`` fractions. The slide weights are reset to 0: call after :meth:`set_slide_projection`,
        before fitting."""
        r = self.slide_pcs
        if not r:
            raise ValueError("set_slide_clusters: the model has no slide projection (call set_slide_projection first)")
        k = int(centroids.shape[0]) if centroids.dim() == 2 else -1
        if centroids.shape != (k, r) or k < 1 or comp_mean.shape != (k,) or comp_scale.shape != (k,):
            raise ValueError(
                f"set_slide_clusters: expected centroids (K, {r}) and mean and scale (K,), got "
                f"{tuple(centroids.shape)}, {tuple(comp_mean.shape)}, {tuple(comp_scale.shape)}"
            )
        ok = torch.isfinite(centroids).all() and torch.isfinite(comp_mean).all() and (comp_scale > 0).all()
        if not bool(ok):
            raise ValueError("set_slide_clusters: centroids and comp_mean must be finite, comp_scale > 0")
        proj = {n: self.get_buffer(n).clone() for n in ("slide_components", "slide_pc_mean", "slide_pc_scale")}
        self._projection_buffers(r, k, keep_pcs)  # the projection kept, the cluster buffers and slide weights new
        for name, value in (*proj.items(), ("slide_centroids", centroids), ("slide_comp_mean", comp_mean),
                            ("slide_comp_scale", comp_scale)):  # fmt: skip
            self.get_buffer(name).copy_(value.to(torch.float32))

    @property
    def slide_pcs(self) -> int:
        """r, the number of projected slide scores (0: no projection)."""
        comps = self.get_buffer("slide_components")
        return 0 if comps is None else int(comps.shape[0])

    def project(self, z: torch.Tensor, has_tiles: torch.Tensor) -> torch.Tensor:
        """``z [B, D]`` -> the standardised scores ``[B, r]`` (0 where ``has_tiles [B]`` is False); ``z`` itself
        without a projection."""
        if not self.slide_pcs:
            return z
        comps = self.get_buffer("slide_components").to(z.dtype)
        u = (z @ comps.T - self.get_buffer("slide_pc_mean").to(z.dtype)) / self.get_buffer("slide_pc_scale").to(z.dtype)
        return u.masked_fill(~has_tiles.unsqueeze(1), 0.0)  # (B, r)

    def set_slide_projection(self, components: torch.Tensor, pc_mean: torch.Tensor, pc_scale: torch.Tensor) -> None:
        """Project the slide term onto ``components [r, D]`` (rows: directions in the standardised feature space),
        scores centred by ``pc_mean [r]`` and divided by ``pc_scale [r]`` (> 0). The slide weights are reset to 0
        (``r`` inputs): call before fitting."""
        if self.feature_dim == 0:
            raise ValueError("set_slide_projection: this model has no slide term (feature_dim=0)")
        r = int(components.shape[0]) if components.dim() == 2 else -1
        if components.shape != (r, self.feature_dim) or not 0 < r <= self.feature_dim:
            raise ValueError(
                f"set_slide_projection: expected components of shape (r, {self.feature_dim}) with 0 < r <= "
                f"{self.feature_dim}, got {tuple(components.shape)}"
            )
        if pc_mean.shape != (r,) or pc_scale.shape != (r,):
            raise ValueError(f"set_slide_projection: expected pc_mean and pc_scale of shape ({r},)")
        ok = torch.isfinite(components).all() and torch.isfinite(pc_mean).all() and (pc_scale > 0).all()
        if not bool(ok):
            raise ValueError("set_slide_projection: components and pc_mean must be finite, pc_scale > 0")
        self._projection_buffers(r)
        for name, value in (("slide_components", components), ("slide_pc_mean", pc_mean), ("slide_pc_scale", pc_scale)):
            self.get_buffer(name).copy_(value.to(torch.float32))

    def _projection_buffers(self, r: int, k: int = 0, keep_pcs: bool = True) -> None:
        """(Re)make the projection buffers for ``r`` scores (None for 0), the cluster buffers for ``k`` phenotypes
        (None for 0) and a zero slide layer of matching width."""
        d = self.feature_dim
        self.register_buffer("slide_components", torch.zeros(r, d) if r else None)
        self.register_buffer("slide_pc_mean", torch.zeros(r) if r else None)
        self.register_buffer("slide_pc_scale", torch.ones(r) if r else None)
        self.register_buffer("slide_centroids", torch.zeros(k, r) if k else None)
        self.register_buffer("slide_comp_mean", torch.zeros(k) if k else None)
        self.register_buffer("slide_comp_scale", torch.ones(k) if k else None)
        self.register_buffer("slide_comp_pcs", torch.full((1,), float(keep_pcs)) if k else None)
        if d:
            self.slide_linear = zero_linear((r if keep_pcs or not k else 0) + k or d)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        comps, cents = state_dict.get(prefix + "slide_components"), state_dict.get(prefix + "slide_centroids")
        r = 0 if comps is None else int(comps.shape[0])
        k = 0 if cents is None else int(cents.shape[0])
        keep = k == 0 or bool(state_dict[prefix + "slide_comp_pcs"][0] > 0)
        same = k == self.slide_clusters and (not k or keep == bool(self.get_buffer("slide_comp_pcs")[0] > 0))
        if self.feature_dim and (r != self.slide_pcs or not same):  # another projection or composition: its shapes
            self._projection_buffers(r, k, keep)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

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
        slide_fractions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The design matrix ``X [B, F]`` (float64) with ``log_hz = X @ coefficients()``.

        Args:
            slide_means: ``[B, D]`` each bag's mean tile feature (not yet standardised); has_tiles ``[B]`` bool.
                With a projection the slide columns are the ``r`` scores of :meth:`project`.
            omics, omics_mask, clinical, clinical_mask: as in :meth:`forward`.
            slide_fractions: ``[B, K]`` each bag's :meth:`slide_fractions` (needed with clusters).
        """
        cols: list[torch.Tensor] = []
        if self.slide_linear is not None:
            assert slide_means is not None and has_tiles is not None, "model has a slide term: pass slide means"
            mean, scale = self.get_buffer("slide_mean").double(), self.get_buffer("slide_scale").double()
            z = ((slide_means.double() - mean) / scale).masked_fill(~has_tiles.unsqueeze(1), 0.0)
            u = self.project(z, has_tiles)
            if self.slide_clusters:
                assert slide_fractions is not None, "model has tile clusters: pass slide_fractions"
                u = self._with_composition(u, slide_fractions, has_tiles)
            cols.append(u)
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
