"""The multimodal survival model: MIL over tiles + omics MLP + clinical MLP, fused, a Cox head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.mil import GatedAttentionMIL


@dataclass
class SurvivalOutput:
    """``log_hz [B]`` (higher = higher risk) and tile attention ``attn [B, N]`` (None without slides)."""

    log_hz: torch.Tensor
    attn: torch.Tensor | None = None


def _mlp(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(dropout))


class ConcatFusion(nn.Module):
    """Concatenate modality embeddings (zeroed where missing) with their presence flags, then an MLP."""

    def __init__(self, dims: list[int], hidden: int, dropout: float):
        super().__init__()
        self.n = len(dims)
        self.net = nn.Sequential(nn.Linear(sum(dims) + self.n, hidden), nn.GELU(), nn.Dropout(dropout))
        self.out_dim = hidden

    def forward(self, parts: list[torch.Tensor], present: list[torch.Tensor]) -> torch.Tensor:
        """parts: ``[B, d_k]`` each; present: ``[B]`` bool each. Returns ``[B, hidden]``."""
        flags = torch.stack([p.float() for p in present], dim=1)  # (B, n)
        z = torch.cat([x * p.float().unsqueeze(1) for x, p in zip(parts, present, strict=True)] + [flags], dim=1)
        return self.net(z)


_FUSIONS = {"concat": ConcatFusion}


class MultimodalSurvival(nn.Module):
    """Fuses whichever modalities the cohort has; a patient missing one is masked, not dropped.

    Args:
        feature_dim: tile feature size D (0: no slides in this cohort).
        n_genes: G (0: no omics).
        n_clinical: C (0: no clinical covariates).
        hidden, omics_hidden, clinical_hidden, dropout: layer sizes.
        fusion: a name in ``_FUSIONS``.
    """

    def __init__(
        self,
        feature_dim: int = 0,
        n_genes: int = 0,
        n_clinical: int = 0,
        hidden: int = 128,
        omics_hidden: int = 64,
        clinical_hidden: int = 16,
        dropout: float = 0.25,
        fusion: str = "concat",
    ):
        super().__init__()
        if feature_dim <= 0 and n_genes <= 0 and n_clinical <= 0:
            raise ValueError("MultimodalSurvival needs at least one modality (feature_dim, n_genes or n_clinical > 0)")
        if fusion not in _FUSIONS:
            raise ValueError(f"unknown fusion '{fusion}': valid names are {sorted(_FUSIONS)}")
        self.mil = GatedAttentionMIL(feature_dim, hidden, dropout) if feature_dim > 0 else None
        self.omics_net = _mlp(n_genes, omics_hidden, dropout) if n_genes > 0 else None
        self.clinical_net = _mlp(n_clinical, clinical_hidden, dropout) if n_clinical > 0 else None
        dims = []
        if self.mil is not None:
            dims.append(hidden)
        if self.omics_net is not None:
            dims.append(omics_hidden)
        if self.clinical_net is not None:
            dims.append(clinical_hidden)
        self.fusion = _FUSIONS[fusion](dims, hidden, dropout)
        self.head = nn.Linear(self.fusion.out_dim, 1, bias=False)  # a Cox model has no intercept

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
        parts, present = [], []
        attn = None
        if self.mil is not None:
            assert features is not None and mask is not None, "model has a slide branch: pass features and mask"
            z, attn = self.mil(features, mask)
            parts.append(z)
            present.append(mask.any(dim=1))
        if self.omics_net is not None:
            assert omics is not None and omics_mask is not None, "model has an omics branch: pass omics, omics_mask"
            parts.append(self.omics_net(omics))
            present.append(omics_mask)
        if self.clinical_net is not None:
            assert clinical is not None and clinical_mask is not None, "pass clinical and clinical_mask"
            parts.append(self.clinical_net(clinical))
            present.append(clinical_mask)
        log_hz = self.head(self.fusion(parts, present)).squeeze(-1)  # (B,)
        return SurvivalOutput(log_hz, attn)


def build_model(feature_dim: int, n_genes: int, n_clinical: int, **kw: object) -> MultimodalSurvival:
    """Factory used by the pipeline; ``kw`` are ``MultimodalSurvival`` keyword arguments."""
    return MultimodalSurvival(feature_dim, n_genes, n_clinical, **kw)  # type: ignore[arg-type]
