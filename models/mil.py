"""Multiple-instance pooling of tile features into one slide/patient embedding.

Every pooling maps ``features [B, N, D]`` + ``mask [B, N]`` to ``(z [B, H], attn [B, N])`` and shares one
policy: padded tiles (``mask == False``) change nothing, and an empty bag gives ``z = 0`` and ``attn = 0``
(the fusion then treats the slide modality as missing). A patient with several slides is one bag: the
tiles of all their slides are concatenated (as CLAM and PORPOISE do for patient-level labels), so the
attention is normalised over the patient's tiles.

Use :func:`build_mil` to pick one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al., 2018; the ABMIL used by CLAM).

    ``a_n = w^T (tanh(V h_n) * sigmoid(U h_n))``, ``attn = softmax over valid tiles``,
    ``z = sum_n attn_n * h_n`` with ``h_n = MLP(x_n)``; with ``mean_term``, ``z = sum_n attn_n * h_n + mean_n h_n``
    (the ``gated_attention_mean`` pooling: a slide-wide average that attention refines; no extra parameters).

    Args:
        in_dim: tile feature size D.
        hidden: embedding size H.
        dropout: dropout on the tile embeddings.
        mean_term: add the mean of the valid tiles' embeddings to the attention pooling.
    """

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.25, mean_term: bool = False):
        super().__init__()
        self.mean_term = mean_term
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, hidden)
        self.attn_u = nn.Linear(hidden, hidden)
        self.attn_w = nn.Linear(hidden, 1, bias=False)  # a bias would be a no-op: softmax ignores shifts
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
        h = self.embed(features.masked_fill(~mask.unsqueeze(-1), 0.0))  # (B, N, H); padding may hold NaN
        a = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)  # (B, N)
        a = a.masked_fill(~mask, float("-inf"))
        empty = ~mask.any(dim=1, keepdim=True)  # (B, 1)
        attn = torch.softmax(a.masked_fill(empty, 0.0), dim=1).masked_fill(~mask, 0.0)  # (B, N)
        z = torch.bmm(attn.unsqueeze(1), h).squeeze(1)  # (B, H)
        if self.mean_term:
            m = mask.unsqueeze(-1).to(h.dtype)  # (B, N, 1)
            z = z + (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # an empty bag adds 0
        return z, attn


class _SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block; padded keys are masked out of every query's softmax."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, heads, T, d_head)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x: ``[B, T, H]``; valid: ``[B, T]`` bool (True = attend to this token). Returns ``[B, T, H]``."""
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        # memory-efficient attention (no [T, T] matrix kept on CPU either); the class token is always valid,
        # so no softmax row is empty
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])  # (B, heads, T, d_head)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))

    def forward_first(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the first (class) token's output ``[B, H]`` and its attention over the tokens ``[B, T]``
        (mean over heads): the last block needs nothing else, and this costs O(T), not O(T^2)."""
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        s = (q[:, :, :1] @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)  # (B, heads, 1, T)
        w = torch.softmax(s.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
        y = (w @ v).transpose(1, 2).reshape(b, d)  # (B, H)
        cls = x[:, 0] + self.proj(y)
        return cls + self.mlp(self.norm2(cls)), w.mean(dim=1).squeeze(1)


class TransMIL(nn.Module):
    """Transformer pooling with a class token (after Shao et al., 2021, TransMIL).

    Tiles are embedded (``Linear + GELU``), a learned class token is prepended, ``layers`` pre-norm
    self-attention blocks run over all tokens with padded tiles masked as keys, and the class token's
    output is the bag embedding. ``attn`` is the class token's attention over the tiles in the last block
    (mean over heads), renormalised over real tiles.

    No positional encoding: TransMIL's PPEG reshapes the token sequence into a square and convolves it,
    which encodes neighbourhood only when tiles arrive in grid order, one slide per bag. Here a bag holds a
    random subsample of tiles (training) from possibly several slides, so such a grid would be arbitrary;
    without it the pooling is permutation invariant, like attention MIL. Attention is exact
    (``scaled_dot_product_attention``, memory linear in N on CPU and GPU) rather than Nystrom-approximated.

    Args:
        in_dim: tile feature size D.
        hidden: token width H (divisible by ``heads``).
        dropout: dropout on the tile embeddings and inside the MLPs.
        layers: number of transformer blocks (>= 1).
        heads: attention heads.
    """

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.25, layers: int = 2, heads: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"TransMIL: hidden={hidden} is not divisible by heads={heads}")
        if layers < 1:
            raise ValueError(f"TransMIL: layers must be >= 1, got {layers}")
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.cls = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.blocks = nn.ModuleList(_SelfAttentionBlock(hidden, heads, dropout) for _ in range(layers - 1))
        self.last = _SelfAttentionBlock(hidden, heads, dropout)  # only the class token's row is computed
        self.norm = nn.LayerNorm(hidden)
        self.out_dim = hidden

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool a padded batch of bags.

        Args:
            features: ``[B, N, D]`` float tile features.
            mask: ``[B, N]`` bool, True for real tiles.

        Returns:
            ``(z, attn)``: ``[B, H]`` and ``[B, N]`` (rows sum to 1 over real tiles; both 0 for an empty bag).
        """
        b = features.shape[0]
        h = self.embed(features.masked_fill(~mask.unsqueeze(-1), 0.0))  # (B, N, H)
        x = torch.cat([self.cls.expand(b, -1, -1), h], dim=1)  # (B, 1 + N, H)
        valid = torch.cat([mask.new_ones(b, 1), mask], dim=1)  # (B, 1 + N)
        for blk in self.blocks:
            x = blk(x, valid)
        cls, w = self.last.forward_first(x, valid)  # (B, H), (B, 1 + N)
        nonempty = mask.any(dim=1, keepdim=True)  # (B, 1)
        z = self.norm(cls) * nonempty  # an empty bag carries no slide information
        attn = w[:, 1:]
        attn = attn / attn.sum(dim=1, keepdim=True).clamp_min(1e-12) * nonempty  # (B, N)
        return z, attn


MIL_POOLINGS: dict[str, Callable[..., nn.Module]] = {
    "gated_attention": lambda in_dim, hidden, dropout, **kw: GatedAttentionMIL(in_dim, hidden, dropout),
    "gated_attention_mean": lambda in_dim, hidden, dropout, **kw: GatedAttentionMIL(in_dim, hidden, dropout, True),
    "transmil": lambda in_dim, hidden, dropout, **kw: TransMIL(in_dim, hidden, dropout, **kw),
}


def build_mil(name: str, in_dim: int, hidden: int = 128, dropout: float = 0.25, **kw: int) -> nn.Module:
    """A MIL pooling by name (``gated_attention``, ``gated_attention_mean`` or ``transmil``); ``kw``
    (``layers``, ``heads``) go to TransMIL only.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in MIL_POOLINGS:
        raise ValueError(f"unknown MIL pooling '{name}': valid names are {sorted(MIL_POOLINGS)}")
    return MIL_POOLINGS[name](in_dim, hidden, dropout, **kw)
