"""Multiple-instance pooling of tile features into one slide/patient embedding."""

from __future__ import annotations

import torch
from torch import nn


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al., 2018; the ABMIL used by CLAM).

    ``a_n = w^T (tanh(V h_n) * sigmoid(U h_n))``, ``attn = softmax over valid tiles``,
    ``z = sum_n attn_n * h_n`` with ``h_n = MLP(x_n)``.

    Padded tiles (``mask == False``) get zero attention and change nothing. An empty bag (no valid tile)
    yields ``z = 0`` and ``attn = 0``; the caller masks the modality as missing.

    Args:
        in_dim: tile feature size D.
        hidden: embedding size H.
        dropout: dropout on the tile embeddings.
    """

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.25):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, hidden)
        self.attn_u = nn.Linear(hidden, hidden)
        self.attn_w = nn.Linear(hidden, 1)
        self.out_dim = hidden

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool a padded batch of bags.

        Args:
            features: ``[B, N, D]`` float tile features.
            mask: ``[B, N]`` bool, True for real tiles.

        Returns:
            ``(z, attn)``: bag embeddings ``[B, H]`` and attention weights ``[B, N]`` (rows sum to 1, or 0
            for an empty bag).
        """
        h = self.embed(features)  # (B, N, H)
        a = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)  # (B, N)
        a = a.masked_fill(~mask, float("-inf"))
        empty = ~mask.any(dim=1, keepdim=True)  # (B, 1)
        attn = torch.softmax(a.masked_fill(empty, 0.0), dim=1).masked_fill(~mask, 0.0)  # (B, N)
        z = torch.bmm(attn.unsqueeze(1), h).squeeze(1)  # (B, H)
        return z, attn
